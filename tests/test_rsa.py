"""Markovian RSA: the context bound by construction, K distinct tails, metrics, validation, partial results."""
import json

import pytest

from zaya_lib.data.aggregation import fixed_overhead
from zaya_lib.data.tokenizer import encode_text, train_tokenizer
from zaya_lib.ttc.backends import Backend, Completion, EngineBackend
from zaya_lib.ttc.rsa import RSAError, majority_answer, run_rsa, self_consistency

from _helpers import tiny_model

PROBLEMS = [("Compute 12+7.", "19"), ("Compute 30+4.", "34"), ("How many a in banana?", "3")]


@pytest.fixture(scope="module")
def tok():
    texts = [f"Compute {a}+{b}. <think>{a}+{b}</think>\\boxed{{{a + b}}} banana" for a in range(40) for b in range(9)]
    return train_tokenizer(texts, vocab_size=300)


class Spy(Backend):
    """Delegates to a real backend and records every prompt (to check what RSA sent)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        self.calls.append([list(p) for p in prompts])
        return self.inner.generate(prompts, max_new_tokens, temperature, seed, top_p)


class Scripted(Backend):
    """Answers from a script: `answer(call, index) -> str` boxed; the completion ids are the tokenised text.
    `fail_at` raises on that call (a backend dying mid-run)."""

    def __init__(self, tok, answer, fail_at=None):
        self.tok, self.answer, self.fail_at, self.calls = tok, answer, fail_at, []

    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        call = len(self.calls)
        self.calls.append([list(p) for p in prompts])
        if call == self.fail_at:
            raise ConnectionError("server went away")
        out = []
        for j in range(len(prompts)):
            text = self.answer(call, j)
            out.append(Completion(text, encode_text(self.tok, text), "stop"))
        return out


def test_context_bound_holds_by_construction_for_every_round(tok):
    spy = Spy(EngineBackend(tiny_model(tok).eval(), tok))
    N, K, T, tau, budget = 3, 2, 4, 4, 8
    res = run_rsa(spy, tok, PROBLEMS, N=N, K=K, T=T, tau=tau, max_new_tokens=budget, seed=1)
    assert len(spy.calls) == T and len(res.rounds) == T and res.completed
    overhead = fixed_overhead(tok, K)
    for t, prompts in enumerate(spy.calls[1:], start=1):
        assert len(prompts) == N * len(PROBLEMS)
        for j, p in enumerate(prompts):
            q = encode_text(tok, PROBLEMS[j // N][0])
            assert len(p) <= len(q) + K * tau + overhead  # the acceptance bound, whatever the round
        assert res.rounds[t].max_prompt_tokens <= res.rounds[t].prompt_bound
    # the random model rambles to the budget, so tails really are cut: plain RSA, carrying whole traces, needs more
    spy_plain = Spy(EngineBackend(tiny_model(tok, seed=None).eval(), tok))
    plain = run_rsa(spy_plain, tok, PROBLEMS, N=N, K=K, T=2, tau=None, max_new_tokens=budget, seed=1)
    assert plain.rounds[-1].max_prompt_tokens > res.rounds[-1].prompt_bound
    # tokens generated are cumulative and counted from the completions
    assert [r.tokens_generated for r in res.rounds] == sorted(r.tokens_generated for r in res.rounds)
    assert res.rounds[0].tokens_generated <= N * len(PROBLEMS) * budget


def test_each_call_sees_k_distinct_tails(tok):
    # Member j writes a unique word repeated 6 times (each word <= 8 tokens); its 20-token tail therefore names it.
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    N, K = 6, 3
    backend = Scripted(tok, lambda call, j: f"<think>x</think>\\boxed{{{j % 2}}}" + f" {words[j % N]}" * 6)
    run_rsa(backend, tok, PROBLEMS[:1], N=N, K=K, T=3, tau=20, max_new_tokens=80, seed=3)
    seen_sets = set()
    for prompts in backend.calls[1:]:
        for p in prompts:
            text = tok.decode(p, skip_special_tokens=False)
            present = [w for w in words if w in text]
            assert len(present) == K  # K tails, no member twice (without replacement)
            assert text.count("[Attempt") == K
            seen_sets.add(tuple(present))
    assert len(seen_sets) > 1  # subsets are resampled per call


def test_metrics_and_majority_vote(tok):
    # Problem 0 (gold 19): 3 of 5 members right -> majority right. Problem 1 (gold 34): 2 of 5 right, the three
    # wrong ones agree on 35 -> majority wrong, pass@N right. Problem 2 (gold 3): nobody answers.
    def answer(call, j):
        i, m = divmod(j, 5)
        if i == 0:
            return "<think>x</think>\\boxed{19}" if m < 3 else f"\\boxed{{{20 + m}}}"
        if i == 1:
            return "\\boxed{34}" if m < 2 else "\\boxed{35}"
        return "<think>no idea</think>"
    res = run_rsa(Scripted(tok, answer), tok, PROBLEMS, N=5, K=2, T=2, tau=8, max_new_tokens=20)
    for r in res.rounds:
        assert r.mean_acc == pytest.approx(5 / 15)
        assert r.pass_at_n == pytest.approx(2 / 3)
        assert r.majority_acc == pytest.approx(1 / 3)
    assert res.final_answers == ["19", "35", None]
    assert majority_answer(["4", " 4", "5", None, None, None]) == "4"  # None does not vote; whitespace-insensitive
    assert majority_answer(["5", "4", "4", "5"]) == "5"  # tie -> first seen
    assert majority_answer([None, ""]) is None


def test_self_consistency_curve(tok):
    def answer(call, j):
        return "\\boxed{19}" if j % 4 in (0, 3) else f"\\boxed{{{j}}}"
    sc = self_consistency(Scripted(tok, answer), tok, PROBLEMS[:1], M=4, max_new_tokens=20)
    # samples: 19, 1, 2, 19 -> majority over first n: n=1 right, n=2 tie->19 right, n=3 right (first), n=4 right
    assert sc.majority_acc == [1.0, 1.0, 1.0, 1.0]
    assert sc.single_sample_acc == 0.5
    assert sc.tokens_per_problem == sorted(sc.tokens_per_problem)
    assert sc.at_tokens(sc.tokens_per_problem[1])[0] == 2


@pytest.mark.parametrize("kw,msg", [
    (dict(N=2, K=3), "larger than the population"),
    (dict(N=0, K=1), "population N"),
    (dict(tau=0), "tail tau"),
    (dict(tau=-3), "tail tau"),
    (dict(T=0), "rounds T"),
    (dict(max_new_tokens=0), "budget"),
])
def test_validation_errors(tok, kw, msg):
    args = dict(N=4, K=2, T=2, tau=8, max_new_tokens=10) | kw
    backend = Scripted(tok, lambda c, j: "\\boxed{1}")
    with pytest.raises(ValueError, match=msg):
        run_rsa(backend, tok, PROBLEMS, **args)
    assert backend.calls == []  # rejected before any generation


def test_empty_problem_is_an_error(tok):
    backend = Scripted(tok, lambda c, j: "\\boxed{1}")
    with pytest.raises(ValueError, match="problem 1 is empty"):
        run_rsa(backend, tok, [("Compute 1+1.", "2"), ("  ", "0")], N=2, K=1, T=2, tau=4, max_new_tokens=5)
    with pytest.raises(ValueError, match="no problems"):
        run_rsa(backend, tok, [], N=2, K=1, T=2, tau=4, max_new_tokens=5)
    assert backend.calls == []


def test_backend_failure_keeps_finished_rounds(tok, tmp_path):
    out = tmp_path / "rsa.json"
    backend = Scripted(tok, lambda c, j: "\\boxed{19}", fail_at=2)
    with pytest.raises(RSAError, match="round 2") as ei:
        run_rsa(backend, tok, PROBLEMS[:1], N=3, K=2, T=5, tau=6, max_new_tokens=10, out_path=out)
    partial = ei.value.partial
    assert [r.round for r in partial.rounds] == [0, 1] and not partial.completed
    assert "server went away" in partial.error
    on_disk = json.loads(out.read_text())
    assert len(on_disk["rounds"]) == 2 and on_disk["rounds"][1]["majority_acc"] == 1.0


def test_compare_at_equal_tokens_pairs_and_verdict():
    from zaya_lib.ttc.rsa import RoundStats, RSAResult, SelfConsistencyResult, compare_at_equal_tokens

    def rsa(rows):  # one round costing 100 tokens per problem
        r = RSAResult(params={})
        r.rounds.append(RoundStats(0, 0.5, 1.0, sum(rows) / len(rows), 100 * len(rows), 100.0, 10, 20, None))
        r.majority_correct.append(rows)
        return r

    sc = lambda rows_by_n: SelfConsistencyResult(list(range(1, 4)), [sum(r) / len(r) for r in rows_by_n],
                                                 [40.0, 80.0, 120.0], 0.3, 1.0, rows_by_n)
    good, bad = [True] * 30, [False] * 30
    # at 100 tokens self-consistency may use n=2 (80 tokens), not n=3 (120): n=3's perfect rows must be ignored
    out = compare_at_equal_tokens([rsa(good)] * 2, [sc([bad, bad, good])] * 2)
    assert out["sc_samples"] == [2, 2] and out["verdict"] == "beats" and out["diff"] == 1.0
    assert compare_at_equal_tokens([rsa(bad)], [sc([bad, good, good])])["verdict"] == "loses to"
    mixed = [i % 2 == 0 for i in range(30)]
    assert compare_at_equal_tokens([rsa(mixed)], [sc([bad, [not m for m in mixed], bad])])["verdict"] == \
        "is not distinguishable from"  # +1/-1 alternating: mean 0, the interval straddles 0
    with pytest.raises(ValueError, match="one self-consistency run per RSA run"):
        compare_at_equal_tokens([rsa(good)], [])

"""The aggregation breakdown: verdict parsing is the inverse of the aggregation format, the round it measures is the
round run_rsa runs, and every outcome lands in the right bucket."""
import random

import pytest

from zaya_lib.data.aggregation import build_aggregation_prompt_ids
from zaya_lib.data.tasks import CHECKERS, FORWARD_CHECKED, _compare, _corrupt_solution, aggregation_response, check_candidate, make_suite, \
    parse_verdicts
from zaya_lib.data.tokenizer import encode_text
from zaya_lib.ttc.backends import Backend, Completion, EngineBackend
from zaya_lib.ttc.diagnose import aggregation_breakdown, format_breakdown
from zaya_lib.ttc.rsa import run_rsa

from _helpers import problem_tokenizer, tiny_model

PROBLEMS = make_suite(2, seed=5, split="train")  # two problems of each suite task


@pytest.fixture(scope="module")
def tok():
    return problem_tokenizer(make_suite(6, seed=1, split="train"))


def test_parse_verdicts_reads_back_what_aggregation_response_wrote():
    rng = random.Random(0)
    checked = 0
    for p in make_suite(8, seed=3, split="train"):
        assert p.task in CHECKERS
        for _ in range(4):
            cands = [p.answer if rng.random() < 0.4 else _corrupt_solution(p, rng)[1] for _ in range(3)]
            text = aggregation_response(p, cands)
            got = parse_verdicts(text)
            # one verdict per distinct integer candidate, in order, up to and including the first that checks out;
            # forward-checked tasks: none when all candidates agree, else each one's digits against the solve's result
            want, seen = [], set()
            agree = p.task in FORWARD_CHECKED and len(set(cands)) == 1
            for i, a in enumerate([] if agree else cands, start=1):
                x = int(a) if a.lstrip("-").isdigit() else None
                if x is None or x in seen:
                    continue
                seen.add(x)
                if p.task in FORWARD_CHECKED:
                    trace, ok = _compare(int(p.answer), x), x == int(p.answer)
                else:
                    trace, ok = check_candidate(p, str(x))
                want.append((i, x, trace, ok))
                if ok:
                    break
            assert got == want, (p.question, cands, text)
            checked += len(got)
    assert checked > 50


def test_parse_verdicts_skips_candidates_without_a_check():
    assert parse_verdicts("<think>A1 none. A2 12 same. solve: 5+7=12 →12</think>\\boxed{12}") == []
    assert parse_verdicts("A1 12: 3*4=12? 3*4=12 2|2= 1|1= ok. →12") == [(1, 12, "3*4=12? 3*4=12 2|2= 1|1=", True)]
    assert parse_verdicts("<think>A1 12 A2 12 agree. →12</think>\\boxed{12}") == []


class Spy(Backend):
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        self.calls.append(([list(p) for p in prompts], seed))
        return self.inner.generate(prompts, max_new_tokens, temperature, seed, top_p)


def test_the_breakdown_runs_the_same_round_as_run_rsa(tok):
    model = tiny_model(tok).eval()
    a, b = Spy(EngineBackend(model, tok)), Spy(EngineBackend(model, tok))
    kw = dict(N=3, K=2, tau=6, max_new_tokens=10, temperature=1.0, seed=4)
    res = run_rsa(a, tok, PROBLEMS, T=2, **kw)
    br = aggregation_breakdown(b, tok, PROBLEMS, **kw)
    assert a.calls == b.calls  # same prompts (same members, same tails) and the same sampling seeds, both rounds
    assert br["all"]["r0_acc"] == pytest.approx(res.rounds[0].mean_acc)
    assert br["all"]["r1_acc"] == pytest.approx(res.rounds[1].mean_acc)
    assert br["all"]["calls"] == 3 * len(PROBLEMS)


def test_a_later_round_is_measured_against_the_round_before(tok):
    """round_index=2 runs run_rsa's first three rounds and judges round 2's calls against round 1's population."""
    model = tiny_model(tok).eval()
    a, b = Spy(EngineBackend(model, tok)), Spy(EngineBackend(model, tok))
    kw = dict(N=3, K=2, tau=6, max_new_tokens=10, temperature=1.0, seed=4)
    res = run_rsa(a, tok, PROBLEMS, T=3, **kw)
    br = aggregation_breakdown(b, tok, PROBLEMS, round_index=2, **kw)
    assert a.calls == b.calls and len(b.calls) == 3
    assert br["all"]["r0_acc"] == pytest.approx(res.rounds[1].mean_acc)
    assert br["all"]["r1_acc"] == pytest.approx(res.rounds[2].mean_acc)
    assert br["params"]["round_index"] == 2 and "| round 1 | round 2 (aggregated) |" in format_breakdown(br)


class Scripted(Backend):
    """Round 0: members 0 and 1 right, member 2 wrong. Round 1: the text `agg(problem, members shown)` returns."""

    def __init__(self, tok, problems, agg):
        self.tok, self.problems, self.agg, self.round = tok, problems, agg, 0

    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        out = []
        for j, prompt in enumerate(prompts):
            p = self.problems[j // 3]
            if self.round == 0:
                text = f"<think>x</think>\\boxed{{{p.answer if j % 3 < 2 else int(p.answer) + 1}}}"
            else:
                text = self.agg(p, prompt)
            out.append(Completion(text, encode_text(self.tok, text), "stop"))
        self.round += 1
        return out


def test_buckets_count_what_the_aggregator_did(tok):
    problems = [p for p in PROBLEMS if p.task in ("add", "mul1")]

    def agg(p, prompt):
        # a right candidate rejected by a slipped check, then a wrong fall-back solve; a wrong one accepted
        return (f"<think>A1 {p.answer}: slip no. A2 {int(p.answer) + 1}: slip ok. →{int(p.answer) + 1}</think>"
                f"\\boxed{{{int(p.answer) + 1}}}" if problems.index(p) % 2 else
                f"<think>A1 {p.answer}: fine ok. →{p.answer}</think>\\boxed{{{p.answer}}}")

    backend = Scripted(tok, problems, agg)
    br = aggregation_breakdown(backend, tok, problems, N=3, K=2, tau=8, max_new_tokens=16, temperature=1.0, seed=0)
    c = br["all"]
    assert c["r0_acc"] == pytest.approx(2 / 3)
    assert c["all_right"] + c["mixed"] + c["all_wrong"] == c["calls"] == 3 * len(problems)
    assert c["all_wrong"] == 0  # one wrong member in three: any two shown include a right one
    slipped = c["calls"] - c["right"]  # the calls that got the slipped script (odd problems)
    assert slipped == 3 * (len(problems) // 2)
    assert c["rejected_right"] == slipped and c["accepted_wrong"] == slipped
    assert c["verdicts"] == c["calls"] + slipped and c["verdicts_right"] == c["right"]
    assert c["solves"] == 0 and c["solve_acc"] is None
    assert set(br["tasks"]) == {"add", "mul1"}
    table = format_breakdown(br)
    assert table.count("\n") == 2 + len(br["tasks"]) and "| all |" in table


def test_bad_input_is_refused_before_generating(tok):
    class Never(Backend):
        def generate(self, *a, **k):
            raise AssertionError("generated")

    with pytest.raises(ValueError, match="no problems"):
        aggregation_breakdown(Never(), tok, [], N=2, K=1, tau=4, max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="no task"):
        aggregation_breakdown(Never(), tok, [("Compute 1+1.", "2")], N=2, K=1, tau=4, max_new_tokens=4,
                              temperature=1.0)
    with pytest.raises(ValueError, match="K <= N"):
        aggregation_breakdown(Never(), tok, PROBLEMS, N=2, K=3, tau=4, max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="tau"):
        aggregation_breakdown(Never(), tok, PROBLEMS, N=2, K=1, tau=0, max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="round_index"):
        aggregation_breakdown(Never(), tok, PROBLEMS, N=2, K=1, tau=4, max_new_tokens=4, temperature=1.0,
                              round_index=0)


def test_prompts_are_the_one_builders(tok):
    """Guard: the breakdown's aggregation prompts are build_aggregation_prompt_ids' (no private wording)."""
    seen = []

    class Rec(Backend):
        def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
            seen.append(prompts)
            return [Completion("<think>x</think>\\boxed{1}", encode_text(tok, "<think>x</think>\\boxed{1}"), "stop")
                    for _ in prompts]

    aggregation_breakdown(Rec(), tok, PROBLEMS[:1], N=2, K=2, tau=4, max_new_tokens=4, temperature=1.0)
    tail_ids = encode_text(tok, "<think>x</think>\\boxed{1}")[-4:]
    assert seen[1][0] == build_aggregation_prompt_ids(tok, PROBLEMS[0].question, [tail_ids, tail_ids], tau=4)

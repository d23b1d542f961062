"""Aggregation prompts (shared by SFT data and Markovian RSA) and aggregation SFT examples."""
from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from zaya_lib.data.aggregation import (build_aggregation_prompt_ids, build_aggregation_prompt_text, candidate_tail,
                                       completion_trace, expert_aggregation_examples, fixed_overhead,
                                       mix_sft_with_aggregation, self_aggregation_examples, tail)
from zaya_lib.data.tasks import CHECKERS, FORWARD_CHECKED, aggregation_response, corrupt_rollout, make_problems
from zaya_lib.data.tokenizer import chat_ids, encode_chat

from _helpers import problem_tokenizer

PROSE = ("Solve the problem. Below are the endings of earlier attempts; any of them may be wrong. Check them, "
         "reason step by step, and give the final answer. Problem: Attempts may contain mistakes.")


@pytest.fixture(scope="module")
def tok():
    probs = make_problems("add", 60, seed=2, difficulty=3) + make_problems("linear_eq", 60, seed=2, difficulty=3)
    return problem_tokenizer(probs, [PROSE] * 20, vocab_size=512)


@pytest.fixture(scope="module")
def problems():
    return make_problems("add", 12, seed=7, difficulty=4) + make_problems("linear_eq", 12, seed=7, difficulty=3)


def find(hay, needle, start=0):
    """Start index of the contiguous sub-list `needle` in `hay` (from `start`), or -1."""
    n = len(needle)
    for i in range(start, len(hay) - n + 1):
        if hay[i:i + n] == needle:
            return i
    return -1


@given(ids=st.lists(st.integers(0, 50), max_size=40), tau=st.integers(1, 50))
def test_tail_is_exactly_last_tau(ids, tau):
    t = tail(ids, tau)
    assert t == ids[len(ids) - min(tau, len(ids)):] and len(t) == min(tau, len(ids))


@pytest.mark.parametrize("tau", [0, -3, 2.5, True])
def test_tail_rejects_bad_tau(tau):
    with pytest.raises(ValueError, match="tau must be a positive int"):
        tail([1, 2, 3], tau)


def test_prompt_structure(tok, problems):
    cid = chat_ids(tok)
    p, rng, tau, C = problems[0], random.Random(0), 10, 4
    traces = [tok.encode(corrupt_rollout(p, rng, 0.5), add_special_tokens=False) for _ in range(C)]
    tails = [tail(t, tau) for t in traces]
    ids = build_aggregation_prompt_ids(tok, p.question, tails, tau=tau)
    assert ids[:2] == [cid.bos, cid.user] and ids[-2:] == [cid.end, cid.assistant]
    # exactly C candidates, each tail verbatim, in order, after its numbered header
    text = tok.decode(ids, skip_special_tokens=False)
    assert [f"[Attempt {i}]" in text for i in range(1, C + 2)] == [True] * C + [False]
    pos = 0
    for i, t in enumerate(tails):
        header = tok.encode(f"\n\n[Attempt {i + 1}] ...", add_special_tokens=False)
        h = find(ids, header, pos)
        assert h >= 0 and ids[h + len(header): h + len(header) + len(t)] == t
        pos = h + len(header) + len(t)
    # the problem is intact: its ids appear contiguously, once, after every tail (right before the answer)
    q = tok.encode(p.question, add_special_tokens=False)
    at = find(ids, q, pos)
    assert at >= pos and find(ids, q, at + 1) == -1
    # exact length by construction, and the text rendering is the same prompt (ASCII content: decodes identically)
    assert len(ids) == len(q) + sum(map(len, tails)) + fixed_overhead(tok, C)
    assert build_aggregation_prompt_text(tok, p.question, tails) == text
    assert text.count(p.question) == 1 and "\\boxed{}" in text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 12), tau=st.integers(1, 64), data=st.data())
def test_length_bound_holds_for_random_sizes(tok, k, tau, data):
    """|prompt| <= |problem| + K*tau + fixed_overhead(K) for any tails of at most tau tokens (here with equality on
    the actual tail lengths), whatever their content (think markers included)."""
    cid = chat_ids(tok)
    ok_ids = st.one_of(st.integers(9, len(tok) - 1), st.sampled_from([cid.think, cid.end_think]))
    tails = data.draw(st.lists(st.lists(ok_ids, max_size=tau), min_size=k, max_size=k))
    problem = data.draw(st.text(alphabet="abc 0123+=?.", min_size=1, max_size=60).filter(str.strip))
    ids = build_aggregation_prompt_ids(tok, problem, tails, tau=tau)
    n_problem = len(tok.encode(problem, add_special_tokens=False))
    assert len(ids) == n_problem + sum(map(len, tails)) + fixed_overhead(tok, k)
    assert len(ids) <= n_problem + k * tau + fixed_overhead(tok, k)


def test_prompt_bad_input(tok):
    cid = chat_ids(tok)
    with pytest.raises(ValueError, match="problem is empty"):
        build_aggregation_prompt_ids(tok, "  ", [[10]])
    with pytest.raises(ValueError, match="no tails"):
        build_aggregation_prompt_ids(tok, "Compute 1+1.", [])
    with pytest.raises(ValueError, match="tail 1 has 5 tokens, longer than tau=4"):
        build_aggregation_prompt_ids(tok, "Compute 1+1.", [[10], [10] * 5], tau=4)
    with pytest.raises(ValueError, match="tau must be a positive int"):
        build_aggregation_prompt_ids(tok, "Compute 1+1.", [[10]], tau=0)
    with pytest.raises(ValueError, match="turn-structure token"):
        build_aggregation_prompt_ids(tok, "Compute 1+1.", [[10, cid.end]])
    with pytest.raises(ValueError, match="positive int"):
        fixed_overhead(tok, 0)


def test_completion_trace_and_candidate_tail(tok):
    cid = chat_ids(tok)
    body = tok.encode("<think>1+2=3</think>\\boxed{3}", add_special_tokens=False)
    comp = body + [cid.end, cid.pad, cid.pad]
    assert completion_trace(tok, comp) == body
    assert candidate_tail(tok, comp, 4) == body[-4:]


def loss_part(ex):
    ids, mask = ex
    assert len(ids) == len(mask)
    first = mask.index(1)
    assert all(mask[first:]) and not any(mask[:first])   # one contiguous target span at the end
    return ids[:first], ids[first:]


def test_expert_examples(tok, problems):
    cid = chat_ids(tok)
    C, tau, stats = 4, 12, {}
    exs = expert_aggregation_examples(problems, C, tau, tok, random.Random(0), p_correct=0.5, stats=stats)
    assert len(exs) == len(problems) == stats["examples"]
    # right and wrong candidates are mixed (p_correct=0.5 over 96 candidates: 0 or 96 correct has prob ~1e-29)
    assert 0 < stats["correct_candidates"] < stats["candidates"] == C * len(problems)
    for p, ex in zip(problems, exs):
        prompt, target = loss_part(ex)
        assert prompt[-1] == cid.assistant and prompt[:2] == [cid.bos, cid.user]
        # loss exactly on the aggregation response (check the candidates shown, keep the first that checks out,
        # else solve) and its closing <|end|>; it always ends at the gold answer
        shown = re.findall(r"\\boxed\{(-?\d+)\}", tok.decode(prompt, skip_special_tokens=False))
        if len(shown) == C:
            assert target == tok.encode(aggregation_response(p, shown), add_special_tokens=False) + [cid.end]
        assert tok.decode(target).endswith(f"\\boxed{{{p.answer}}}<|end|>")
        text = tok.decode(prompt, skip_special_tokens=False)
        assert f"[Attempt {C}]" in text and f"[Attempt {C + 1}]" not in text and p.question in text
        assert len(prompt) <= len(tok.encode(p.question, add_special_tokens=False)) + C * tau + fixed_overhead(tok, C)
    # deterministic given the rng seed
    assert expert_aggregation_examples(problems, C, tau, tok, random.Random(0)) == exs


def test_expert_examples_window(tok, problems):
    """max_len: AP-trims the target's thinking (answer kept) instead of truncating; impossible windows fail at once."""
    C, tau = 2, 8
    full = expert_aggregation_examples(problems, C, tau, tok, random.Random(1))
    max_len = min(len(ids) for ids, _ in full) - 3
    stats = {}
    exs = expert_aggregation_examples(problems, C, tau, tok, random.Random(1), max_len=max_len, stats=stats)
    assert stats["examples"] + stats.get("dropped", 0) == len(problems) and stats["examples"] > 0
    for p, (ids, mask) in zip(problems, exs):
        assert len(ids) <= max_len
        assert tok.decode(ids).endswith(f"</think>\\boxed{{{p.answer}}}<|end|>")
    with pytest.raises(ValueError, match=r"do not fit the window max_len=50"):
        expert_aggregation_examples(problems, 4, 16, tok, random.Random(0), max_len=50)
    with pytest.raises(ValueError, match="number of candidates C"):
        expert_aggregation_examples(problems, 0, 16, tok, random.Random(0))
    with pytest.raises(ValueError, match="tau must be a positive int"):
        expert_aggregation_examples(problems, 2, 0, tok, random.Random(0))


def test_self_examples(tok, problems):
    cid = chat_ids(tok)
    C, tau, seen = 3, 10, []

    def sample_fn(prompts):
        """Stands in for the current checkpoint: wrong or right rollouts ending in <|end|> and batch padding."""
        seen.extend(prompts)
        rng = random.Random(len(prompts))
        out = []
        for j in range(len(prompts)):
            p = problems[j // C]
            out.append(tok.encode(corrupt_rollout(p, rng, 0.7), add_special_tokens=False) + [cid.end, cid.pad])
        return out

    def verify(p, text):
        return text.endswith(f"\\boxed{{{p.answer}}}")

    stats = {}
    exs = self_aggregation_examples(problems, C, tau, tok, sample_fn, verify_fn=verify, rng=random.Random(0),
                                    stats=stats)
    # one batched call with C plain chat prompts per problem, problem-major
    assert seen == [encode_chat(tok, p.question)[0] for p in problems for _ in range(C)]
    assert len(exs) == len(problems) and stats["candidates"] == C * len(problems)
    assert 0 < stats["verified_correct"] < C * len(problems)  # the model's own right AND wrong samples
    for p, ex in zip(problems, exs):
        prompt, target = loss_part(ex)
        assert cid.end not in prompt[:-2] and cid.pad not in prompt       # tails cut before <|end|> and padding
        assert tok.decode(target).endswith(f"\\boxed{{{p.answer}}}<|end|>")  # target is a correct response
    # the target checks the candidates it was shown (the answers readable in their tails), whatever the verifier
    again = self_aggregation_examples(problems, C, tau, tok, sample_fn)
    for p, ex in zip(problems, again):
        prompt, target = loss_part(ex)
        text = tok.decode(target, skip_special_tokens=False)
        shown = [a for a in re.findall(r"\\boxed\{(-?\d+)\}", tok.decode(prompt, skip_special_tokens=False))]
        assert text == aggregation_response(p, shown) + "<|end|>" or len(shown) < C  # a tail may cut its answer
        if p.task in FORWARD_CHECKED:  # agreeing candidates kept, or the names, one solve, then the comparisons
            assert " agree. " in text or (text.startswith("<think>A1 ") and f" differ. {p.cot} A1 " in text)
        else:
            assert text.startswith("<think>A1 ") or p.task not in CHECKERS
    with pytest.raises(ValueError, match="returned 1 completions"):
        self_aggregation_examples(problems, C, tau, tok, lambda prompts: [[10]])


def test_mix_ratio():
    plain = [([1, i], [0, 1]) for i in range(300)]
    agg = [([2, i], [0, 1]) for i in range(100)]
    mixed, info = mix_sft_with_aggregation(plain, agg, 0.25, seed=3)
    assert info["plain"] == 300 and info["aggregation"] == 100 and info["ratio"] == 0.25
    assert sorted(mixed) == sorted(plain + agg)                       # each sample once, nothing invented
    assert mix_sft_with_aggregation(plain, agg, 0.25, seed=3)[0] == mixed          # deterministic
    assert mix_sft_with_aggregation(plain, agg, 0.25, seed=4)[0] != mixed
    # too few aggregation examples for 50/50: plain is subsampled so the ratio holds
    mixed, info = mix_sft_with_aggregation(plain, agg, 0.5, seed=0)
    assert info["aggregation"] == 100 and info["plain"] == 100 and len(mixed) == 200
    assert mix_sft_with_aggregation(plain, agg, 0.0)[1]["aggregation"] == 0
    assert mix_sft_with_aggregation(plain, agg, 1.0)[1]["plain"] == 0
    with pytest.raises(ValueError, match="ratio must be in"):
        mix_sft_with_aggregation(plain, agg, 1.5)


def test_expert_examples_with_later_round_candidates(tok, problems):
    """later_round_frac=1: every candidate is written as an aggregation round writes it (checks, then an answer);
    0 leaves the plain candidates (and the rng stream) exactly as before."""
    C, tau = 2, 40
    plain = expert_aggregation_examples(problems, C, tau, tok, random.Random(5))
    assert expert_aggregation_examples(problems, C, tau, tok, random.Random(5), later_round_frac=0.0) == plain
    later = expert_aggregation_examples(problems, C, tau, tok, random.Random(5), later_round_frac=1.0)
    texts = [tok.decode(loss_part(ex)[0], skip_special_tokens=False) for ex in later]
    assert len(later) == len(problems) and later != plain
    assert sum(bool(re.search(r"ok\. →|solve: ", t)) for t in texts) >= len(texts) // 2  # endings of checks
    with pytest.raises(ValueError, match="later_round_frac"):
        expert_aggregation_examples(problems, C, tau, tok, random.Random(5), later_round_frac=2.0)

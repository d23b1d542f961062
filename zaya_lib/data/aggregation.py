"""Aggregation examples and the ONE aggregation-prompt builder, shared by SFT data and Markovian RSA at test time.

Markovian RSA (spec test_time_compute_and_rl.md §3) carries only the last tau tokens of each candidate trace between
rounds; an aggregation call sees the problem and K (here C) such tails and writes a new solution. ZAYA1 folds examples
of this workflow into SFT (issue 5): expert-aggregation (candidates from a stronger source; here the programmatic
solvers of `zaya_lib.data.tasks`, right or with realistic mistakes) and self-aggregation (candidates sampled from the
current checkpoint).

Notable features:
- `build_aggregation_prompt_ids` concatenates pre-tokenised fixed pieces of wording with the problem ids and the tail
  ids; tails are never re-tokenised, so each tail appears in the prompt verbatim and
  `len(prompt) == len(problem_ids) + sum(len(t) for t in tails) + fixed_overhead(tokenizer, k)` holds exactly, by
  construction, whatever the round. `build_aggregation_prompt_text` renders the same pieces as a string (for
  display or text-only backends; the ids are authoritative, since re-tokenising decoded text can merge differently).
- Our own wording (the RSA template's structure: instruction, problem, numbered candidates, closing line), with the
  answer format `\\boxed{}` that the answer rule reads (`zaya_lib.data.answers`); candidates are called "endings"
  because they are tails.
- Tails are cut from the completion trace (everything the model wrote before `<|end|>`), so they may carry `<think>`
  / `</think>` but never a turn marker; the builder rejects turn-structure tokens inside a tail.
- Example builders return SFT samples `(ids, loss_mask)` with loss on the target response and its closing `<|end|>`
  only; with `max_len` the target is answer-preservingly trimmed (`zaya_lib.data.trimming`), never truncated.
- `mix_sft_with_aggregation` mixes plain SFT samples and aggregation examples at an exact, seeded ratio.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from zaya_lib.data.answers import extract_answer
from zaya_lib.data.tasks import Problem, aggregation_response, aggregation_rollout, corrupt_rollout
from zaya_lib.data.tokenizer import ChatIds, chat_ids, encode_chat, encode_text
from zaya_lib.data.trimming import EncodedSample, EncodedTurn, split_thinking, trim

__all__ = [
    "tail", "completion_trace", "candidate_tail", "fixed_overhead", "build_aggregation_prompt_ids",
    "build_aggregation_prompt_text", "aggregation_sft_example", "expert_aggregation_examples",
    "self_aggregation_examples", "mix_sft_with_aggregation",
]

Sample = tuple[list[int], list[int]]  # (ids, loss_mask)

# Fixed wording, in pieces. The prompt is:
#   <bos><|user|> INTRO(k) [ HEADER(i) tail_i ]*k PROBLEM_HEAD problem CLOSING <|end|><|assistant|>
# The problem comes LAST, right before the answer: an aggregator that checks candidates copies the problem's numbers,
# and with the problem first the tiny model copied digits from the tails in between instead (measured, issue 18).
# Kept short on purpose: the wording is paid in every aggregation call, and the tiny profile's contexts are small.
_INTRO = "Below are the endings of {k} earlier attempts at a problem; any of them may be wrong."
_HEADER = "\n\n[Attempt {i}] ..."
_PROBLEM_HEAD = "\n\nProblem:\n"
_CLOSING = "\n\nCheck the attempts, reason step by step, and give the final answer in \\boxed{}."


def _pieces(tokenizer: Any, k: int, ids: ChatIds) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    """Token ids of the fixed pieces for k tails: (head, headers[k], problem head, closing + turn switch)."""
    head = [ids.bos, ids.user] + encode_text(tokenizer, _INTRO.format(k=k))
    headers = [encode_text(tokenizer, _HEADER.format(i=i + 1)) for i in range(k)]
    prob = encode_text(tokenizer, _PROBLEM_HEAD)
    close = encode_text(tokenizer, _CLOSING) + [ids.end, ids.assistant]
    return head, headers, prob, close


def tail(ids: Sequence[int], tau: int) -> list[int]:
    """Exactly the last `tau` token ids of a trace (the whole trace if it is shorter). `tau` must be positive."""
    if not isinstance(tau, int) or isinstance(tau, bool) or tau <= 0:
        raise ValueError(f"tail length tau must be a positive int, got {tau!r}")
    return list(ids[-tau:])


def completion_trace(tokenizer: Any, completion_ids: Sequence[int]) -> list[int]:
    """What a candidate wrote: its ids up to (not including) the first `<|end|>`, with padding removed.

    Generation stops at `<|end|>`; anything after it (padding of a batch) is not part of the trace.
    """
    ids = chat_ids(tokenizer)
    out = []
    for t in completion_ids:
        if t == ids.end:
            break
        if t != ids.pad:
            out.append(int(t))
    return out


def candidate_tail(tokenizer: Any, completion_ids: Sequence[int], tau: int) -> list[int]:
    """The tail Markovian RSA carries: the last `tau` ids of `completion_trace(completion_ids)`."""
    return tail(completion_trace(tokenizer, completion_ids), tau)


def fixed_overhead(tokenizer: Any, k: int) -> int:
    """Tokens of wording and chat markers in an aggregation prompt with `k` tails (everything but problem and tails)."""
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"number of tails k must be a positive int, got {k!r}")
    head, headers, prob, close = _pieces(tokenizer, k, chat_ids(tokenizer))
    return len(head) + sum(map(len, headers)) + len(prob) + len(close)


def _validate(problem: str, tails: Sequence[Sequence[int]], tau: int | None, ids: ChatIds) -> None:
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("aggregation prompt: the problem is empty")
    if len(tails) == 0:
        raise ValueError("aggregation prompt: no tails given (need at least one candidate)")
    if tau is not None and (not isinstance(tau, int) or tau <= 0):
        raise ValueError(f"aggregation prompt: tail length tau must be a positive int, got {tau!r}")
    structural = {ids.pad, ids.bos, ids.eos, ids.system, ids.user, ids.assistant, ids.end}
    for i, t in enumerate(tails):
        if tau is not None and len(t) > tau:
            raise ValueError(f"aggregation prompt: tail {i} has {len(t)} tokens, longer than tau={tau}")
        bad = sorted({int(x) for x in t} & structural)
        if bad:
            raise ValueError(f"aggregation prompt: tail {i} contains turn-structure token ids {bad}; "
                             "cut tails from completion_trace() / candidate_tail()")


def build_aggregation_prompt_ids(tokenizer: Any, problem: str, tails: Sequence[Sequence[int]],
                                 tau: int | None = None) -> list[int]:
    """Chat-formatted aggregation prompt ids, ending with `<|assistant|>`:
    `<bos><|user|>{intro}([Attempt i] ...{tail_i})*k{problem head}{problem}{closing}<|end|><|assistant|>`.

    Length = len(problem ids) + sum of tail lengths + fixed_overhead(tokenizer, len(tails)), exactly.
    With `tau`, a tail longer than tau is an error.
    """
    ids = chat_ids(tokenizer)
    _validate(problem, tails, tau, ids)
    head, headers, prob, close = _pieces(tokenizer, len(tails), ids)
    out = list(head)
    for h, t in zip(headers, tails):
        out += h + [int(x) for x in t]
    return out + prob + encode_text(tokenizer, problem) + close


def build_aggregation_prompt_text(tokenizer: Any, problem: str, tails: Sequence[Sequence[int]],
                                  tau: int | None = None) -> str:
    """The same prompt as text (tails decoded with their special tokens): for display and text-only backends."""
    ids = chat_ids(tokenizer)
    _validate(problem, tails, tau, ids)
    k = len(tails)
    body = "".join(_HEADER.format(i=i + 1) + tokenizer.decode([int(x) for x in t], skip_special_tokens=False)
                   for i, t in enumerate(tails))
    return f"<bos><|user|>{_INTRO.format(k=k)}{body}{_PROBLEM_HEAD}{problem}{_CLOSING}<|end|><|assistant|>"


# ---------------------------------------------------------------------------------------------------------------
# SFT examples

def aggregation_sft_example(tokenizer: Any, problem: str, tails: Sequence[Sequence[int]], target: str,
                            tau: int | None = None, max_len: int | None = None) -> Sample | None:
    """(ids, loss_mask) = aggregation prompt + `target` response + `<|end|>`, loss on the target and `<|end|>` only.

    With `max_len`, an example that does not fit is AP-trimmed (the tail of the target's thinking goes first, the
    answer stays whole); None if even the prompt and the answer alone exceed `max_len`.
    """
    ids = chat_ids(tokenizer)
    prompt = build_aggregation_prompt_ids(tokenizer, problem, tails, tau)
    thinking, answer = split_thinking(target)
    # The prompt (up to, not including, <|assistant|>) is one fixed turn; the target is the assistant turn.
    sample = EncodedSample([
        EncodedTurn(prefix=[], content=prompt[:-1], suffix=[]),
        EncodedTurn(prefix=[ids.assistant], content=encode_text(tokenizer, answer), suffix=[ids.end],
                    thinking=None if thinking is None else encode_text(tokenizer, thinking), loss=True),
    ], think=ids.think, end_think=ids.end_think)
    if max_len is None:
        return sample.render()
    r = trim(sample, max_len)
    return None if r.ids is None else (r.ids, r.loss_mask)


def _tail_answer(tokenizer: Any, tail_ids: Sequence[int]) -> str | None:
    """The final answer an aggregator can read in a tail (the project's answer rule on the decoded tail)."""
    return extract_answer(tokenizer.decode([int(x) for x in tail_ids], skip_special_tokens=False))


def _check_common(C: int, tau: int, tokenizer: Any, max_len: int | None) -> None:
    if not isinstance(C, int) or C <= 0:
        raise ValueError(f"number of candidates C must be a positive int, got {C!r}")
    if not isinstance(tau, int) or tau <= 0:
        raise ValueError(f"tail length tau must be a positive int, got {tau!r}")
    if max_len is not None:
        # Fail at once (issue 5) when C full tails and the wording alone leave no room for problem and answer.
        need = fixed_overhead(tokenizer, C) + C * tau
        if need >= max_len:
            raise ValueError(f"C={C} tails of tau={tau} tokens plus {fixed_overhead(tokenizer, C)} tokens of wording "
                             f"({need}) do not fit the window max_len={max_len}; lower C or tau, or raise max_len")


def _record(stats: dict | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + n


def _keep(out: list[Sample], example: Sample | None, stats: dict | None) -> None:
    """Append an example that fits (counted in `examples`); one that did not fit `max_len` is counted in `dropped`."""
    _record(stats, "dropped" if example is None else "examples")
    if example is not None:
        out.append(example)


def expert_aggregation_examples(problems: Sequence[Problem], C: int, tau: int, tokenizer: Any, rng: random.Random,
                                p_correct: float = 0.5, max_len: int | None = None,
                                stats: dict | None = None, later_round_frac: float = 0.0) -> list[Sample]:
    """Expert-aggregation SFT examples: per problem, C candidates from the programmatic solver, each correct
    (`Problem.response()`) with probability `p_correct` or else a rollout with one realistic mistake
    (`corrupt_rollout`), so examples range from all-wrong to all-right; a fraction `later_round_frac` of the
    candidates are written as an earlier aggregation round would write them (`tasks.aggregation_rollout`). Their
    tails (last tau ids) go into the aggregation prompt; the target checks the answers shown
    (`tasks.aggregation_response`). `stats` (optional dict) receives counts: examples, dropped (did not fit
    max_len), correct_candidates, candidates.
    """
    _check_common(C, tau, tokenizer, max_len)
    if not 0.0 <= p_correct <= 1.0:
        raise ValueError(f"p_correct must be in [0, 1], got {p_correct}")
    if not 0.0 <= later_round_frac <= 1.0:
        raise ValueError(f"later_round_frac must be in [0, 1], got {later_round_frac}")
    out = []
    for p in problems:
        cands, n_ok = [], 0
        for _ in range(C):
            ok = rng.random() < p_correct
            n_ok += ok
            if later_round_frac > 0 and rng.random() < later_round_frac:  # written by an earlier aggregation round
                cands.append(aggregation_rollout(p, rng, ok))
            else:
                cands.append(p.response() if ok else corrupt_rollout(p, rng, error_rate=1.0))
        # response text -> the ids a model would have written (think markers become their single ids)
        tails = [tail(encode_text(tokenizer, c), tau) for c in cands]
        target = aggregation_response(p, [_tail_answer(tokenizer, t) for t in tails])
        ex = aggregation_sft_example(tokenizer, p.question, tails, target, tau=tau, max_len=max_len)
        _record(stats, "candidates", C)
        _record(stats, "correct_candidates", n_ok)
        _keep(out, ex, stats)
    return out


def self_aggregation_examples(problems: Sequence[Problem], C: int, tau: int, tokenizer: Any,
                              sample_fn: Callable[[list[list[int]]], list[Sequence[int]]],
                              verify_fn: Callable[[Problem, str], bool] | None = None,
                              rng: random.Random | None = None, max_len: int | None = None,
                              stats: dict | None = None) -> list[Sample]:
    """Self-aggregation SFT examples: C candidates per problem sampled from the current checkpoint.

    `sample_fn(prompts)` gets every plain chat prompt (`<bos><|user|>{question}<|end|><|assistant|>` ids; C per
    problem, problem-major) in one call and returns one completion (ids) per prompt; any callable will do.
    The target is the gold response, unless `verify_fn(problem, completion_text) -> bool` is given and some
    candidate verified correct: then one of those (chosen with `rng`) is the target, an on-policy correct trace.
    `stats` (optional dict) receives: examples, dropped, candidates, verified_correct, sampled_targets.
    """
    _check_common(C, tau, tokenizer, max_len)
    rng = rng or random.Random(0)
    prompts = [encode_chat(tokenizer, p.question)[0] for p in problems for _ in range(C)]
    completions = list(sample_fn(prompts))
    if len(completions) != len(prompts):
        raise ValueError(f"sample_fn returned {len(completions)} completions for {len(prompts)} prompts")
    out = []
    for j, p in enumerate(problems):
        traces = [completion_trace(tokenizer, c) for c in completions[j * C:(j + 1) * C]]
        tails = [tail(t, tau) for t in traces]
        # The target checks the candidates the model itself wrote (right and wrong ones) and keeps the first that
        # checks out, else solves afresh (`tasks.aggregation_response`).
        target = aggregation_response(p, [_tail_answer(tokenizer, t) for t in tails])
        _record(stats, "candidates", C)
        if verify_fn is not None:
            texts = [tokenizer.decode(t, skip_special_tokens=False) for t in traces]
            _record(stats, "verified_correct", sum(bool(verify_fn(p, t)) for t in texts))
        _keep(out, aggregation_sft_example(tokenizer, p.question, tails, target, tau=tau, max_len=max_len), stats)
    return out


def mix_sft_with_aggregation(plain: Sequence[Sample], aggregation: Sequence[Sample], ratio: float,
                             seed: int = 0) -> tuple[list[Sample], dict]:
    """Shuffle plain SFT samples and aggregation examples together so that aggregation examples are a fraction
    `ratio` of the mix (params: e.g. 0.5 as in RSA's 50/50 guess), using as much of both as the ratio allows.

    Returns (mixed samples, info with counts and the realised ratio). Deterministic given `seed`.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"aggregation ratio must be in [0, 1], got {ratio}")
    rng = random.Random(seed)
    if ratio == 0.0:
        n_plain, n_agg = len(plain), 0
    elif ratio == 1.0:
        n_plain, n_agg = 0, len(aggregation)
    else:
        # the largest (n_plain, n_agg) with n_agg / (n_plain + n_agg) ~= ratio within the available data
        n_agg = min(len(aggregation), round(len(plain) * ratio / (1 - ratio)))
        # too little of either for even one aggregation example: keep the plain data, realised ratio 0
        n_plain = min(len(plain), round(n_agg * (1 - ratio) / ratio)) if n_agg else len(plain)
    if n_plain + n_agg == 0:
        raise ValueError(f"nothing to mix: {len(plain)} plain samples, {len(aggregation)} aggregation examples, "
                         f"ratio={ratio}")
    mixed = rng.sample(list(plain), n_plain) + rng.sample(list(aggregation), n_agg)
    rng.shuffle(mixed)
    info = {"plain": n_plain, "aggregation": n_agg, "ratio": n_agg / (n_plain + n_agg),
            "plain_unused": len(plain) - n_plain, "aggregation_unused": len(aggregation) - n_agg}
    return mixed, info

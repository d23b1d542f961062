"""Where one aggregation round gains or loses accuracy: a per-task breakdown of a Markovian RSA round 1 (issue 18).

Markovian RSA improves on its round 0 only if an aggregation call is right more often than a fresh sample. This module
runs round 0 (N samples per problem) and ONE aggregation round through `zaya_lib.ttc.rsa.run_rsa` itself (T=2, its
`on_calls` hook hands over each call and the members it was shown), then splits the aggregation calls by what they were shown
and reads the checks the aggregator wrote (`zaya_lib.data.tasks.parse_verdicts`):

- composition of the K candidates: all right, mixed, all wrong; the aggregator's accuracy in each (all right: it should
  keep the answer; mixed: its checks must pick the right one; all wrong: only its own fall-back solve can help);
- its verdicts against the true verdict of the value it checked (`check_candidate`): right, a right candidate
  rejected, a wrong one accepted; and whether the value it checked is a candidate's answer (copy fidelity);
- fall-back solves (responses containing `solve:`) and how often they are right.

`aggregation_breakdown` needs `Problem`s (the task picks the checker). Output: a dict per task and for all tasks;
`format_breakdown` renders it as a table.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from zaya_lib.data.answers import extract_answer
from zaya_lib.data.tasks import check_candidate, parse_verdicts
from zaya_lib.ttc.backends import Backend
from zaya_lib.ttc.rsa import judge_answer, run_rsa

__all__ = ["aggregation_breakdown", "format_breakdown"]

_KEYS = ("calls", "right", "r0_samples", "r0_right", "all_right", "all_right_ok", "mixed", "mixed_ok", "all_wrong",
         "all_wrong_ok", "verdicts", "verdicts_right", "rejected_right", "accepted_wrong", "checked_a_candidate",
         "solves", "solves_right")


def aggregation_breakdown(backend: Backend, tokenizer: Any, problems: Sequence[Any], N: int, K: int, tau: int,
                          max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0,
                          round_index: int = 1) -> dict:
    """Markovian RSA up to round `round_index` (default 1: round 0 and one aggregation round) on `problems`; the
    calls of that round are broken down per task (see the module docstring) against the population they were shown,
    the round before. A later round (2, 3, ...) shows how an aggregator does on candidates that were themselves
    aggregation calls.

    Returns {"tasks": {task: counts}, "all": counts, "params": ...}; counts hold `_KEYS` plus the derived rates
    `r0_acc` (the population shown: round `round_index - 1`), `r1_acc` (round `round_index`), `all_right_acc`,
    `mixed_acc`, `all_wrong_acc`, `verdict_acc`, `solve_acc` (None when undefined)."""
    if not problems:
        raise ValueError("aggregation breakdown: no problems given")
    missing = [i for i, p in enumerate(problems) if not hasattr(p, "task")]
    if missing:
        raise ValueError(f"aggregation breakdown: problem {missing[0]} has no task (needs zaya_lib.data.tasks.Problem)")
    if not (isinstance(K, int) and isinstance(N, int) and 1 <= K <= N):
        raise ValueError(f"aggregation breakdown: need 1 <= K <= N, got N={N!r}, K={K!r}")
    if not (isinstance(tau, int) and tau > 0):
        raise ValueError(f"aggregation breakdown: tau must be a positive int, got {tau!r}")
    if not (isinstance(round_index, int) and not isinstance(round_index, bool) and round_index >= 1):
        raise ValueError(f"aggregation breakdown: round_index must be an int >= 1, got {round_index!r}")
    calls: dict[int, tuple] = {}
    run_rsa(backend, tokenizer, problems, N, K, round_index + 1, tau, max_new_tokens, temperature=temperature,
            top_p=top_p, seed=seed, on_calls=lambda t, comps, members: calls.__setitem__(t, (comps, members)))
    (r0, _), (r1, members) = calls[round_index - 1], calls[round_index]
    shown = [(j // N, [extract_answer(r0[(j // N) * N + m].text) for m in mem]) for j, mem in enumerate(members)]
    tasks: dict[str, Counter] = {}
    for i, p in enumerate(problems):
        c = tasks.setdefault(p.task, Counter())
        c["r0_samples"] += N
        c["r0_right"] += sum(bool(judge_answer(extract_answer(x.text), p.answer)) for x in r0[i * N:(i + 1) * N])
    for (i, answers), comp in zip(shown, r1):
        p = problems[i]
        c = tasks[p.task]
        ok = [bool(judge_answer(a, p.answer)) for a in answers]
        kind = "all_right" if all(ok) else "all_wrong" if not any(ok) else "mixed"
        right = bool(judge_answer(extract_answer(comp.text), p.answer))
        c["calls"] += 1
        c["right"] += right
        c[kind] += 1
        c[kind + "_ok"] += right
        for idx, value, _trace, verdict in parse_verdicts(comp.text):
            truth = bool(check_candidate(p, str(value))[1])
            c["verdicts"] += 1
            c["verdicts_right"] += verdict == truth
            c["rejected_right"] += truth and not verdict
            c["accepted_wrong"] += verdict and not truth
            c["checked_a_candidate"] += 1 <= idx <= len(answers) and answers[idx - 1] is not None \
                and answers[idx - 1].strip() == str(value)
        if "solve:" in comp.text:
            c["solves"] += 1
            c["solves_right"] += right
    total = Counter()
    for c in tasks.values():
        total.update(c)
    return {"params": dict(N=N, K=K, tau=tau, seed=seed, problems=len(problems), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, round_index=round_index),
            "tasks": {t: _rates(c) for t, c in tasks.items()}, "all": _rates(total)}


def _rates(c: Counter) -> dict:
    out = {k: int(c[k]) for k in _KEYS}
    div = lambda a, b: out[a] / out[b] if out[b] else None  # noqa: E731
    out.update(r0_acc=div("r0_right", "r0_samples"), r1_acc=div("right", "calls"),
               all_right_acc=div("all_right_ok", "all_right"), mixed_acc=div("mixed_ok", "mixed"),
               all_wrong_acc=div("all_wrong_ok", "all_wrong"), verdict_acc=div("verdicts_right", "verdicts"),
               solve_acc=div("solves_right", "solves"))
    return out


def format_breakdown(b: dict) -> str:
    """A markdown table of `aggregation_breakdown`'s result, one row per task and one for all."""
    f = lambda ok, n: f"{ok}/{n}" if n else "-"  # noqa: E731
    r = b.get("params", {}).get("round_index", 1)
    rows = [f"| task | round {r - 1} | round {r} (aggregated) | all right kept | mixed resolved | all wrong fixed | verdicts right | "
            "right rejected | wrong accepted | fall-back solves right |", "|" + "---|" * 10]
    for name, c in list(b["tasks"].items()) + [("all", b["all"])]:
        rows.append(f"| {name} | {c['r0_acc']:.3f} | {c['r1_acc']:.3f} | {f(c['all_right_ok'], c['all_right'])} | "
                    f"{f(c['mixed_ok'], c['mixed'])} | {f(c['all_wrong_ok'], c['all_wrong'])} | "
                    f"{f(c['verdicts_right'], c['verdicts'])} | {c['rejected_right']} | {c['accepted_wrong']} | "
                    f"{f(c['solves_right'], c['solves'])} |")
    return "\n".join(rows)

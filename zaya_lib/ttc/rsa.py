"""Markovian RSA, plain RSA and self-consistency on any generation backend (issue 7; spec test_time_compute_and_rl.md
sections 1-3).

Markovian RSA (N population, K subset, T rounds, tau tail tokens, B tokens per call):
    round 0:   P = N answers to the plain chat prompt of the problem
    round t:   for each of N calls, K DISTINCT members of P (sampled without replacement); the call sees the problem
               and the last tau token ids of each of their traces, through the ONE prompt builder
               `zaya_lib.data.aggregation.build_aggregation_prompt_ids`; the N answers replace P (no elitism)
    answer:    majority vote over the extracted answers of the final population
Plain RSA is the same loop carrying whole traces (tau = None); its prompts grow with the traces it carries.

Notable features:
- The context bound holds by construction: every aggregation prompt is exactly
  len(problem ids) + sum(len(tail)) + fixed_overhead(K) <= len(problem ids) + K * tau + fixed_overhead(K), and each
  call asserts it (a violation is a bug, reported with the numbers).
- All problems of a round go to the backend in ONE call (N * P prompts), so the engine batches across problems.
- Per round: mean accuracy over the population, pass@N, majority-vote accuracy, cumulative tokens generated (the stop
  token counts), the longest prompt and the longest context (prompt + completion) any call saw.
- Traces are what a member wrote before `<|end|>`, minus any turn-structure token it emitted by mistake.
- Answers are extracted and judged by `zaya_lib.data.answers` (the project's one answer rule).
- Fails clearly: K > N, N/K/T/tau/budget not positive, an empty problem -> ValueError before any generation; a
  backend failing mid-run -> `RSAError` whose `.partial` holds every finished round; with `out_path`, the result is
  rewritten atomically after each round, so a crash keeps the finished rounds on disk too.
- Baselines on the same budget: `self_consistency` (M independent samples; majority vote over the first n for every
  n, with tokens spent, so any RSA round can be matched at equal tokens; n = 1 is the single-sample baseline).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from zaya_lib.data.aggregation import build_aggregation_prompt_ids, completion_trace, fixed_overhead, tail
from zaya_lib.data.answers import extract_answer, math_equal
from zaya_lib.data.tokenizer import chat_ids, encode_chat, encode_text
from zaya_lib.ttc.backends import Backend, Completion
from zaya_lib.utils import atomic_write_json

__all__ = ["RoundStats", "RSAResult", "RSAError", "run_rsa", "majority_answer", "self_consistency",
           "SelfConsistencyResult", "judge_answer", "compare_at_equal_tokens"]


def judge_answer(answer: str | None, gold: Any) -> bool:
    """Default judge: the answer rule's math equality on the extracted answer."""
    return math_equal(answer, gold)


def _answer_key(answer: str) -> str:
    return "".join(answer.split())


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most common extracted answer (whitespace-insensitive); None answers do not vote; ties go to the answer
    seen first. None if nobody answered."""
    keyed = [(_answer_key(a), a) for a in answers if a is not None and a.strip()]
    if not keyed:
        return None
    counts = Counter(k for k, _ in keyed)
    best = max(counts.values())
    for k, a in keyed:
        if counts[k] == best:
            return a
    return None  # unreachable


@dataclass
class RoundStats:
    round: int
    mean_acc: float  # mean over problems of the population's mean accuracy ("Pass@1" in RSA's tables)
    pass_at_n: float  # any member correct
    majority_acc: float  # majority vote of the population correct
    tokens_generated: int  # cumulative, all problems, stop tokens included
    tokens_per_problem: float  # cumulative, averaged over problems
    max_prompt_tokens: int  # the longest prompt any call of this round saw
    max_context_tokens: int  # the longest prompt + completion of this round
    prompt_bound: int | None  # Markovian bound for the longest problem: problem + K * tau + fixed wording


@dataclass
class RSAResult:
    params: dict
    rounds: list[RoundStats] = field(default_factory=list)
    # per round, per problem: did the majority vote / how many members answer correctly (for paired statistics)
    majority_correct: list[list[bool]] = field(default_factory=list)
    member_correct: list[list[int]] = field(default_factory=list)
    final_answers: list[str | None] = field(default_factory=list)
    completed: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        return {"params": self.params, "rounds": [asdict(r) for r in self.rounds],
                "majority_correct": self.majority_correct, "member_correct": self.member_correct,
                "final_answers": self.final_answers, "completed": self.completed, "error": self.error}


class RSAError(RuntimeError):
    """Generation failed mid-run; `.partial` is the `RSAResult` with every round finished before the failure."""

    def __init__(self, msg: str, partial: RSAResult):
        super().__init__(msg)
        self.partial = partial


def _check_int(name: str, v: Any, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"RSA: {name} must be an int >= {minimum}, got {v!r}")


def _questions(problems: Sequence[Any]) -> tuple[list[str], list[Any]]:
    if len(problems) == 0:
        raise ValueError("RSA: no problems given")
    qs, golds = [], []
    for i, p in enumerate(problems):
        q, g = (p.question, p.answer) if hasattr(p, "question") else (p[0], p[1])
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"RSA: problem {i} is empty")
        qs.append(q)
        golds.append(g)
    return qs, golds


def _generate(backend: Backend, prompts: list[list[int]], budget: int, temperature: float, seed: int, top_p: float,
              result: RSAResult, what: str) -> list[Completion]:
    try:
        comps = backend.generate(prompts, max_new_tokens=budget, temperature=temperature, seed=seed, top_p=top_p)
        if len(comps) != len(prompts):
            raise RuntimeError(f"backend returned {len(comps)} completions for {len(prompts)} prompts")
        return comps
    except Exception as e:
        result.error = f"{what}: {type(e).__name__}: {e}"
        raise RSAError(f"RSA failed in {what} ({len(result.rounds)} rounds finished and kept in .partial): "
                       f"{type(e).__name__}: {e}", result) from e


def run_rsa(backend: Backend, tokenizer: Any, problems: Sequence[Any], N: int, K: int, T: int, tau: int | None,
            max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
            judge: Callable[[str | None, Any], bool] = judge_answer, out_path: str | Path | None = None,
            on_round: Callable[[RoundStats], None] | None = None,
            on_calls: Callable[[int, list[Completion], list[list[int]]], None] | None = None) -> RSAResult:
    """Markovian RSA (`tau` an int) or plain RSA (`tau=None`: whole traces) over `problems`.

    problems: `zaya_lib.data.tasks.Problem`s or (question, gold answer) pairs. T counts all rounds, round 0 included
    (RSA's `loops`). `max_new_tokens` is the per-call budget. See the module docstring for what is recorded.
    `on_calls(t, completions, members)`, if given, sees every call of round t (problem-major, N per problem) and, for
    t > 0, the indices of the members whose tails each call was shown (`zaya_lib.ttc.diagnose` reads it).
    """
    _check_int("population N", N)
    _check_int("subset K", K)
    _check_int("rounds T", T)
    _check_int("per-call budget max_new_tokens", max_new_tokens)
    if tau is not None:
        _check_int("tail tau", tau)
    if K > N:
        raise ValueError(f"RSA: subset K={K} is larger than the population N={N} (K distinct members are drawn)")
    questions, golds = _questions(problems)
    mode = "plain" if tau is None else "markovian"
    result = RSAResult(params=dict(mode=mode, N=N, K=K, T=T, tau=tau, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, problems=len(questions)))
    rng = random.Random(f"rsa|{seed}")
    problem_ids = [encode_text(tokenizer, q) for q in questions]
    overhead = fixed_overhead(tokenizer, K)
    ids = chat_ids(tokenizer)
    # Turn-structure tokens a (weak) model may emit inside its answer would break the aggregation prompt's chat
    # structure; they carry no reasoning, so they are dropped from the trace before a tail is cut.
    structural = {ids.pad, ids.bos, ids.eos, ids.system, ids.user, ids.assistant, ids.end}
    traces: list[list[list[int]]] = []  # [problem][member] -> completion trace ids
    total_tokens = 0

    for t in range(T):
        shown: list[list[int]] = []
        if t == 0:
            prompts = [encode_chat(tokenizer, q)[0] for q in questions for _ in range(N)]
            bound = None
        else:
            prompts = []
            for i, q in enumerate(questions):
                for _ in range(N):
                    members = rng.sample(range(N), K)  # K distinct members, without replacement
                    shown.append(members)
                    carried = [tr if tau is None else tail(tr, tau) for tr in (traces[i][m] for m in members)]
                    p = build_aggregation_prompt_ids(tokenizer, q, carried, tau=tau)
                    if tau is not None and len(p) > len(problem_ids[i]) + K * tau + overhead:
                        raise AssertionError(f"context bound broken: prompt {len(p)} > problem {len(problem_ids[i])} "
                                             f"+ K*tau {K * tau} + wording {overhead}")
                    prompts.append(p)
            bound = None if tau is None else max(map(len, problem_ids)) + K * tau + overhead
        comps = _generate(backend, prompts, max_new_tokens, temperature, seed * 1000 + t, top_p, result,
                          f"round {t}")
        total_tokens += sum(c.num_generated for c in comps)
        if on_calls is not None:
            on_calls(t, comps, shown)
        traces, maj_ok, mem_ok, finals = [], [], [], []
        for i in range(len(questions)):
            group = comps[i * N:(i + 1) * N]
            traces.append([[x for x in completion_trace(tokenizer, c.token_ids) if x not in structural]
                           for c in group])
            answers = [extract_answer(c.text) for c in group]
            mem_ok.append(sum(judge(a, golds[i]) for a in answers))
            final = majority_answer(answers)
            finals.append(final)
            maj_ok.append(bool(judge(final, golds[i])))
        P = len(questions)
        stats = RoundStats(
            round=t, mean_acc=sum(mem_ok) / (P * N), pass_at_n=sum(m > 0 for m in mem_ok) / P,
            majority_acc=sum(maj_ok) / P, tokens_generated=total_tokens, tokens_per_problem=total_tokens / P,
            max_prompt_tokens=max(map(len, prompts)),
            max_context_tokens=max(len(p) + c.num_generated for p, c in zip(prompts, comps)), prompt_bound=bound)
        result.rounds.append(stats)
        result.majority_correct.append(maj_ok)
        result.member_correct.append(mem_ok)
        result.final_answers = finals
        if out_path is not None:
            atomic_write_json(out_path, result.to_dict())
        if on_round is not None:
            on_round(stats)
    result.completed = True
    if out_path is not None:
        atomic_write_json(out_path, result.to_dict())
    return result


@dataclass
class SelfConsistencyResult:
    """Majority vote over the first n of M independent samples, for n = 1..M (n = 1 is "single sample", averaged
    over all M samples as the expected accuracy of one sample)."""

    n: list[int]
    majority_acc: list[float]
    tokens_per_problem: list[float]  # generated tokens of the first n samples, averaged over problems
    single_sample_acc: float
    pass_at_m: float
    majority_correct: list[list[bool]]  # [n - 1][problem]

    def at_tokens(self, tokens_per_problem: float) -> tuple[int, float]:
        """(n, majority accuracy) of the largest n whose cost does not exceed `tokens_per_problem`."""
        best = 0
        for j, tok in enumerate(self.tokens_per_problem):
            if tok <= tokens_per_problem * (1 + 1e-9):
                best = j
        return self.n[best], self.majority_acc[best]


def self_consistency(backend: Backend, tokenizer: Any, problems: Sequence[Any], M: int, max_new_tokens: int,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     judge: Callable[[str | None, Any], bool] = judge_answer) -> SelfConsistencyResult:
    """M independent samples per problem with the plain chat prompt; majority vote over the first n, n = 1..M."""
    _check_int("samples M", M)
    _check_int("per-call budget max_new_tokens", max_new_tokens)
    questions, golds = _questions(problems)
    prompts = [encode_chat(tokenizer, q)[0] for q in questions for _ in range(M)]
    comps = backend.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed * 1000 + 999,
                             top_p=top_p)
    P = len(questions)
    answers = [[extract_answer(c.text) for c in comps[i * M:(i + 1) * M]] for i in range(P)]
    lens = [[c.num_generated for c in comps[i * M:(i + 1) * M]] for i in range(P)]
    ok = [[judge(a, golds[i]) for a in answers[i]] for i in range(P)]
    ns, accs, toks, maj_rows = [], [], [], []
    for n in range(1, M + 1):
        row = [bool(judge(majority_answer(answers[i][:n]), golds[i])) for i in range(P)]
        ns.append(n)
        accs.append(sum(row) / P)
        toks.append(sum(sum(lens[i][:n]) for i in range(P)) / P)
        maj_rows.append(row)
    single = sum(map(sum, ok)) / (P * M)
    return SelfConsistencyResult(ns, accs, toks, single, sum(any(r) for r in ok) / P, maj_rows)


def compare_at_equal_tokens(rsa: Sequence[RSAResult], sc: Sequence[SelfConsistencyResult], round_index: int = -1,
                            n_boot: int = 2000, seed: int = 0) -> dict:
    """RSA's majority vote after `round_index` against self-consistency's majority vote at no more generated tokens,
    paired per (seed, problem): `rsa[i]` and `sc[i]` must be runs on the same problems (seed i).

    Returns accuracies (mean and standard deviation over seeds), the paired difference with a bootstrap 95%
    interval over (seed, problem) pairs, and a verdict: "beats" / "loses to" when the interval excludes 0, else
    "is not distinguishable from".
    """
    if len(rsa) != len(sc) or not rsa:
        raise ValueError(f"need one self-consistency run per RSA run, got {len(rsa)} RSA and {len(sc)} SC")
    diffs, accs_r, accs_s, ns, toks_r, toks_s = [], [], [], [], [], []
    for r, c in zip(rsa, sc):
        rnd = r.rounds[round_index]
        n, _ = c.at_tokens(rnd.tokens_per_problem)
        row_r = r.majority_correct[round_index]
        row_s = c.majority_correct[n - 1]
        if len(row_r) != len(row_s):
            raise ValueError(f"RSA ran {len(row_r)} problems, self-consistency {len(row_s)}: not paired")
        diffs += [int(a) - int(b) for a, b in zip(row_r, row_s)]
        accs_r.append(sum(row_r) / len(row_r))
        accs_s.append(sum(row_s) / len(row_s))
        ns.append(n)
        toks_r.append(rnd.tokens_per_problem)
        toks_s.append(c.tokens_per_problem[n - 1])
    rng = random.Random(seed)
    m = len(diffs)
    boot = sorted(sum(diffs[rng.randrange(m)] for _ in range(m)) / m for _ in range(n_boot))
    lo, hi = boot[int(0.025 * n_boot)], boot[int(0.975 * n_boot) - 1]
    mean = sum(diffs) / m

    def _sd(x):
        mu = sum(x) / len(x)
        return (sum((v - mu) ** 2 for v in x) / (len(x) - 1)) ** 0.5 if len(x) > 1 else 0.0

    verdict = "beats" if lo > 0 else "loses to" if hi < 0 else "is not distinguishable from"
    return {"rsa_majority_acc": sum(accs_r) / len(accs_r), "rsa_majority_acc_sd": _sd(accs_r),
            "sc_majority_acc": sum(accs_s) / len(accs_s), "sc_majority_acc_sd": _sd(accs_s),
            "sc_samples": ns, "rsa_tokens_per_problem": sum(toks_r) / len(toks_r),
            "sc_tokens_per_problem": sum(toks_s) / len(toks_s), "diff": mean, "diff_ci95": [lo, hi],
            "pairs": m, "seeds": len(rsa), "verdict": verdict}

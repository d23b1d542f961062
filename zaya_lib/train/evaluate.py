"""Held-out evaluation, the one home for every phase: loss per category and by position, pass@1 on reasoning tasks
(greedy or sampled), one Markovian aggregation round, and paired differences between checkpoints.

Notable features:
- `eval_loss` runs packed held-out windows (`TrainData`) in eval mode (no routing statistics, no balancing) and
  reports the token-mean cross entropy overall and per category.
- `loss_by_position` averages the loss at each position of long windows, in buckets: the context-extension plot
  (midtraining; a model that cannot use a longer context shows a loss that stops falling, or rises, past its
  training length).
- pass@1: every prompt is the chat generation prompt `<bos><|user|>q<|end|><|assistant|>` and every response is
  judged by the project's answer rule (`zaya_lib.data.answers.score_math`: text after the last `</think>`, last
  `\\boxed{}`; `score_texts`). The phases' variants differ only in how they generate and what they report:
  `pass_at_1` (midtraining: the engine, per task and overall with a binomial standard error; with `temperature > 0`
  and `n_samples > 1` the mean over samples, one engine call per sample), `evaluate_pass1` (SFT: the engine
  stopping at any turn-structure token, `samples` copies of each prompt in one call), `evaluate_heldout` (RL: greedy
  through `model.generate`, per problem) and `evaluate_heldout_sampled` (RL: the paper's sampled pass@1 per problem,
  the same seeded draws for every checkpoint compared).
- `evaluate_aggregation` runs one Markovian aggregation round with the project's RSA loop (k samples; k aggregation
  calls over their k tails) against a single sample and a majority vote over the same k samples, with the paired
  gain's standard error.
- `paired_difference`: after - before on the same problems, with a standard error and a bootstrap interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.answers import score_math
from ..data.tasks import Problem
from ..data.tokenizer import encode_chat, stop_ids
from ..ttc.backends import EngineBackend, generate_ids
from ..ttc.engine import Engine
from ..ttc.rsa import run_rsa

__all__ = ["eval_loss", "loss_by_position", "score_texts", "pass_at_1", "evaluate_pass1", "evaluate_heldout",
           "evaluate_heldout_sampled", "AggregationEval", "evaluate_aggregation", "paired_difference"]


# ---------------------------------------------------------------------------------------------------------------------
# loss


@torch.no_grad()
def eval_loss(model, data, batch_size: int = 16, max_windows: int | None = None, device=None) -> dict:
    """Token-mean loss over `data` (a `TrainData`), overall and per category."""
    was = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    K = len(data.categories)
    s_K = torch.zeros(K, dtype=torch.float64)
    n_K = torch.zeros(K, dtype=torch.float64)
    N = len(data) if max_windows is None else min(len(data), max_windows)
    try:
        for i in range(0, N, batch_size):
            tok = data.tokens_NT1[i:min(i + batch_size, N)]
            logits = model(input_ids=tok[:, :-1].to(dev)).logits.float()
            tl = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1).to(dev),
                                 reduction="none").double().cpu()
            mask = torch.ones_like(tl, dtype=torch.bool)
            if data.loss_mask_NT1 is not None:
                mask = data.loss_mask_NT1[i:min(i + batch_size, N)][:, 1:].reshape(-1).bool()
            c = data.category_NT1[i:min(i + batch_size, N)][:, 1:].reshape(-1)
            s_K.index_add_(0, c[mask], tl[mask])
            n_K.index_add_(0, c[mask], torch.ones_like(tl[mask]))
    finally:
        model.train(was)
    return {"loss": float(s_K.sum() / n_K.sum().clamp_min(1)),
            "per_category": {c: float(s_K[k] / n_K[k]) if n_K[k] > 0 else None for k, c in enumerate(data.categories)},
            "tokens": int(n_K.sum())}


@torch.no_grad()
def loss_by_position(model, tokens_NT1: torch.Tensor, n_buckets: int = 16, batch_size: int = 4, device=None) -> dict:
    """Mean next-token loss by position over windows [N, T+1], in `n_buckets` equal position ranges.
    Returns {"bucket_start": [...], "bucket_end": [...], "loss": [...], "per_position": [T floats]}."""
    was = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    T = tokens_NT1.shape[1] - 1
    s_T = torch.zeros(T, dtype=torch.float64)
    try:
        for i in range(0, len(tokens_NT1), batch_size):
            tok = tokens_NT1[i:i + batch_size]
            logits = model(input_ids=tok[:, :-1].to(dev)).logits.float()
            tl = F.cross_entropy(logits.transpose(1, 2), tok[:, 1:].to(dev), reduction="none")  # [b, T]
            s_T += tl.double().sum(0).cpu()
    finally:
        model.train(was)
    per_pos = (s_T / len(tokens_NT1)).tolist()
    edges = [round(j * T / n_buckets) for j in range(n_buckets + 1)]
    loss = [sum(per_pos[a:b]) / max(b - a, 1) for a, b in zip(edges[:-1], edges[1:])]
    return {"bucket_start": edges[:-1], "bucket_end": edges[1:], "loss": loss, "per_position": per_pos}


# ---------------------------------------------------------------------------------------------------------------------
# pass@1


def score_texts(texts: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    """The answer rule on each response: 1.0 where `score_math` finds the problem's answer in it, else 0.0."""
    return [score_math(t, p.answer) for t, p in zip(texts, problems)]


def _chat_prompts(tokenizer, problems: Sequence[Problem], copies: int = 1) -> list[list[int]]:
    """The chat generation prompt of every problem, `copies` times each (problem-major)."""
    return [encode_chat(tokenizer, p.question)[0] for p in problems for _ in range(copies)]


def _sampled_scores(engine: Engine, tokenizer, problems: Sequence[Problem], max_new_tokens: int, k: int,
                    temperature: float, seed: int, desc: str):
    """`k` completions per problem (problem-major) in one engine call: (their scores, the engine's output)."""
    out = engine.generate(_chat_prompts(tokenizer, problems, k), max_new_tokens, temperature=temperature, seed=seed,
                          desc=desc)
    return score_texts(out.texts, [p for p in problems for _ in range(k)]), out


def pass_at_1(model, tokenizer, problems, max_new_tokens: int = 160, temperature: float = 0.0, n_samples: int = 1,
              seed: int = 0, batch_size: int = 64) -> dict:
    """pass@1 of `model` on `problems` (`zaya_lib.data.tasks.Problem`s), overall and per task (mean +- binomial s.e.).

    Each prompt is the chat generation prompt; a response is judged by `score_math` on its final boxed answer."""
    if not problems:
        raise ValueError("pass_at_1 needs at least one problem")
    if n_samples < 1 or (n_samples > 1 and temperature == 0.0):
        raise ValueError(f"n_samples={n_samples} needs temperature > 0 (greedy samples are identical)")
    eng = Engine(model, tokenizer, batch_size=batch_size)
    scores = torch.zeros(len(problems), n_samples)
    texts = None
    for s in range(n_samples):
        correct, out = _sampled_scores(eng, tokenizer, problems, max_new_tokens, 1, temperature, seed + s, "pass@1")
        scores[:, s] = torch.tensor(correct)
        texts = texts or out.texts
    per_problem = scores.mean(1)

    def summary(idx: list[int]) -> dict:
        v = per_problem[idx]
        m = float(v.mean())
        return {"pass@1": m, "se": math.sqrt(max(m * (1 - m), 0.0) / len(idx)), "n": len(idx)}

    tasks = sorted({p.task for p in problems})
    return {"overall": summary(list(range(len(problems)))),
            "per_task": {t: summary([i for i, p in enumerate(problems) if p.task == t]) for t in tasks},
            "examples": [{"question": p.question, "answer": p.answer, "response": texts[i]}
                         for i, p in enumerate(problems[:3])]}


def evaluate_pass1(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int, temperature: float = 0.0,
                   samples: int = 1, seed: int = 0, batch_size: int = 64) -> dict:
    """pass@1 = mean accuracy of `samples` completions per problem (greedy when temperature is 0), per task too.
    Generation stops at any turn-structure token (`stop_ids`)."""
    engine = Engine(model, tokenizer, eos_token_id=stop_ids(tokenizer), batch_size=batch_size)
    correct, out = _sampled_scores(engine, tokenizer, problems, max_new_tokens, samples, temperature, seed,
                                   "eval pass@1")
    rep = [p for p in problems for _ in range(samples)]
    by_task: dict[str, list[float]] = {}
    for p, c in zip(rep, correct):
        by_task.setdefault(p.task, []).append(c)
    return {"pass1": sum(correct) / max(len(correct), 1), "n": len(correct),
            "per_task": {t: sum(v) / len(v) for t, v in by_task.items()},
            "mean_tokens": sum(out.num_generated) / max(len(out.num_generated), 1)}


def evaluate_heldout(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int,
                     batch_size: int = 64, return_texts: bool = False):
    """Greedy pass@1 per held-out problem (1.0/0.0) through `model.generate` (`zaya_lib.ttc.backends.generate_ids`),
    judged by `score_math` on the text with its think delimiters kept. With `return_texts`: (scores, texts)."""
    comps = generate_ids(model, tokenizer, _chat_prompts(tokenizer, problems), max_new_tokens, temperature=0.0,
                         batch_size=batch_size)
    texts = tokenizer.batch_decode(comps, skip_special_tokens=False)
    scores = score_texts(texts, problems)
    return (scores, texts) if return_texts else scores


def evaluate_heldout_sampled(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int, k: int = 4,
                             temperature: float = 1.0, seed: int = 0, batch_size: int = 128) -> list[float]:
    """Sampled pass@1 per held-out problem: the mean accuracy of `k` samples at `temperature` (the paper's "Pass@1",
    the mean accuracy over a population of samples; spec §1), through the seeded generation engine, so the same seed
    gives the same draws for every checkpoint compared."""
    if k <= 0 or not temperature > 0:
        raise ValueError(f"sampled pass@1 needs k > 0 and temperature > 0, got k={k}, temperature={temperature}")
    engine = Engine(model, tokenizer, eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"), batch_size=batch_size)
    scores, _ = _sampled_scores(engine, tokenizer, problems, max_new_tokens, k, temperature, seed, "held-out samples")
    return [sum(scores[i * k:(i + 1) * k]) / k for i in range(len(problems))]


# ---------------------------------------------------------------------------------------------------------------------
# one Markovian aggregation round


@dataclass
class AggregationEval:
    single: float               # round 0: mean accuracy of the k independent samples (pass@1 at this temperature)
    aggregated: float           # round 1: mean accuracy of k aggregation calls, each over all k tails of round 0
    aggregated_majority: float  # round 1: majority vote over the k aggregated answers
    majority: float             # round 0: majority vote over the k samples (self-consistency at equal samples)
    pass_at_k: float            # round 0: any of the k samples right
    gain: float                 # aggregated - single, paired per problem
    gain_stderr: float          # its standard error over problems
    n_problems: int
    k: int
    tau: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def evaluate_aggregation(model, tokenizer, problems: Sequence[Problem], k: int, tau: int, max_new_tokens: int,
                         temperature: float = 0.8, seed: int = 0, batch_size: int = 64) -> AggregationEval:
    """One Markovian aggregation round with the project's RSA loop (`zaya_lib.ttc.rsa.run_rsa`, N = K = k, T = 2):
    k samples per problem, then k aggregation calls, each seeing the problem and the last `tau` tokens of all k
    samples (the shared prompt builder). Compares the aggregated answers with a single sample and a majority vote."""
    res = run_rsa(EngineBackend(model, tokenizer, batch_size=batch_size), tokenizer, problems, N=k, K=k, T=2,
                  tau=tau, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    r0, r1 = res.rounds
    diffs = [(b - a) / k for a, b in zip(res.member_correct[0], res.member_correct[1])]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return AggregationEval(single=r0.mean_acc, aggregated=r1.mean_acc, aggregated_majority=r1.majority_acc,
                           majority=r0.majority_acc, pass_at_k=r0.pass_at_n, gain=mean, gain_stderr=se,
                           n_problems=n, k=k, tau=tau)


# ---------------------------------------------------------------------------------------------------------------------
# comparing checkpoints


def paired_difference(before: Sequence[float], after: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """after - before on the same problems: mean, standard error of the paired difference, and a percentile
    bootstrap 95% interval (resampling problems)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_difference: need two equal, non-empty lists, got {len(before)} and {len(after)}")
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    n = d.numel()
    se = float(d.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
    g = torch.Generator().manual_seed(seed)
    boots = d[torch.randint(0, n, (n_boot, n), generator=g)].mean(1)
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"before": sum(before) / n, "after": sum(after) / n, "diff": float(d.mean()), "se": se,
            "ci95": [lo, hi], "n": n}

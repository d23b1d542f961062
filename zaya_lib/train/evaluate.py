"""Held-out evaluation for the training phases: loss per category, loss by token position, pass@1 on reasoning tasks.

Notable features:
- `eval_loss` runs packed held-out windows (`TrainData`) in eval mode (no routing statistics, no balancing) and
  reports the token-mean cross entropy overall and per category.
- `loss_by_position` averages the loss at each position of long windows, in buckets: the context-extension plot
  (midtraining; a model that cannot use a longer context shows a loss that stops falling, or rises, past its
  training length).
- `pass_at_1` generates with `zaya_lib.ttc.engine.Engine` (batched, compressed KV cache) from the chat prompt
  `<bos><|user|>q<|end|><|assistant|>` and judges with the project's verifier (`zaya_lib.rl.verifiers.score_math`:
  text after the last `</think>`, last `\\boxed{}`), per task and overall, with a binomial standard error. Greedy by
  default; with `temperature > 0` and `n_samples > 1` it is the mean over samples (unbiased pass@1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["eval_loss", "loss_by_position", "pass_at_1"]


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


def pass_at_1(model, tokenizer, problems, max_new_tokens: int = 160, temperature: float = 0.0, n_samples: int = 1,
              seed: int = 0, batch_size: int = 64) -> dict:
    """pass@1 of `model` on `problems` (`zaya_lib.data.tasks.Problem`s), overall and per task (mean +- binomial s.e.).

    Each prompt is the chat generation prompt; a response is judged by `score_math` on its final boxed answer."""
    from ..data.tokenizer import encode_chat
    from ..rl.verifiers import score_math
    from ..ttc.engine import Engine

    if not problems:
        raise ValueError("pass_at_1 needs at least one problem")
    if n_samples < 1 or (n_samples > 1 and temperature == 0.0):
        raise ValueError(f"n_samples={n_samples} needs temperature > 0 (greedy samples are identical)")
    prompts = [encode_chat(tokenizer, p.question)[0] for p in problems]
    eng = Engine(model, tokenizer, batch_size=batch_size)
    scores = torch.zeros(len(problems), n_samples)
    texts = None
    for s in range(n_samples):
        out = eng.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + s,
                           desc="pass@1")
        scores[:, s] = torch.tensor([score_math(t, p.answer) for t, p in zip(out.texts, problems)])
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

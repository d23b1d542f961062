"""Named data mixtures (as data) and deterministic sampling from per-category corpora.

Notable features:
- `MIXTURES` holds the phases' category weights. As in the paper, weights are normalised over the nonzero entries
  only (a zero weight means "absent", not "tiny"). Phase 1 is broad; phase 2 upweights code, math/reasoning and
  instruction data (ZAYA1 report, pretraining phases; architecture.md section 6); midtraining is reasoning-heavy;
  SFT is chats only. The exact weights are unpublished; ours are chosen for the tiny profile and stated here.
- Validation before any work: an unknown mixture name, an unknown category, a negative, non-finite or non-number
  weight, or all-zero weights raise ValueError naming the mixture and the key.
- `sample_mixture` draws a token (or document) budget per category in a seeded order, cycling through a category
  (a new seeded permutation per epoch) when its corpus is smaller than its share, and returns the shuffled
  `Dataset` plus the per-category counts actually drawn.
"""
from __future__ import annotations

import math
import random
from typing import Mapping

from datasets import Dataset, concatenate_datasets

from .corpora import CATEGORIES

__all__ = ["MIXTURES", "CATEGORIES", "resolve_mixture", "sample_mixture", "document_lengths"]

MIXTURES: dict[str, dict[str, float]] = {
    # broad pretraining: mostly prose, some code, reasoning traces from the start (with AP-trimming downstream)
    "pretrain_phase1": {"web": 0.50, "code": 0.20, "math": 0.20, "instruct": 0.10},
    # second pretraining phase: code, math/reasoning and instruction-formatted data upweighted
    "pretrain_phase2": {"web": 0.09, "code": 0.21, "math": 0.50, "instruct": 0.20},
    # midtraining (long context, larger RoPE base): reasoning-heavy
    "midtrain": {"web": 0.10, "code": 0.15, "math": 0.55, "instruct": 0.20},
    # SFT: chats only (zero weights are dropped, not renormalised into)
    "sft": {"web": 0.0, "code": 0.0, "math": 0.70, "instruct": 0.30},
}


def resolve_mixture(mixture: str | Mapping[str, float]) -> dict[str, float]:
    """Named or explicit mixture -> `{category: weight}` over the nonzero categories, summing to 1."""
    if isinstance(mixture, str):
        if mixture not in MIXTURES:
            raise ValueError(f"unknown mixture {mixture!r}; known mixtures: {sorted(MIXTURES)}")
        name, weights = mixture, MIXTURES[mixture]
    elif isinstance(mixture, Mapping):
        name, weights = "<custom>", mixture
    else:
        raise ValueError(f"a mixture is a name or a {{category: weight}} mapping, got {type(mixture).__name__}")
    for cat, w in weights.items():
        if cat not in CATEGORIES:
            raise ValueError(f"mixture {name!r}: unknown category {cat!r}; known categories: {list(CATEGORIES)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"mixture {name!r}: weight of {cat!r} must be a finite number, got {w!r}")
        if w < 0:
            raise ValueError(f"mixture {name!r}: weight of {cat!r} is negative ({w})")
    total = sum(w for w in weights.values() if w > 0)
    if total == 0:
        raise ValueError(f"mixture {name!r}: all weights are zero")
    return {c: w / total for c, w in weights.items() if w > 0}


def document_lengths(ds: Dataset, tokenizer=None) -> list[int]:
    """Length of each document as trained on: tokens of `<bos>{text}<eos>` with a tokenizer, else UTF-8 bytes."""
    texts = list(ds["text"])  # datasets>=4 returns a lazy Column
    if tokenizer is None:
        return [len(t.encode("utf-8")) for t in texts]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]  # batched, in Rust
    return [len(ids) + 2 for ids in enc]


def _largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    raw = {c: w * total for c, w in weights.items()}
    out = {c: int(v) for c, v in raw.items()}
    for c in sorted(raw, key=lambda c: (out[c] - raw[c], c))[: total - sum(out.values())]:
        out[c] += 1
    return out


def sample_mixture(corpora: Mapping[str, Dataset], mixture: str | Mapping[str, float], n_tokens: int | None = None,
                   n_docs: int | None = None, seed: int = 0, tokenizer=None) -> tuple[Dataset, dict[str, int]]:
    """Sample a mixture from `corpora` (`{category: Dataset with a "text" column}`).

    Give exactly one budget: `n_docs` (split by weight, exactly, with largest remainders) or `n_tokens` (each
    category drawn until its share `weight * n_tokens` is reached; lengths are tokens of `<bos>{text}<eos>` with
    `tokenizer`, else UTF-8 bytes). Documents are taken in a seeded permutation; a category smaller than its share is
    cycled (a fresh permutation per pass). Returns (shuffled Dataset, `{category: tokens drawn}`), the counts being
    tokens with a tokenizer and bytes without. Deterministic given the inputs and `seed`.
    """
    weights = resolve_mixture(mixture)
    if (n_tokens is None) == (n_docs is None):
        raise ValueError("sample_mixture: give exactly one of n_tokens and n_docs")
    budget = n_tokens if n_tokens is not None else n_docs
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"sample_mixture: the budget must be a positive int, got {budget!r}")
    for cat in weights:
        if cat not in corpora:
            raise ValueError(f"mixture needs category {cat!r} but corpora has only {sorted(corpora)}")
        if len(corpora[cat]) == 0:
            raise ValueError(f"corpus for category {cat!r} is empty")
    doc_quota = _largest_remainder(weights, n_docs) if n_docs is not None else None

    parts, counts = [], {}
    for cat in sorted(weights):  # sorted: the result must not depend on dict order
        ds = corpora[cat]
        lengths = document_lengths(ds, tokenizer)
        rng = random.Random(f"mixture|{seed}|{cat}")
        picked, total = [], 0
        order: list[int] = []
        quota_tok = weights[cat] * n_tokens if n_tokens is not None else None
        while (len(picked) < doc_quota[cat]) if doc_quota is not None else (total < quota_tok):
            if not order:
                order = list(range(len(ds)))
                rng.shuffle(order)
                order.reverse()  # pop() from the end walks the permutation front to back
            i = order.pop()
            picked.append(i)
            total += lengths[i]
        counts[cat] = total
        if picked:
            parts.append(ds.select(picked))
    out = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return out.shuffle(seed=seed).flatten_indices(), counts

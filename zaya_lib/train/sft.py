"""Supervised fine-tuning (SFT) at the third context stage, with aggregation data mixed in [TR §III; issue 5].

The paper's SFT runs at 131K tokens with RoPE base 5M; the tiny profile switches the base again (`set_rope_theta`) at
a 4x longer window than midtraining's. SFT data are chats in the chat template: plain reasoning chats
(`<think>cot</think>\\boxed{a}`), instruction chats, and aggregation examples that teach the Markovian RSA workflow
the model later runs at inference (`zaya_lib.data.aggregation`, the one prompt builder shared with RSA).

Notable features:
- Loss on assistant tokens only: every sample carries a 0/1 mask (1 on assistant contents and their closing
  `<|end|>`), packing keeps it aligned token for token, and the trainer turns it into labels with `sft_labels`'s rule
  (-100 wherever the TARGET token is not an assistant token).
- No arbitrary truncation: each chat is answer-preservingly trimmed (`zaya_lib.data.trimming`) to the window, then
  whole samples go into fixed windows by best-fit-decreasing (`zaya_lib.data.packing.pack_sft`); a sample is never
  split across windows.
- Windows are W + 1 = `seq_len + 1` tokens: inputs are the first W and targets the last W (the trainer's [N, T+1]
  convention), so a sample can use the whole window and every target has its input context.
- Document masking (`sft_doc_mask`, default on; `TrainConfig.doc_mask`): each sample of a window is computed as if
  alone: attention stays within the sample, the CCA conv history and delayed value restart at its first token, and
  its RoPE positions start at 0 (`zaya_lib.model.documents`). No loss ever crosses a sample boundary either way (a
  sample's first token, `<bos>`, carries no target). Off, samples share one causal span with continuous positions.
- Aggregation data at a ratio from params: expert-aggregation (C candidates from the programmatic solver, each
  right with probability p or carrying one realistic mistake) and self-aggregation (C candidates sampled from the
  current checkpoint with the generation engine; an on-policy correct candidate becomes the target when there is one).
- Validation before any work (`check_sft_params`): a window the context-parallel world size does not divide, or C
  tails of tau tokens plus the prompt wording that do not fit the window, fail at once naming the parameter.
- Evaluation (pass@1, one Markovian aggregation round) lives with the other held-out evaluations in
  `zaya_lib.train.evaluate`.
- Checkpoints are Hugging Face folders (config.json with the new `rope_theta`, safetensors, tokenizer), written and
  read by `zaya_lib.model.checkpoint` (atomic: temp folder renamed into place).

Shapes: N windows, W window (= seq_len), V vocabulary.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data.aggregation import (expert_aggregation_examples, fixed_overhead, mix_sft_with_aggregation,
                                self_aggregation_examples)
from ..data.answers import score_math
from ..data.packing import SFTPacked, pack_sft
from ..data.tasks import Problem
from ..data.tokenizer import stop_ids
from ..data.trimming import TrimStats, encode_turns, split_thinking, trim
from ..model.checkpoint import checkpoint_tokenizer, load_hf_checkpoint, save_hf_checkpoint
from .context_parallel import check_divisible
from .trainer import TrainData

__all__ = ["SFT_CATEGORIES", "check_sft_params", "encode_sft_chat", "trimmed_chat_samples", "aggregation_samples",
           "problem_pool", "build_sft_mix", "pack_sft_data", "sft_labels", "engine_sampler", "run_sft",
           "plain_sft_chats", "train_noagg_variant"]

SFT_CATEGORIES = ("reasoning", "instruct", "aggregation")
Sample = tuple[list[int], list[int]]


# ---------------------------------------------------------------------------------------------------------------------
# validation


def check_sft_params(seq_len: int, cp_world_size: int = 1, tokenizer: Any = None, agg_candidates: int | None = None,
                     agg_tau: int | None = None, agg_ratio: float = 0.0, prefix: str = "sft_") -> None:
    """Fail at once, naming the parameter, on a window the CP world size does not divide, an aggregation ratio outside
    [0, 1], or C tails of tau tokens (plus the prompt's fixed wording) that leave no room in the window."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"{prefix}seq_len must be a positive int, got {seq_len!r}")
    try:
        check_divisible(seq_len, cp_world_size)
    except ValueError as e:
        raise ValueError(f"{prefix}seq_len={seq_len} with cp_world_size={cp_world_size}: {e}") from None
    if not 0.0 <= agg_ratio <= 1.0:
        raise ValueError(f"{prefix}agg_ratio must be in [0, 1], got {agg_ratio}")
    if agg_ratio > 0.0:
        for key, v in ((f"{prefix}agg_candidates", agg_candidates), (f"{prefix}agg_tau", agg_tau)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
        if agg_tau >= seq_len:
            raise ValueError(f"{prefix}agg_tau={agg_tau}: a tail longer than the window {prefix}seq_len={seq_len}")
        if tokenizer is not None:
            need = fixed_overhead(tokenizer, agg_candidates) + agg_candidates * agg_tau
            if need >= seq_len:
                raise ValueError(
                    f"{prefix}agg_candidates={agg_candidates} tails of {prefix}agg_tau={agg_tau} tokens plus "
                    f"{fixed_overhead(tokenizer, agg_candidates)} tokens of prompt wording need {need} tokens, "
                    f"which leaves no room for the problem and the answer in the window {prefix}seq_len={seq_len}")


# ---------------------------------------------------------------------------------------------------------------------
# data


def encode_sft_chat(tokenizer: Any, messages: Sequence[dict]):
    """A chat (`[{role, content}]`, assistant contents possibly `<think>..</think>answer`) as an `EncodedSample`
    whose assistant think blocks are separate, so AP-trimming can cut their tails and keep the answers."""
    turns = []
    for m in messages:
        if m["role"] == "assistant":
            thinking, answer = split_thinking(m["content"])
            turns.append({"role": "assistant", "content": answer, "thinking": thinking})
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return encode_turns(tokenizer, turns)


def trimmed_chat_samples(tokenizer: Any, chats: Sequence[Sequence[dict]],
                         budget: int) -> tuple[list[Sample], TrimStats]:
    """AP-trim every chat to `budget` tokens; samples whose answers alone exceed it are dropped (and counted)."""
    stats = TrimStats(budget)
    out = []
    for msgs in chats:
        r = trim(encode_sft_chat(tokenizer, msgs), budget)
        stats.add(r)
        if r.ids is not None:
            out.append((r.ids, r.loss_mask))
    return out, stats


def engine_sampler(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 64) -> Callable[[list[list[int]]], list[list[int]]]:
    """`sample_fn(prompts) -> completions` for self-aggregation, backed by the batched generation engine."""
    from ..ttc.engine import Engine

    engine = Engine(model, tokenizer, eos_token_id=stop_ids(tokenizer), batch_size=batch_size)

    def sample(prompts: list[list[int]]) -> list[list[int]]:
        return engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed, desc="self-aggregation candidates").token_ids

    return sample


def aggregation_samples(tokenizer: Any, expert_problems: Sequence[Problem], self_problems: Sequence[Problem], C: int,
                        tau: int, budget: int, rng: random.Random, p_correct: float = 0.5,
                        sample_fn: Callable | None = None, later_round_frac: float = 0.0) -> tuple[list[Sample], dict]:
    """Expert- and self-aggregation SFT examples (AP-trimmed to `budget`); a fraction `later_round_frac` of the expert
    candidates are written as an earlier aggregation round writes them. Returns (samples, counts)."""
    stats_e: dict = {}
    stats_s: dict = {}
    out = expert_aggregation_examples(expert_problems, C, tau, tokenizer, rng, p_correct=p_correct, max_len=budget,
                                      stats=stats_e, later_round_frac=later_round_frac)
    if self_problems:
        if sample_fn is None:
            raise ValueError("self-aggregation needs sample_fn (e.g. engine_sampler(model, tokenizer, ...))")
        out += self_aggregation_examples(self_problems, C, tau, tokenizer, sample_fn,
                                         verify_fn=lambda p, text: score_math(text, p.answer) > 0, rng=rng,
                                         max_len=budget, stats=stats_s)
    return out, {"expert": stats_e, "self": stats_s}


def problem_pool(n: int, seed: int, tasks: Sequence[str] | None = None,
                 difficulties: Sequence[int] | None = None) -> list[Problem]:
    """`n` training-split problems spread evenly over tasks x difficulties (seeded), for aggregation examples."""
    from ..data.tasks import MAX_DIFFICULTY, TASKS, make_problems

    keys = [(t, d) for t in (tasks or sorted(TASKS)) for d in (difficulties or range(1, MAX_DIFFICULTY + 1))]
    counts = Counter(keys[i % len(keys)] for i in range(n))
    out = []
    for (t, d), c in sorted(counts.items()):  # a small question space repeats its problems (never invents any)
        ps = make_problems(t, c, seed=seed, difficulty=d, allow_fewer=True)
        out += [ps[i % len(ps)] for i in range(c)]
    random.Random(seed).shuffle(out)
    return out


def build_sft_mix(tokenizer, chats_by_category: dict[str, Sequence[Sequence[dict]]], seq_len: int, agg_ratio: float,
                  agg_candidates: int, agg_tau: int, agg_self_frac: float = 0.25, agg_p_correct: float = 0.5,
                  sample_fn: Callable | None = None, seed: int = 0, agg_tasks: Sequence[str] | None = None,
                  agg_difficulties: Sequence[int] | None = None,
                  agg_later_round_frac: float = 0.0) -> tuple[dict, dict, dict]:
    """The SFT mixture: chats AP-trimmed to the window (`seq_len + 1` tokens), plus aggregation examples at
    `agg_ratio` of the mix (a fraction `agg_self_frac` of them from `sample_fn`, the current checkpoint).

    Returns (mixed samples by category, plain samples by category (the no-aggregation variant's data), info).
    """
    check_sft_params(seq_len, 1, tokenizer, agg_candidates, agg_tau, agg_ratio)
    if not 0.0 <= agg_self_frac <= 1.0:
        raise ValueError(f"sft_agg_self_frac must be in [0, 1], got {agg_self_frac}")
    budget = seq_len + 1
    plain, info = {}, {"trim": {}}
    for cat, chats in chats_by_category.items():
        plain[cat], st = trimmed_chat_samples(tokenizer, chats, budget)
        info["trim"][cat] = st.as_dict()
    n_plain = sum(map(len, plain.values()))
    if agg_ratio == 0.0:
        return dict(plain), plain, {**info, "mix": {"plain": n_plain, "aggregation": 0, "ratio": 0.0}}
    n_agg = round(n_plain * agg_ratio / (1.0 - agg_ratio)) if agg_ratio < 1.0 else n_plain
    n_self = round(n_agg * agg_self_frac)
    probs = problem_pool(n_agg, seed=seed + 7919, tasks=agg_tasks, difficulties=agg_difficulties)
    agg, info["aggregation"] = aggregation_samples(tokenizer, probs[n_self:], probs[:n_self], agg_candidates,
                                                   agg_tau, budget, random.Random(seed), agg_p_correct, sample_fn,
                                                   later_round_frac=agg_later_round_frac)
    # mix at the exact ratio (sample identity tells the categories apart afterwards)
    flat_plain = [s for c in plain for s in plain[c]]
    mixed, info["mix"] = mix_sft_with_aggregation(flat_plain, agg, agg_ratio, seed=seed)
    cat_of = {id(s): c for c in plain for s in plain[c]}
    out: dict[str, list] = {c: [] for c in plain}
    out["aggregation"] = []
    for s in mixed:
        out[cat_of.get(id(s), "aggregation")].append(s)
    return out, plain, info


def pack_sft_data(samples_by_category: dict[str, Sequence[Sample]], seq_len: int, pad_id: int = 0,
                  seed: int = 0) -> tuple[TrainData, SFTPacked]:
    """Pack whole samples into windows of `seq_len + 1` tokens by best-fit-decreasing and wrap them as the trainer's
    `TrainData` (loss mask = assistant mask; per-token category for the loss per category).

    A sample longer than the window raises (it should have been AP-trimmed). Samples are shuffled (seeded) first so
    equal-length ties do not group one category together; `packed.boundaries` index samples in the input order
    (the categories' lists concatenated in the dict's order).
    """
    cats = list(samples_by_category)
    unknown = [c for c in cats if c not in SFT_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown SFT categories {unknown}; expected a subset of {SFT_CATEGORIES}")
    flat = [(s, SFT_CATEGORIES.index(c)) for c in cats for s in samples_by_category[c]]
    if not flat:
        raise ValueError("no SFT samples to pack")
    order = list(range(len(flat)))
    random.Random(seed).shuffle(order)
    packed = pack_sft([flat[i][0] for i in order], window=seq_len + 1, pad_id=pad_id, on_oversize="raise")
    category = torch.zeros_like(packed.input_ids)
    for w, spans in enumerate(packed.boundaries):
        for j, (start, end, i) in enumerate(spans):
            category[w, start:end] = flat[order[i]][1]
            spans[j] = (start, end, order[i])  # index into the input order (categories concatenated), not the shuffle
    data = TrainData(tokens_NT1=packed.input_ids, category_NT1=category, categories=list(SFT_CATEGORIES),
                     loss_mask_NT1=packed.loss_mask, doc_ids_NT1=packed.doc_ids)
    return data, packed


def sft_labels(tokens_NT1: torch.Tensor, loss_mask_NT1: torch.Tensor) -> torch.Tensor:
    """Targets [N, T] for inputs tokens[:, :-1]: the next token where it is an assistant token, else -100.
    (The rule `trainer.train` applies to a `TrainData` with a loss mask; tests check they agree.)"""
    labels = tokens_NT1[:, 1:].clone()
    labels[loss_mask_NT1[:, 1:] == 0] = -100
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# the SFT phase and its no-aggregation control


def run_sft(init_dir: str | os.PathLike, train_data: TrainData, out_dir: str | os.PathLike, rope_theta: float,
            cfg, metrics_path: str | os.PathLike | None = None):
    """Load the checkpoint at `init_dir`, switch its RoPE base, train with the project trainer (`TrainConfig` cfg) and
    save the result as a Hugging Face checkpoint (model + tokenizer + `sft_info.json`) at `out_dir`.

    Returns (model, history, wall seconds of the training loop)."""
    import time

    from .trainer import train

    model, tok = load_hf_checkpoint(init_dir, device=cfg.device)
    theta_before = model.config.rope_theta
    model.set_rope_theta(rope_theta)
    t0 = time.perf_counter()
    hist = train(model, train_data, cfg, metrics_path=metrics_path, resume=False)
    wall = time.perf_counter() - t0
    info = {"init": str(init_dir), "rope_theta_before": theta_before, "rope_theta": rope_theta,
            "seq_len": train_data.seq_len, "steps": cfg.steps, "batch_size": cfg.batch_size, "doc_mask": cfg.doc_mask,
            "train_wall_s": wall,
            "final_loss": hist[-1]["loss"]}
    save_hf_checkpoint(model, tok, out_dir, extra_files={"sft_info.json": json.dumps(info, indent=2) + "\n"})
    return model, hist, wall


def plain_sft_chats(n_reasoning: int, reasoning_max_difficulty: int, n_instruct: int, seed: int,
                    tasks: Sequence[str] | None = None, nothink_frac: float = 0.0,
                    nothink_tasks: Sequence[str] | None = None) -> dict[str, list]:
    """The plain SFT chats by category (reasoning problems of `tasks` (None: all) at levels 1..max with their compact
    chain of thought, a share `nothink_frac` of those of `nothink_tasks` (None: all) answered without it, and
    instruction chats), seeded: notebook 05 and `train_noagg_variant` build exactly the same list from the same
    parameters."""
    from ..data.corpora import instruct_corpus, math_corpus

    return {"reasoning": list(math_corpus(n_reasoning, seed=seed + 5, tasks=list(tasks) if tasks else None,
                                          difficulties=list(range(1, reasoning_max_difficulty + 1)),
                                          nothink_frac=nothink_frac,
                                          nothink_tasks=list(nothink_tasks) if nothink_tasks else None)["messages"]),
            "instruct": list(instruct_corpus(n_instruct, seed=seed + 5)["messages"])}


def train_noagg_variant(run_dir: str | os.PathLike, sft_params: dict, device="cpu", dtype: str = "float32",
                        out_name: str = "sft_noagg"):
    """Train the control for the aggregation-data experiments: the SFT run of notebook 05 (same start, same steps,
    batch, lr, window, RoPE base and plain chats, read from `sft_params`, i.e. the `params` of `metrics/05_sft.json`)
    without any aggregation example, saved to `checkpoints/<out_name>`.

    Returns (model, history, wall seconds of training, number of packed windows)."""
    from .trainer import TrainConfig

    need = ("seed", "sft_init_phase", "sft_seq_len", "sft_rope_theta", "sft_n_reasoning",
            "sft_reasoning_max_difficulty", "sft_n_instruct", "sft_steps", "sft_batch_size", "sft_lr",
            "sft_warmup_steps", "sft_reasoning_tasks", "sft_nothink_frac", "sft_nothink_tasks")
    missing = [k for k in need if k not in sft_params]
    if missing:
        raise KeyError(f"train_noagg_variant: SFT parameters {missing} missing (expected the params of 05_sft.json)")
    p = sft_params
    run = Path(run_dir)
    tok = checkpoint_tokenizer(run / "checkpoints" / p["sft_init_phase"])
    chats = plain_sft_chats(p["sft_n_reasoning"], p["sft_reasoning_max_difficulty"], p["sft_n_instruct"], p["seed"],
                            p["sft_reasoning_tasks"], p["sft_nothink_frac"], p["sft_nothink_tasks"])
    _, plain, _ = build_sft_mix(tok, chats, p["sft_seq_len"], 0.0, 1, 1, seed=p["seed"])
    data, packed = pack_sft_data(plain, p["sft_seq_len"], pad_id=tok.pad_token_id, seed=p["seed"])
    cfg = TrainConfig(steps=p["sft_steps"], batch_size=p["sft_batch_size"], lr=p["sft_lr"],
                      warmup_steps=p["sft_warmup_steps"], log_every=max(1, p["sft_steps"] // 20), seed=p["seed"],
                      device=str(device), dtype=dtype, desc=out_name,
                      doc_mask=p.get("sft_doc_mask", False))  # absent from metrics written before the option: off
    model, hist, wall = run_sft(run / "checkpoints" / p["sft_init_phase"], data, run / "checkpoints" / out_name,
                                p["sft_rope_theta"], cfg, run / "metrics" / f"05_{out_name}_train.jsonl")
    return model, hist, wall, len(packed)

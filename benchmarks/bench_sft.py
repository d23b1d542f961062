"""SFT training step with and without document masking, in one process (the tiny profile's SFT shape).

Data: the tiny profile's SFT mix built the way notebook 05 builds it (a byte-level BPE tokenizer trained on the
offline corpora, plain reasoning and instruction chats AP-trimmed to the window, expert-aggregation examples at the
profile's ratio; no self-aggregation, which would need a trained checkpoint), packed by best-fit-decreasing into
windows of `sft_seq_len + 1` tokens. Model: the `tiny` preset (from scratch; the weights only move the routing).
A step is what `trainer.train` does per step: forward through the fused head + cross entropy, backward, Muon + AdamW,
the balancing-bias update. Both contenders start from the same weights and see the same batches
(`batch_indices`, seed 0); they alternate step by step so machine noise is shared; medians are compared.
Writes outputs/bench/sft_doc_mask.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zaya_lib.utils import atomic_write_json  # noqa: E402


def build_data(seq_len: int, n_reasoning: int, n_instruct: int, agg_ratio: float, seed: int = 0):
    """(TrainData, tokenizer, info) of the tiny SFT mix at `seq_len` (fewer chats than the profile: same lengths)."""
    from zaya_lib.data.corpora import code_corpus, instruct_corpus, math_corpus, web_corpus
    from zaya_lib.data.tokenizer import train_tokenizer
    from zaya_lib.train import sft

    texts = [t for c in (web_corpus, code_corpus, math_corpus, instruct_corpus) for t in c(500, seed=seed)["text"]]
    tok = train_tokenizer(texts, vocab_size=1024)
    chats = sft.plain_sft_chats(n_reasoning, 3, n_instruct, seed)
    mixed, _, info = sft.build_sft_mix(tok, chats, seq_len, agg_ratio, 4, 32, agg_self_frac=0.0, seed=seed)
    data, packed = sft.pack_sft_data(mixed, seq_len, pad_id=tok.pad_token_id, seed=seed)
    n_docs = sum(len(b) for b in packed.boundaries)
    return data, tok, {"windows": len(packed), "samples": n_docs, "fill_ratio": packed.fill_ratio,
                       "mean_sample_tokens": packed.fill_ratio * len(packed) * (seq_len + 1) / n_docs}


def make_step(model, data, doc_mask: bool, batch_size: int, lr: float = 1e-3):
    from zaya_lib.train.optim import build_optimizers
    from zaya_lib.train.trainer import _token_losses, batch_indices

    opt = build_optimizers(model, lr=lr)
    state = {"step": 0}

    def step():
        rows = batch_indices(state["step"], batch_size, len(data), 0)
        state["step"] += 1
        tok = data.tokens_NT1[rows]
        labels = tok[:, 1:].clone()
        labels[data.loss_mask_NT1[rows][:, 1:] == 0] = -100
        docs = data.doc_ids_NT1[rows] if doc_mask else None
        if docs is not None:
            labels[docs[:, 1:] != docs[:, :-1]] = -100
        tl = _token_losses(model, tok[:, :-1], labels, None, None, docs[:, :-1] if docs is not None else None)
        loss = tl.sum() / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balancing_biases()
        return loss.item()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=1024, help="SFT window (tiny profile: sft_seq_len 1024)")
    ap.add_argument("--batch", type=int, default=8, help="windows per step (tiny profile: sft_batch_size 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-reasoning", type=int, default=1500)
    ap.add_argument("--n-instruct", type=int, default=150)
    ap.add_argument("--out", default="outputs/bench/sft_doc_mask.json")
    args = ap.parse_args(argv)
    from zaya_lib.config import get_config
    from zaya_lib.model import ZayaForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data, tok, info = build_data(args.seq, args.n_reasoning, args.n_instruct, agg_ratio=0.3)
    data_s = time.perf_counter() - t0
    torch.manual_seed(0)
    base = ZayaForCausalLM(get_config("tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id)).train()
    steps = {"doc_mask": make_step(copy.deepcopy(base), data, True, args.batch),
             "no_mask": make_step(copy.deepcopy(base), data, False, args.batch)}
    times = {k: [] for k in steps}
    losses = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in (steps.items() if i % 2 == 0 else reversed(steps.items())):
            t = time.perf_counter()
            losses[name].append(fn())
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    result = {
        "benchmark": "SFT training step (forward + backward + Muon/AdamW + balancing), fp32, tiny preset",
        "window": args.seq, "batch": args.batch, "threads": args.threads, "steps_timed": args.steps,
        "data": info, "data_build_s": data_s,
        "median_step_s": med, "all_step_s": times,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "ratio_doc_mask_over_no_mask": med["doc_mask"] / med["no_mask"],
        # each step's pair ran back to back on the same batch: their ratio shares that moment's machine load
        "median_pair_ratio": statistics.median(a / b for a, b in zip(times["doc_mask"], times["no_mask"])),
        "target": "doc_mask step <= 1.10 x no_mask step",
        "first_losses": {k: v[:3] for k, v in losses.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load_avg_1min": os.getloadavg()[0]},
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("data", "median_step_s", "ratio_doc_mask_over_no_mask",
                                             "median_pair_ratio")}, indent=2))


if __name__ == "__main__":
    main()

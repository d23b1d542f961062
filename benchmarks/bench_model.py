"""Training-step benchmark: our ZayaForCausalLM against transformers' own ZayaForCausalLM, in one process.

Same config (the model issue's `bench` preset: hidden 256, 4 layers, 8/2 heads of 32, 16 experts of 256, router 64,
vocab 4096), same weights, batch 8 x 256 tokens, fp32, 2 threads; a step is forward + backward + AdamW update.
"ours" is the path our trainer takes (the fused head + cross-entropy, `targets=`); "ours_hf_loss_path" is the same
model through `labels=` (full logits, F.cross_entropy), to show what the fused loss alone contributes.
Timings alternate between the two models to share any machine noise; the median step time of each is compared.
Writes outputs/bench/model.json.
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
from zaya_lib.config import get_config  # noqa: E402
from zaya_lib.model import ZayaForCausalLM  # noqa: E402
from zaya_lib.model.checkpoint import to_hf_reference  # noqa: E402
from zaya_lib.utils import atomic_write_json  # noqa: E402


def make_step(model, ids, fused: bool = False, compiled: bool = False):
    """One training step. `fused`: our trainer's loss path (per-token losses from the fused head + cross-entropy,
    `targets=`), else the HF path (`labels=`, logits returned). Both minimise the same mean next-token loss.
    `compiled`: the forward goes through torch.compile, as our trainer does with TrainConfig.compile=True."""
    # the same stock optimizer on every side, in its fastest form (one fused kernel per parameter instead of ~8
    # element-wise passes): the optimizer is not what is compared, so its cost should not dilute the comparison
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    fwd = torch.compile(model, dynamic=False) if compiled else model

    def step():
        if fused:
            tl = fwd(input_ids=ids, targets=targets).token_losses
            loss = tl.sum() / (targets != -100).sum()
        else:
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/bench/model.json")
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile contender (~40 s to compile)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_config("bench")
    ours = ZayaForCausalLM(cfg).train()
    ref = to_hf_reference(ours).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        diff = (ours.eval()(ids).logits - ref.eval()(ids).logits).abs().max().item()
    ours.train(), ref.train()
    ours_plain = copy.deepcopy(ours)  # the same model through the HF loss path: what the fused loss alone buys
    steps = {"ours": make_step(ours, ids, fused=True), "ours_hf_loss_path": make_step(ours_plain, ids),
             "transformers": make_step(ref, ids)}
    compile_s = None
    if not args.no_compiled:   # TrainConfig.compile=True: the first step compiles
        steps["ours_compiled"] = make_step(copy.deepcopy(ours), ids, fused=True, compiled=True)
    losses = {}
    for k, fn in steps.items():   # first step from identical weights: equal losses
        t0 = time.perf_counter()
        losses[k] = fn()
        if k == "ours_compiled":
            compile_s = time.perf_counter() - t0
    loss_diff = max(abs(v - losses["transformers"]) for v in losses.values())
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    result = {
        "benchmark": "training step (forward + backward + AdamW), fp32",
        "config": "bench preset: hidden 256, 4 layers, 8/2 heads of 32, 16 experts of 256, router 64, vocab 4096",
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "steps_timed": args.steps,
        "initial_logit_max_abs_diff": diff, "first_step_loss_max_abs_diff": loss_diff,
        "ours": "our trainer's path: fused head + cross-entropy (targets=), no [N, V] logits returned",
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup_ours_vs_transformers": med["transformers"] / med["ours"],
        "speedup_ours_hf_loss_path_vs_transformers": med["transformers"] / med["ours_hf_loss_path"],
        "speedup_ours_compiled_vs_transformers": med["transformers"] / med["ours_compiled"] if compile_s else None,
        "ours_compiled": "TrainConfig.compile=True: torch.compile of all but the expert GEMM block; opt-in",
        "ours_compiled_first_step_s": compile_s,
        "target": 1.25,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

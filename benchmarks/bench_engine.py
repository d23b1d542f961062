"""Generation benchmark (issue 7): our engine against transformers' `generate` on transformers' `ZayaForCausalLM`.

Contenders: our `Engine` as it comes (the folded decode step of `zaya_lib.ttc.decode` with its MoE through
torch.compile; the one-off compile, in the first warm-up call, is reported as `compile_warmup_s`), the same engine
with `compile=False` (all eager), and transformers.
Same weights (ours loaded into transformers' class: the state-dict keys match exactly), the model issue's `bench`
preset, fp32, 2 threads, 32-token prompts, 64 new tokens, sampling (temperature 1, top-p 1), batch 16 and 64.
Both sides generate exactly 64 tokens per row: EOS is an id the bench prompts never use and that we mask out of
the logits of both models, so neither side stops early and the work is identical. Repeats alternate the
contenders to share machine noise; the median wall time of each is compared.

Also measured here:
- our engine's two ways of handling finished rows (drop them from the batch with `ZayaCache.reorder`, or keep them
  running masked), on a workload where rows finish at different times (128 EOS ids: a random model stops after ~32 tokens on average, lengths spread widely);
- KV-cache bytes per token read off the cache tensors after a prefill, against 2 * Hk * d * bytes * layers, for the
  `bench` preset (fp32 and bf16) and, by formula only, for `zaya1-8b` (bf16).
Writes outputs/bench/engine.json atomically.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zaya_lib.config import get_config  # noqa: E402
from zaya_lib.model import ZayaCache, ZayaForCausalLM  # noqa: E402
from zaya_lib.model.checkpoint import to_hf_reference  # noqa: E402
from zaya_lib.ttc.engine import Engine  # noqa: E402
from zaya_lib.utils import atomic_write_json  # noqa: E402


def kv_formula(cfg, bytes_per: int) -> int:
    return 2 * cfg.num_key_value_heads * cfg.head_dim * bytes_per * cfg.num_hidden_layers


def kv_measured(cfg, dtype: torch.dtype) -> float:
    model = ZayaForCausalLM(cfg).to(dtype).eval()
    cache = ZayaCache(cfg.num_hidden_layers, max_length=40)
    with torch.no_grad():
        model(input_ids=torch.randint(3, cfg.vocab_size, (2, 8)), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    # bytes of the K and V buffers per (row, cached position), from the tensors themselves
    total = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(cache.k, cache.v))
    return total / (2 * 40)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/bench/engine.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_config("bench")
    ours = ZayaForCausalLM(cfg).eval()
    ref = to_hf_reference(ours).eval()
    # EOS = the last id: prompts never contain it, and both models get a -inf bias on it (below), so every row runs
    # the full 64 tokens on both sides. The bias is a tied-head-compatible logit mask via a forward hook.
    never = cfg.vocab_size - 1
    for m in (ours, ref):
        m.lm_head.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.tensor([never]), float("-inf")))
    engine = Engine(ours, eos_token_id=never, pad_token_id=cfg.pad_token_id, batch_size=max(args.batches),
                    compile=True)  # the default, explicit here so ZAYA_ENGINE_COMPILE cannot change the benchmark
    engine_eager = Engine(ours, eos_token_id=never, pad_token_id=cfg.pad_token_id, batch_size=max(args.batches),
                          compile=False)

    def run_ours(prompts, seed, eng=engine):
        out = eng.generate(prompts, args.new, temperature=1.0, seed=seed)
        return sum(out.num_generated)

    def run_ours_eager(prompts, seed):
        return run_ours(prompts, seed, engine_eager)

    def run_hf(prompts, seed):
        ids = torch.tensor(prompts)
        torch.manual_seed(seed)
        with torch.no_grad():
            seq = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                               top_p=1.0, top_k=0, max_new_tokens=args.new, min_new_tokens=args.new,
                               eos_token_id=never, pad_token_id=cfg.pad_token_id)
        return int((seq.shape[1] - ids.shape[1]) * ids.shape[0])

    results = {}
    for B in args.batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(3, cfg.vocab_size - 1, (B, args.prompt), generator=g).tolist()
        t0 = time.perf_counter()
        run_ours(prompts, 0)  # warm-up; compiles on first use (dynamic row count: once per process)
        compile_warmup_s = time.perf_counter() - t0
        run_ours_eager(prompts, 0), run_hf(prompts, 0)  # warm-up (allocator, lazy inits)
        t = {"ours": [], "ours_eager": [], "transformers": []}
        toks = {}
        for r in range(args.repeats):
            for name, fn in (("ours", run_ours), ("ours_eager", run_ours_eager), ("transformers", run_hf)):
                t0 = time.perf_counter()
                toks[name] = fn(prompts, r)
                t[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in t.items()}
        results[f"batch{B}"] = {
            "batch": B, "tokens_generated": toks, "median_s": med, "all_s": t,
            "tokens_per_s": {k: toks[k] / med[k] for k in med},
            "speedup_ours_vs_transformers": med["transformers"] / med["ours"],
            "speedup_ours_eager_vs_transformers": med["transformers"] / med["ours_eager"],
            "compile_warmup_s": compile_warmup_s,
        }
        print(f"batch {B}: ours {med['ours']:.3f}s  ours eager {med['ours_eager']:.3f}s  transformers "
              f"{med['transformers']:.3f}s  speedup {med['transformers'] / med['ours']:.2f}x (default, compiled MoE; "
              f"first call {compile_warmup_s:.1f}s), {med['transformers'] / med['ours_eager']:.2f}x eager  "
              f"({toks})", flush=True)

    # Finished rows: drop (cache.reorder) vs mask, with real EOS and ragged lengths. Rows stop when they sample
    # EOS; to spread the lengths, EOS is a set of 1/32 of the vocabulary (~3% stop chance per token).
    eos_set = list(range(3, cfg.vocab_size - 1, 32))
    B = 64
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(3, cfg.vocab_size - 1, (B, args.prompt), generator=g).tolist()
    policy = {}
    for finished in ("drop", "mask"):
        e = Engine(ours, eos_token_id=eos_set, pad_token_id=cfg.pad_token_id, batch_size=B, finished=finished)
        e.generate(prompts, args.new, temperature=1.0, seed=0)
        ts, lens = [], None
        for r in range(args.repeats):
            t0 = time.perf_counter()
            out = e.generate(prompts, args.new, temperature=1.0, seed=r)
            ts.append(time.perf_counter() - t0)
            lens = out.num_generated
        policy[finished] = {"median_s": statistics.median(ts), "all_s": ts,
                            "mean_len": sum(lens) / len(lens), "max_len": max(lens)}
    policy["drop_speedup_vs_mask"] = policy["mask"]["median_s"] / policy["drop"]["median_s"]
    print(f"finished rows (batch {B}, ragged EOS): drop {policy['drop']['median_s']:.3f}s, "
          f"mask {policy['mask']['median_s']:.3f}s", flush=True)

    kv = {
        "bench_fp32": {"measured": kv_measured(cfg, torch.float32), "formula": kv_formula(cfg, 4)},
        "bench_bf16": {"measured": kv_measured(cfg, torch.bfloat16), "formula": kv_formula(cfg, 2)},
        "zaya1-8b_bf16": {"formula": kv_formula(get_config("zaya1-8b"), 2),
                          "note": "formula only (an 8B model is not built here)"},
    }
    for name, v in kv.items():
        print(f"KV bytes/token {name}: {v}")
    report = {
        "what": "our Engine vs transformers generate() on transformers' ZayaForCausalLM, same weights, bench preset",
        "config": {"preset": "bench", "prompt_tokens": args.prompt, "new_tokens": args.new, "sampling":
                   "temperature 1.0, top_p 1.0", "dtype": "float32", "threads": args.threads,
                   "repeats": args.repeats},
        "results": results,
        "finished_rows_policy": policy,
        "kv_cache_bytes_per_token": kv,
        "target": "speedup >= 2x at batch 16 (target_met: the engine as it comes; target_met_eager: compile=False)",
        "target_met": results.get("batch16", {}).get("speedup_ours_vs_transformers", 0) >= 2.0,
        "target_met_eager": results.get("batch16", {}).get("speedup_ours_eager_vs_transformers", 0) >= 2.0,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark the zaya_kernels Triton ops at ZAYA1-8B shapes and write outputs/bench/kernels.json (`make bench-kernels`).

Notable features:
- Real ZAYA1-8B geometry (architecture.md §1): batch x 4096 tokens, Hq=8, Hk=2, d=128, D=2048, E=16, F=2048, bf16.
- Each kernel against its eager PyTorch reference; attention also against SDPA (flash backend); a whole CCA attention
  layer (projections + cca_qk_prep + latent attention + o_proj) at 16K tokens against an MHA layer of the same width
  (16 x 128 heads) with SDPA; the MoE against one dense GEMM pair of the same FLOPs and against transformers'
  ZayaExperts with its `grouped_mm` experts implementation (torch grouped mm) and with its eager per-expert loop.
- Reports ms, achieved TFLOP/s (GEMM-like ops) or GB/s (memory-bound ops) and speed ratios; times with
  `triton.testing.do_bench` (median, L2 flushed between runs).
- Without CUDA it says so in the JSON and on stdout (pointing at the numbers recorded on an H100 in
  benchmarks/results/kernels_h100.json), runs a tiny correctness smoke in the
  Triton CPU interpreter (seconds) and exits 0. The JSON is written atomically.
Usage: python benchmarks/bench_kernels.py [--batch 2] [--out outputs/bench/kernels.json] [--only attention,moe,...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated
import torch.nn.functional as F  # noqa: E402

import zaya_kernels as zk  # noqa: E402

from zaya_kernels.cca_qk import rope_cos_sin  # noqa: E402

HQ, HK, HD, DM, E, FF = 8, 2, 128, 2048, 16, 2048   # ZAYA1-8B (architecture.md §1)


def write_json(path: pathlib.Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def bench(fn) -> float:
    """Median milliseconds of fn() on the GPU."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fwd_bwd(fn, inputs, dy):
    def run():
        for x in inputs:
            x.grad = None
        out = fn()
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, dy)
    return run


def tflops(flop: float, ms: float) -> float:
    return round(flop / (ms * 1e-3) / 1e12, 2)


def gbs(nbytes: float, ms: float) -> float:
    return round(nbytes / (ms * 1e-3) / 1e9, 1)


# ----------------------------------------------------------------------------------------------------------------
def bench_cca_qk(B: int, T: int, dt) -> dict:
    C = (HQ + HK) * HD
    dev = "cuda"
    leaves = [torch.randn(B, T, C, device=dev, dtype=dt), torch.randn(C, 1, 2, device=dev, dtype=dt),
              torch.randn(C, device=dev, dtype=dt), torch.randn(C, HD, 2, device=dev, dtype=dt) / 16,
              torch.randn(C, device=dev, dtype=dt), torch.ones(HK, device=dev, dtype=dt)]
    leaves = [x.requires_grad_() for x in leaves]
    cos, sin = rope_cos_sin(B, T, HD // 2, device=dev, dtype=dt)
    args = (cos, sin, HQ, HK, HD)
    dys = (torch.randn(B, T, HQ, HD, device=dev, dtype=dt), torch.randn(B, T, HK, HD, device=dev, dtype=dt))
    res = {"shape": f"B{B} T{T} Hq{HQ} Hk{HK} d{HD} {str(dt)[6:]}"}
    io_bytes = 2 * B * T * C * leaves[0].element_size()        # read qk, write q and k (the minimum traffic)
    for name, fn in (("triton", zk.cca_qk_prep), ("eager", zk.cca_qk_prep_ref)):
        with torch.no_grad():
            ms = bench(lambda: fn(*leaves, *args))
        ms_fb = bench(fwd_bwd(lambda: fn(*leaves, *args), leaves, dys))
        res[name] = {"fwd_ms": round(ms, 3), "fwd_GBps": gbs(io_bytes, ms), "fwd_bwd_ms": round(ms_fb, 3)}
    res["speedup_fwd"] = round(res["eager"]["fwd_ms"] / res["triton"]["fwd_ms"], 2)
    res["speedup_fwd_bwd"] = round(res["eager"]["fwd_bwd_ms"] / res["triton"]["fwd_bwd_ms"], 2)
    return res


def bench_attention(B: int, T: int, dt) -> dict:
    dev = "cuda"
    q = torch.randn(B, HQ, T, HD, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, HK, T, HD, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, HK, T, HD, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(B, HQ, T, HD, device=dev, dtype=dt)
    flop_fwd = 4 * B * HQ * T * T * HD / 2           # two GEMMs, causal half
    impls = {"triton": lambda: zk.latent_attention(q, k, v),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "eager": lambda: zk.latent_attention_ref(q, k, v)}
    res = {"shape": f"B{B} T{T} Hq{HQ} Hk{HK} d{HD} {str(dt)[6:]}"}
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                ms = bench(fn)
            ms_fb = bench(fwd_bwd(fn, [q, k, v], (do,)))
            res[name] = {"fwd_ms": round(ms, 3), "fwd_TFLOPs": tflops(flop_fwd, ms),
                         "fwd_bwd_ms": round(ms_fb, 3), "fwd_bwd_TFLOPs": tflops(3.5 * flop_fwd, ms_fb)}
        except torch.OutOfMemoryError as e:   # the eager T x T scores can exceed memory at long T
            res[name] = {"error": f"out of memory: {str(e)[:80]}"}
            torch.cuda.empty_cache()
    for other in ("sdpa", "eager"):
        if "fwd_ms" in res.get(other, {}):
            res[f"triton_vs_{other}_fwd"] = round(res[other]["fwd_ms"] / res["triton"]["fwd_ms"], 2)
            res[f"triton_vs_{other}_fwd_bwd"] = round(res[other]["fwd_bwd_ms"] / res["triton"]["fwd_bwd_ms"], 2)
    # decode over a full cache of T keys: memory bound, read K and V once
    qd = torch.randn(B, HQ, 1, HD, device=dev, dtype=dt)
    L = torch.full((B,), T, device=dev)
    ms = bench(lambda: zk.latent_attention_decode(qd, k.detach(), v.detach(), L))
    ms_sdpa = bench(lambda: F.scaled_dot_product_attention(qd, k.detach(), v.detach(), enable_gqa=True))
    kv_bytes = 2 * B * HK * T * HD * q.element_size()
    res["decode"] = {"triton_ms": round(ms, 4), "triton_GBps": gbs(kv_bytes, ms), "sdpa_ms": round(ms_sdpa, 4),
                     "triton_vs_sdpa": round(ms_sdpa / ms, 2)}
    return res


def bench_cca_layer_vs_mha(T: int, dt) -> dict:
    """One attention layer at T tokens (B=1): CCA (our Triton path) vs MHA of the same width (16 x 128) with SDPA."""
    dev, B = "cuda", 1
    x = torch.randn(B, T, DM, device=dev, dtype=dt, requires_grad=True)
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False, device=dev, dtype=dt)  # noqa: E731
    C = (HQ + HK) * HD
    # one fused projection to q | k | current values | values to delay, as the model computes it (CCAProjection)
    wqkv_c, wo = lin(DM, C + 2 * HD), lin(HQ * HD, DM)
    conv = [torch.randn(C, 1, 2, device=dev, dtype=dt), torch.zeros(C, device=dev, dtype=dt),
            torch.randn(C, HD, 2, device=dev, dtype=dt) / 16, torch.zeros(C, device=dev, dtype=dt),
            torch.ones(HK, device=dev, dtype=dt)]
    conv = [p.requires_grad_() for p in conv]
    cos, sin = rope_cos_sin(B, T, HD // 2, device=dev, dtype=dt)

    def cca():
        qk, v_cur, v_new = wqkv_c(x).split([C, HD, HD], -1)
        q, k = zk.cca_qk_prep(qk, *conv, cos, sin, HQ, HK, HD)
        v_del = F.pad(v_new[:, :-1], (0, 0, 1, 0))                    # one-token value delay (§3 step 4)
        v = torch.stack([v_cur, v_del], 2)                            # [B, T, Hk, d]
        o = zk.latent_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return wo(o.transpose(1, 2).reshape(B, T, HQ * HD))

    H = DM // HD
    wqkv, wo_m = lin(DM, 3 * DM), lin(DM, DM)

    def mha():
        q, k, v = wqkv(x).view(B, T, 3, H, HD).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return wo_m(o.transpose(1, 2).reshape(B, T, DM))

    dy = torch.randn(B, T, DM, device=dev, dtype=dt)
    res = {"shape": f"B1 T{T} D{DM}; CCA Hq{HQ}/Hk{HK} vs MHA {H} heads, d{HD}, {str(dt)[6:]}"}
    for name, fn in (("cca_triton", cca), ("mha_sdpa", mha)):
        with torch.no_grad():
            ms = bench(fn)
        res[name] = {"fwd_ms": round(ms, 3), "fwd_bwd_ms": round(bench(fwd_bwd(fn, [x], (dy,))), 3)}
    res["mha_over_cca_fwd"] = round(res["mha_sdpa"]["fwd_ms"] / res["cca_triton"]["fwd_ms"], 2)
    res["mha_over_cca_fwd_bwd"] = round(res["mha_sdpa"]["fwd_bwd_ms"] / res["cca_triton"]["fwd_bwd_ms"], 2)
    res["kv_cache_bytes_per_token"] = {"cca": 2 * HK * HD * 2, "mha": 2 * H * HD * 2}
    return res


def bench_moe(N: int, dt, comparators=("hf_grouped_mm", "hf_eager_loop", "eager_reference", "dense_same_flops")) -> dict:
    from types import SimpleNamespace

    from transformers.models.zaya.modeling_zaya import ZayaExperts
    dev = "cuda"
    x = torch.randn(N, DM, device=dev, dtype=dt, requires_grad=True)
    idx = torch.randint(0, E, (N,), device=dev)
    gate = torch.rand(N, device=dev, dtype=dt, requires_grad=True)
    w_gu = (torch.randn(E, 2 * FF, DM, device=dev, dtype=dt) / DM ** 0.5).requires_grad_()
    w_d = (torch.randn(E, DM, FF, device=dev, dtype=dt) / FF ** 0.5).requires_grad_()
    hf = {}
    for impl in ("grouped_mm", "eager"):   # transformers' experts interface: torch grouped mm, or its per-expert loop
        cfg = SimpleNamespace(num_experts=E, hidden_size=DM, moe_intermediate_size=FF, hidden_act="silu",
                              _experts_implementation=impl)
        hf[impl] = ZayaExperts(cfg)
        hf[impl].gate_up_proj, hf[impl].down_proj = torch.nn.Parameter(w_gu.detach()), torch.nn.Parameter(w_d.detach())
    flop = 6 * N * DM * FF                                           # 2*D*2F + 2*F*D per token
    dense_up = torch.randn(DM, 2 * FF, device=dev, dtype=dt, requires_grad=True)
    dense_down = torch.randn(FF, DM, device=dev, dtype=dt, requires_grad=True)
    impls = {
        "triton": lambda: zk.moe_experts(x, idx, gate, w_gu, w_d),
        "hf_grouped_mm": lambda: hf["grouped_mm"](x, idx[:, None], gate[:, None]),
        "hf_eager_loop": lambda: hf["eager"](x, idx[:, None], gate[:, None]),
        "eager_reference": lambda: zk.moe_experts_ref(x, idx, gate, w_gu, w_d),
        "dense_same_flops": lambda: (F.silu((h := x @ dense_up)[:, :FF]) * h[:, FF:]) @ dense_down,
    }
    impls = {k: f for k, f in impls.items() if k == "triton" or k in comparators}
    dy = torch.randn(N, DM, device=dev, dtype=dt)
    res = {"shape": f"N{N} D{DM} F{FF} E{E} top-1 uniform routing {str(dt)[6:]}"}
    for name, fn in impls.items():
        try:
            with torch.no_grad():
                ms = bench(fn)
            ms_fb = bench(fwd_bwd(fn, [x, gate, w_gu, w_d, dense_up, dense_down], (dy,)))
            res[name] = {"fwd_ms": round(ms, 3), "fwd_TFLOPs": tflops(flop, ms),
                         "fwd_bwd_ms": round(ms_fb, 3), "fwd_bwd_TFLOPs": tflops(3 * flop, ms_fb)}
        except Exception as e:  # noqa: BLE001 - record a failing comparator, keep the others
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    for other in impls:
        if other != "triton" and "fwd_ms" in res.get(other, {}) and "fwd_ms" in res["triton"]:
            res[f"triton_vs_{other}_fwd"] = round(res[other]["fwd_ms"] / res["triton"]["fwd_ms"], 2)
            res[f"triton_vs_{other}_fwd_bwd"] = round(res[other]["fwd_bwd_ms"] / res["triton"]["fwd_bwd_ms"], 2)
    return res


def bench_ceilings(dt) -> dict:
    """The two ceilings measured on this device (METHOD: datasheet numbers are leads): a large device-to-device copy
    (bytes read + written) and a large bf16 matrix product on random data."""
    x = torch.randn(512 * 2 ** 20 // 2, device="cuda", dtype=dt)      # 512 MiB, far beyond L2
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    a, b = torch.randn(8192, 8192, device="cuda", dtype=dt), torch.randn(8192, 8192, device="cuda", dtype=dt)
    ms_mm = bench(lambda: a @ b)
    return {"copy_GBps": gbs(2 * x.numel() * x.element_size(), ms), "matmul_TFLOPs": tflops(2 * 8192 ** 3, ms_mm)}


def bench_moe_sweep(tokens: list[int], dt) -> dict:
    """MoE expert layer forward (and forward+backward) across token counts: ours vs transformers' grouped_mm path
    and vs one dense SwiGLU GEMM pair of the same FLOPs (N tokens through a single 2048 -> 2x2048 -> 2048 MLP)."""
    out = {}
    for n in tokens:
        r = bench_moe(n, dt, comparators=("hf_grouped_mm", "dense_same_flops"))
        out[str(n)] = {k: v for k, v in r.items() if k != "shape"}
    return out


def targets(result: dict) -> dict:
    """The issue's H100 targets, each with the measured value and whether it holds."""
    t = {}
    bw = result.get("ceilings", {}).get("copy_GBps")
    cq = result.get("cca_qk", {})
    if "speedup_fwd" in cq:
        t["cca_qk_fwd_vs_eager>=3x"] = {"value": cq["speedup_fwd"], "ok": cq["speedup_fwd"] >= 3}
        if bw:
            frac = round(cq["triton"]["fwd_GBps"] / bw, 3)
            t["cca_qk_fwd_bandwidth>=60%"] = {"value": frac, "ok": frac >= 0.6}
    at = result.get("attention", {})
    if "triton_vs_sdpa_fwd" in at:
        t["attention_fwd_vs_sdpa>=1x"] = {"value": at["triton_vs_sdpa_fwd"], "ok": at["triton_vs_sdpa_fwd"] >= 1}
    cl = result.get("cca_layer", {})
    if "mha_over_cca_fwd" in cl:
        t["cca_layer_prefill_vs_mha>=1.5x"] = {"value": cl["mha_over_cca_fwd"], "ok": cl["mha_over_cca_fwd"] >= 1.5}
    mo = result.get("moe", {})
    if "triton_vs_dense_same_flops_fwd" in mo:
        v = mo["triton_vs_dense_same_flops_fwd"]
        t["moe_fwd_vs_dense_gemm>=0.7"] = {"value": v, "ok": v >= 0.7}
    sw = result.get("moe_sweep", {})
    ratios = {n: r.get("triton_vs_hf_grouped_mm_fwd") for n, r in sw.items()}
    if ratios and all(v is not None for v in ratios.values()):
        t["moe_fwd_vs_hf_grouped_mm>=1x_all_N"] = {"value": ratios, "ok": min(ratios.values()) >= 1}
    return t


# ----------------------------------------------------------------------------------------------------------------
def interpreter_smoke() -> dict:
    """Tiny CPU-interpreter correctness check of every kernel (max abs error vs the reference, fp32)."""
    torch.manual_seed(0)
    out = {}
    B, T, Hq, Hk, d = 1, 9, 2, 1, 16
    C = (Hq + Hk) * d
    args = [torch.randn(B, T, C), torch.randn(C, 1, 2), torch.randn(C), torch.randn(C, d, 2) / 6, torch.randn(C),
            torch.ones(Hk)]
    cos, sin = rope_cos_sin(B, T, d // 2)
    a, b = zk.cca_qk_prep(*args, cos, sin, Hq, Hk, d), zk.cca_qk_prep_ref(*args, cos, sin, Hq, Hk, d)
    out["cca_qk_max_abs_err"] = max((x - y).abs().max().item() for x, y in zip(a, b))
    q, k, v = torch.randn(1, 4, 33, 32), torch.randn(1, 2, 33, 32), torch.randn(1, 2, 33, 32)
    out["attention_max_abs_err"] = (zk.latent_attention(q, k, v) - zk.latent_attention_ref(q, k, v)).abs().max().item()
    x, idx, g = torch.randn(20, 32), torch.randint(-1, 4, (20,)), torch.rand(20)
    wgu, wd = torch.randn(4, 32, 32) / 6, torch.randn(4, 32, 16) / 4
    out["moe_max_abs_err"] = (zk.moe_experts(x, idx, g, wgu, wd) - zk.moe_experts_ref(x, idx, g, wgu, wd)).abs().max().item()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2, help="sequences of 4096 tokens (default 2)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layer-tokens", type=int, default=16384, help="T for the CCA-vs-MHA layer comparison")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "kernels.json"))
    ap.add_argument("--only", default="ceilings,cca_qk,attention,cca_layer,moe,moe_sweep")
    ap.add_argument("--sweep-tokens", default="16,64,256,1024,4096,16384", help="token counts of the MoE sweep")
    a = ap.parse_args()
    out_path = pathlib.Path(a.out)
    if not torch.cuda.is_available():
        t0 = time.time()
        smoke = interpreter_smoke()
        result = {"device": "cpu", "status": "no CUDA device here; recorded H100 numbers: benchmarks/results/kernels_h100.json",
                  "interpreter_smoke": {**smoke, "seconds": round(time.time() - t0, 2)}}
        write_json(out_path, result)
        print("bench_kernels: no CUDA device here (numbers recorded on an H100: benchmarks/results/kernels_h100.json). "
              "Interpreter smoke (max abs err vs reference): "
              + ", ".join(f"{k}={v:.2g}" for k, v in smoke.items()) + f" -> {out_path}")
        return 0
    dt = torch.bfloat16
    sections = set(a.only.split(","))
    result = {"device": torch.cuda.get_device_name(), "status": "ok", "dtype": "bfloat16",
              "torch": torch.__version__, "triton": __import__("triton").__version__}
    jobs = {"ceilings": lambda: bench_ceilings(dt),
            "cca_qk": lambda: bench_cca_qk(a.batch, a.tokens, dt),
            "attention": lambda: bench_attention(a.batch, a.tokens, dt),
            "cca_layer": lambda: bench_cca_layer_vs_mha(a.layer_tokens, dt),
            "moe": lambda: bench_moe(a.batch * a.tokens, dt),
            "moe_sweep": lambda: bench_moe_sweep([int(n) for n in a.sweep_tokens.split(",")], dt)}
    for name, job in jobs.items():
        if name not in sections:
            continue
        t0 = time.time()
        try:
            result[name] = job()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' numbers
            result[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            result["status"] = "partial"
        print(f"{name} ({time.time() - t0:.0f} s): {json.dumps(result[name])}", flush=True)
        torch.cuda.empty_cache()
        result["targets"] = targets(result)
        write_json(out_path, result)   # after each section, so an interrupted run keeps what it measured
    for name, t in result["targets"].items():
        print(f"target {name:<38} {'MET ' if t['ok'] else 'MISS'} {t['value']}")
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

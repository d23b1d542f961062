"""Try launch settings (tiles, warps, pipeline stages) of every zaya_kernels kernel at ZAYA1-8B shapes on a GPU.

    python benchmarks/tune_kernels.py [--out outputs/bench/tune.json] [--only attention,cca_qk,moe]

Notable features:
- Each kernel module reads its launch settings from a `TUNING` dict (defaults in its `_cfg`); this script fills it
  with one variant at a time, checks the variant's output against the eager reference on fresh random inputs (a
  wrong or racy variant is reported, not timed), then times it with `triton.testing.do_bench` (median).
- A variant that fails to compile or runs out of shared memory / registers is recorded with its error; the others go
  on. The table printed last gives, per kernel, each variant's time relative to the current default.
- The defaults in the kernel modules are chosen from this script's output (the README quotes the run); it needs a
  CUDA device and exits with a message otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from bench_kernels import bench, fwd_bwd, write_json  # noqa: E402  (the same timing and atomic JSON as make bench-kernels)

HQ, HK, HD, DM, E, FF = 8, 2, 128, 2048, 16, 2048   # ZAYA1-8B (architecture.md §1)
BF16 = torch.bfloat16


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def sweep(module, key: str, variants: list[dict], check, time_fn) -> list[dict]:
    """For each variant: set module.TUNING[key], check (returns a relative error), time. Restores TUNING after."""
    rows = []
    saved = dict(module.TUNING)
    for v in variants:
        module.TUNING.clear()
        module.TUNING.update(saved)
        module.TUNING[key] = v
        row = {"kernel": key, "variant": v}
        try:
            err = check()
            row["rel_err"] = float(f"{err:.3g}")
            if not err < 2e-2:     # bf16 operands land at 1e-3..1e-2 (METHOD); NaN fails here too
                row["error"] = f"wrong result (rel err {err:.3g})"
            else:
                row["ms"] = round(time_fn(), 4)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        torch.cuda.synchronize()
        print(json.dumps(row), flush=True)
        rows.append(row)
    module.TUNING.clear()
    module.TUNING.update(saved)
    return rows


def tune_attention(B: int, T: int) -> list[dict]:
    import zaya_kernels as zk
    A = importlib.import_module("zaya_kernels.latent_attention.latent_attention")
    q = torch.randn(B, HQ, T, HD, device="cuda", dtype=BF16, requires_grad=True)
    k = torch.randn(B, HK, T, HD, device="cuda", dtype=BF16, requires_grad=True)
    v = torch.randn(B, HK, T, HD, device="cuda", dtype=BF16, requires_grad=True)
    do = torch.randn_like(q)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(do)
    ref_grads = [x.grad.clone() for x in (q, k, v)]

    def check_fwd():
        with torch.no_grad():
            return _rel(zk.latent_attention(q, k, v), ref)

    def check_bwd():
        for x in (q, k, v):
            x.grad = None
        zk.latent_attention(q, k, v).backward(do)
        return max(_rel(x.grad, g) for x, g in zip((q, k, v), ref_grads))

    def time_fwd():
        with torch.no_grad():
            return bench(lambda: zk.latent_attention(q, k, v))

    def time_fwd_bwd():
        return bench(fwd_bwd(lambda: zk.latent_attention(q, k, v), [q, k, v], (do,)))

    fwd = [dict(BM=bm, BN=bn, num_warps=w, num_stages=st, REV=rev) for bm, bn, w, st, rev in (
        (64, 64, 4, 3, True), (64, 64, 4, 3, False), (64, 64, 4, 2, True), (64, 32, 4, 3, True), (128, 64, 8, 3, True),
        (128, 128, 8, 3, True), (64, 64, 8, 3, True), (128, 64, 4, 2, True), (64, 64, 4, 4, True))]
    bwd = [dict(BM=bm, BN=bn, num_warps=w, num_stages=st, REV=rev) for bm, bn, w, st, rev in (
        (64, 64, 4, 3, True), (64, 64, 4, 3, False), (64, 64, 4, 2, True), (32, 64, 4, 3, True), (64, 128, 8, 2, True),
        (64, 64, 4, 4, True), (128, 64, 8, 3, True), (32, 128, 4, 2, True))]
    rows = sweep(A, "fwd", fwd, check_fwd, time_fwd)
    rows += sweep(A, "bwd", bwd, check_bwd, time_fwd_bwd)   # fwd+bwd time, fwd at its default
    sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True))
    rows.append({"kernel": "fwd", "variant": "sdpa (reference)", "ms": round(sdpa_ms, 4)})
    return rows


def tune_cca_qk(B: int, T: int) -> list[dict]:
    import zaya_kernels as zk
    from zaya_kernels.cca_qk import rope_cos_sin
    C_ = importlib.import_module("zaya_kernels.cca_qk.cca_qk")
    C = (HQ + HK) * HD
    leaves = [torch.randn(B, T, C, device="cuda", dtype=BF16), 0.7 * torch.randn(C, 1, 2, device="cuda", dtype=BF16),
              0.3 * torch.randn(C, device="cuda", dtype=BF16), torch.randn(C, HD, 2, device="cuda", dtype=BF16) / 16,
              0.3 * torch.randn(C, device="cuda", dtype=BF16), (torch.rand(HK, device="cuda") + 0.5).to(BF16)]
    leaves = [x.requires_grad_() for x in leaves]
    cos, sin = rope_cos_sin(B, T, HD // 2, theta=1e4, device="cuda", dtype=BF16)
    args = (cos, sin, HQ, HK, HD)
    dys = (torch.randn(B, T, HQ, HD, device="cuda", dtype=BF16), torch.randn(B, T, HK, HD, device="cuda", dtype=BF16))
    leaves32 = [x.detach().float().requires_grad_() for x in leaves]
    ref = zk.cca_qk_prep_ref(*leaves32, cos.float(), sin.float(), HQ, HK, HD)
    torch.autograd.backward(ref, [d.float() for d in dys])
    ref_grads = [x.grad for x in leaves32]

    def check_fwd():
        with torch.no_grad():
            out = zk.cca_qk_prep(*leaves, *args)
        return max(_rel(o, r) for o, r in zip(out, ref))

    def check_bwd():
        for x in leaves:
            x.grad = None
        torch.autograd.backward(zk.cca_qk_prep(*leaves, *args), dys)
        return max(_rel(x.grad, g) for x, g in zip(leaves, ref_grads))

    def time_fwd():
        with torch.no_grad():
            return bench(lambda: zk.cca_qk_prep(*leaves, *args))

    def time_fwd_bwd():
        return bench(fwd_bwd(lambda: zk.cca_qk_prep(*leaves, *args), leaves, dys))

    fwd = [dict(BT=bt, num_warps=w, num_stages=st, NB=nb) for bt, w, st, nb in (
        (16, 4, 1, 8), (16, 4, 3, 8), (16, 4, 3, 1), (32, 4, 1, 4), (32, 4, 3, 4), (32, 8, 3, 4), (64, 4, 2, 2),
        (64, 8, 3, 2), (16, 4, 3, 16), (32, 4, 3, 8), (16, 2, 1, 8), (32, 4, 3, 16))]
    dy = [dict(BT=bt, num_warps=w, num_stages=st) for bt, w, st in ((16, 4, 1), (32, 4, 3), (32, 4, 1))]
    conv = [dict(BT=bt, num_warps=w, num_stages=st) for bt, w, st in ((64, 8, 3), (128, 8, 2), (64, 4, 3))]
    rows = sweep(C_, "fwd", fwd, check_fwd, time_fwd)
    rows += sweep(C_, "bwd_dy", dy, check_bwd, time_fwd_bwd)
    rows += sweep(C_, "bwd_conv", conv, check_bwd, time_fwd_bwd)
    return rows


def tune_moe(N: int) -> list[dict]:
    import zaya_kernels as zk
    M = importlib.import_module("zaya_kernels.moe_experts.moe_experts")
    x = torch.randn(N, DM, device="cuda", dtype=BF16, requires_grad=True)
    idx = torch.randint(0, E, (N,), device="cuda")
    gate = torch.rand(N, device="cuda", dtype=BF16, requires_grad=True)
    w_gu = (torch.randn(E, 2 * FF, DM, device="cuda", dtype=BF16) / DM ** 0.5).requires_grad_()
    w_d = (torch.randn(E, DM, FF, device="cuda", dtype=BF16) / FF ** 0.5).requires_grad_()
    leaves = [x, gate, w_gu, w_d]
    dy = torch.randn(N, DM, device="cuda", dtype=BF16)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    ref = zk.moe_experts_ref(leaves32[0], idx, *leaves32[1:])
    ref.backward(dy.float())
    ref_grads = [t.grad for t in leaves32]

    def check_fwd():
        with torch.no_grad():
            return _rel(zk.moe_experts(x, idx, gate, w_gu, w_d), ref)

    def check_bwd():
        for t in leaves:
            t.grad = None
        zk.moe_experts(x, idx, gate, w_gu, w_d).backward(dy)
        # dx, d gate_up, d down: the tuned GEMMs (dgate is a torch reduction with cancellation, checked in the tests)
        return max(_rel(leaves[i].grad, ref_grads[i]) for i in (0, 2, 3))

    def time_fwd():
        with torch.no_grad():
            return bench(lambda: zk.moe_experts(x, idx, gate, w_gu, w_d))

    def time_fwd_bwd():
        return bench(fwd_bwd(lambda: zk.moe_experts(x, idx, gate, w_gu, w_d), leaves, (dy,)))

    gemm = [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st) for bm, bn, bk, w, st in (
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 64, 64, 4, 3),
        (128, 128, 128, 8, 2), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 64, 128, 8, 3))]
    wgrad = [dict(BP=bp, BQ=bq, BM=bm, num_warps=w, num_stages=st) for bp, bq, bm, w, st in (
        (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 4, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 2),
        (256, 128, 64, 8, 2), (128, 128, 128, 8, 2))]
    rows = sweep(M, "gemm", gemm, check_fwd, time_fwd)
    rows += sweep(M, "gemm", gemm, check_bwd, time_fwd_bwd)      # the same GEMMs, fwd + bwd
    for r in rows[len(gemm):]:
        r["kernel"] = "gemm fwd+bwd"
    rows += sweep(M, "wgrad", wgrad, check_bwd, time_fwd_bwd)
    return rows


def profile(B: int, T: int) -> list[dict]:
    """Where each op's time goes: host time per call (launch-bound calls) and the GPU kernels of one call."""
    import time

    import zaya_kernels as zk
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    from zaya_kernels.cca_qk import rope_cos_sin
    dev = "cuda"
    N = B * T
    C = (HQ + HK) * HD
    qk = torch.randn(B, T, C, device=dev, dtype=BF16, requires_grad=True)
    conv = [torch.randn(C, 1, 2, device=dev, dtype=BF16), torch.zeros(C, device=dev, dtype=BF16),
            torch.randn(C, HD, 2, device=dev, dtype=BF16) / 16, torch.zeros(C, device=dev, dtype=BF16),
            torch.ones(HK, device=dev, dtype=BF16)]
    conv = [p.requires_grad_() for p in conv]
    cos, sin = rope_cos_sin(B, T, HD // 2, device=dev, dtype=BF16)
    q = torch.randn(B, HQ, T, HD, device=dev, dtype=BF16, requires_grad=True)
    k = torch.randn(B, HK, T, HD, device=dev, dtype=BF16, requires_grad=True)
    v = torch.randn(B, HK, T, HD, device=dev, dtype=BF16, requires_grad=True)
    qd = torch.randn(B, HQ, 1, HD, device=dev, dtype=BF16)
    L = torch.full((B,), T, device=dev)
    w_gu = (torch.randn(E, 2 * FF, DM, device=dev, dtype=BF16) / DM ** 0.5).requires_grad_()
    w_d = (torch.randn(E, DM, FF, device=dev, dtype=BF16) / FF ** 0.5).requires_grad_()
    xs = {n: torch.randn(n, DM, device=dev, dtype=BF16, requires_grad=True) for n in (16, N)}
    idx = {n: torch.randint(0, E, (n,), device=dev) for n in xs}
    gate = {n: torch.rand(n, device=dev, dtype=BF16, requires_grad=True) for n in xs}

    def bwd(out):
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])

    cases = {
        "cca_qk fwd+bwd": lambda: bwd(zk.cca_qk_prep(qk, *conv, cos, sin, HQ, HK, HD)),
        "attention fwd+bwd": lambda: bwd(zk.latent_attention(q, k, v)),
        "decode": lambda: zk.latent_attention_decode(qd, k.detach(), v.detach(), L),
        "moe fwd N16": lambda: zk.moe_experts(xs[16].detach(), idx[16], gate[16].detach(), w_gu.detach(), w_d.detach()),
        f"moe fwd+bwd N{N}": lambda: bwd(zk.moe_experts(xs[N], idx[N], gate[N], w_gu, w_d)),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        host_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        evs = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        evs.sort(key=lambda e: -e.device_time_total)
        kern = {e.key[:60]: round(e.device_time_total / 1e3, 4) for e in evs[:10]}
        row = {"kernel": name, "host_ms_per_call": round(host_ms, 4), "gpu_ms_top_kernels": kern}
        if name in ("decode", "moe fwd N16"):   # launch-bound: where does the host time go?
            import cProfile
            import io
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                fn()
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
            row["host_top"] = [ln.strip()[:150] for ln in buf.getvalue().splitlines() if ln.strip()][-13:]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT.parent / "outputs" / "bench" / "tune.json"))
    ap.add_argument("--only", default="profile,attention,cca_qk,moe")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_kernels: needs a CUDA device (the interpreter's timings mean nothing)")
        return 2
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "rows": []}
    jobs = {"attention": lambda: tune_attention(a.batch, a.tokens), "cca_qk": lambda: tune_cca_qk(a.batch, a.tokens),
            "moe": lambda: tune_moe(a.batch * a.tokens), "profile": lambda: profile(a.batch, a.tokens)}
    for name in a.only.split(","):
        try:
            result["rows"] += [{"op": name, **r} for r in jobs[name]()]
        except Exception as e:  # noqa: BLE001 - keep the other ops' rows
            result["rows"].append({"op": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        write_json(pathlib.Path(a.out), result)
    print("\nop         kernel         ms        x default  variant")
    base = {}
    for r in result["rows"]:
        if "ms" in r and (r["op"], r.get("kernel")) not in base:
            base[(r["op"], r.get("kernel"))] = r["ms"]
        b = base.get((r["op"], r.get("kernel")))
        ratio = f"{b / r['ms']:.2f}" if "ms" in r and b else "-"
        print(f"{r['op']:<10} {str(r.get('kernel')):<14} {str(r.get('ms', r.get('error', '')))[:40]:<9} "
              f"{ratio:>9}  {r.get('variant')}")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

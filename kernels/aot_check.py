"""Compile every zaya_kernels Triton kernel for an NVIDIA GPU on a machine WITHOUT one, and report register use.

    TRITON_INTERPRET=0 python -m zaya_kernels.aot_check [--arch 90] [--dtype bf16]

Notable features:
- The CPU interpreter accepts code and shapes a GPU rejects (environment.md §2). This runs Triton's real compiler
  (TTIR -> TTGIR -> LLVM -> PTX -> ptxas, all shipped in the triton wheel) for the given compute capability with the
  launchers' own block sizes and warp counts at ZAYA1-8B shapes (Hq=8, Hk=2, d=128), so GPU-illegal code fails here.
- Prints registers per thread and spill (stack) bytes from the cubin (cuobjdump, also in the wheel): the numbers the
  launchers' block sizes were chosen by. Exit status 1 if any kernel fails to compile. Takes about a minute.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_check compiles for a GPU: run it with TRITON_INTERPRET=0")
os.environ["TRITON_INTERPRET"] = "0"

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

C = importlib.import_module(f"{__package__ or 'zaya_kernels'}.cca_qk.cca_qk")
A = importlib.import_module(f"{__package__ or 'zaya_kernels'}.latent_attention.latent_attention")
M = importlib.import_module(f"{__package__ or 'zaya_kernels'}.moe_experts.moe_experts")
launch_opts = importlib.import_module(f"{__package__ or 'zaya_kernels'}._utils").launch_opts


def compile_one(fn, types: dict, const: dict, opts, arch: int) -> str:
    """opts: num_warps (int) or a dict of compile options (num_warps, num_stages)."""
    sig = {a: ("constexpr" if a in const else types.get(a, "i32")) for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts if isinstance(opts, dict) else {"num_warps": opts})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    return f"regs {m.group(1):>3}  spill/stack {m.group(2):>5} B  smem {k.metadata.shared:>6} B" if m else usage[-120:]


def jobs(dt: torch.dtype):
    p = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]
    DOT_T, PREC = (tl.float32, "ieee") if dt == torch.float32 else ({torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dt], "tf32")
    Hq, Hk, d, T = 8, 2, 128, 4096
    # cca_qk
    cf, cd, cv = C._cfg("fwd", T, d), C._cfg("bwd_dy", T, d), C._cfg("bwd_conv", T, d)
    BQ, BH = cf["BQ"], cf["BH"]
    ty = {n: p for n in ("qk", "state", "dw_w", "dw_b", "g_w", "g_b", "temp", "cos", "sin", "out", "dout", "dqk")}
    ty.update(eps="fp32", sqrt_d="fp32", dy="*fp32", dtemp_part="*fp32", d_dw_w="*fp32", d_dw_b="*fp32", a_out=p,
              a0_out=p, d_g_w="*fp32", d_g_b="*fp32", doc_pos="*i32")
    cc = dict(HQ=Hq, HK=Hk, D=d, DOT_T=DOT_T, PREC=PREC)
    for hs, hd in ((False, False), (True, False), (False, True)):
        yield (f"cca_qk fwd (conv_state={hs}, doc={hd})", C._fwd_kernel, ty,
               {**cc, "BT": cf["BT"], "BQ": BQ, "BH": BH, "HAS_STATE": hs, "HAS_DOC": hd, "NB": cf["NB"]}, launch_opts(cf))
    for hd in (False, True):
        yield f"cca_qk bwd dy (doc={hd})", C._bwd_dy_kernel, ty, {**cc, "BT": cd["BT"], "BQ": BQ, "BH": BH,
                                                                   "HAS_DOC": hd}, launch_opts(cd)
        yield f"cca_qk bwd conv (doc={hd})", C._bwd_conv_kernel, ty, {**cc, "BT": cv["BT"], "HAS_DOC": hd}, launch_opts(cv)
    # latent attention
    fc, bc = A._cfg("fwd", T, d, dt), A._cfg("bwd", T, d, dt)
    ty = {n: p for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
    ty.update(lse="*fp32", delta="*fp32", key_start="*i64", sm_scale="fp32", lengths="*i64", o_part="*fp32",
              lse_part="*fp32", doc_start="*i32", doc_end="*i32")
    for hs, hd in ((True, False), (False, True)):   # left padding (decode-style prefill) / document masking
        ac = dict(HQ=Hq, G=Hq // Hk, D=d, HAS_START=hs, HAS_DOC=hd, DOT_T=DOT_T, PREC=PREC)
        yield (f"attention fwd (doc={hd})", A._fwd_kernel, ty, {**ac, "BM": fc["BM"], "BN": fc["BN"], "REV": fc["REV"]},
               launch_opts(fc))
        ac.update(BM=bc["BM"], BN=bc["BN"])
        yield f"attention bwd dk/dv (doc={hd})", A._bwd_dkdv_kernel, ty, {**ac, "HK": Hk}, launch_opts(bc)
        yield f"attention bwd dq (doc={hd})", A._bwd_dq_kernel, ty, {**ac, "REV": bc["REV"]}, launch_opts(bc)
    yield "attention decode", A._decode_kernel, ty, dict(HK=Hk, G=Hq // Hk, D=d, BG=16, BN=64, HAS_START=True,
                                                          DOT_T=DOT_T, PREC=PREC), 4
    # moe experts
    mg, mw = M._cfg("gemm", 8192, 2048, 2048), M._cfg("wgrad", 8192, 2048, 2048)
    ty = {n: p for n in ("x", "w_gu", "h", "gu", "a", "w", "c", "aux", "p", "q", "dw", "gate")}
    ty.update(order="*i32", tile_expert="*i32", tile_row="*i32", offsets="*i32")
    mc = dict(BM=mg["BM"], BN=mg["BN"], BK=mg["BK"], DOT_T=DOT_T, PREC=PREC)
    yield "moe up + SwiGLU", M._up_swiglu_kernel, ty, {**mc, "SAVE": True}, launch_opts(mg)
    for epi, name in ((0, "down + gate + scatter"), (1, "dh + SwiGLU bwd"), (2, "dx scatter")):
        yield f"moe {name}", M._grouped_mm_kernel, ty, {**mc, "EPI": epi, "SAVE": epi == 0}, launch_opts(mg)
    yield "moe route map", M._route_kernel, {"sorted_key": "*i64", "offsets": "*i32", "tile_expert": "*i32",
                                             "tile_row": "*i32"}, dict(E=16, BE=32, BR=1024, BT=512, BM=mg["BM"]), 4
    for g in (False, True):
        yield f"moe weight grad (gather={g})", M._wgrad_kernel, ty, dict(GATHER_Q=g, BP=mw["BP"], BQ=mw["BQ"], BM=mw["BM"],
                                                                          DOT_T=DOT_T, PREC=PREC), launch_opts(mw)


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description="compile zaya_kernels for a GPU without one")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 A100, 90 H100)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    a = ap.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    failed = 0
    for name, fn, ty, const, nw in jobs(dt):
        try:
            w = nw["num_warps"] if isinstance(nw, dict) else nw
            print(f"OK    {name:<34} {compile_one(fn, ty, const, nw, a.arch)}  ({w} warps)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every kernel, fail at the end
            failed += 1
            print(f"FAIL  {name:<34} {type(e).__name__}: {str(e)[:600]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

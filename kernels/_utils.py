"""Shared plumbing for the zaya_kernels Triton ops: interpreter detection, dtype mapping, input checks.

Notable features:
- `INTERPRET` is read once, at import: Triton decides at `@triton.jit` decoration time whether a kernel runs on a GPU
  driver or in the CPU interpreter (environment.md §2), so a later change of the variable cannot take effect.
- `dot_dtype` upcasts every `tl.dot` operand to fp32 in the interpreter, where bf16 dots are broken
  (triton-lang/triton#11584), and for fp32 inputs; on a GPU half-precision operands feed the tensor cores directly.
- `check_tensor` turns a wrong rank, dtype, shape or device into a ValueError naming the argument, before any launch.
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """The Triton dtype `tl.dot` operands are cast to, and the matching `input_precision`.

    fp32 inputs use exact IEEE fp32 dots (no TF32) so fp32 tests are tight on a GPU too."""
    if INTERPRET or dtype == torch.float32:
        return tl.float32, "ieee"
    return _TL[dtype], "tf32"  # input_precision is ignored for 16-bit operands


def check_tensor(name: str, x: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None,
                 dtypes: tuple = SUPPORTED_DTYPES) -> None:
    """Raise ValueError unless `x` has exactly `shape` (None = any size), a supported dtype and a usable device."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(shape) or any(s is not None and s != xs for s, xs in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {want}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype}")
    if dtype is None and x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    check_device(name, x)


def check_device(name: str, x: torch.Tensor) -> None:
    if x.is_cuda:
        if INTERPRET:
            raise ValueError(f"{name} is on {x.device} but TRITON_INTERPRET=1 (CPU interpreter); move it to the CPU")
        return
    if not INTERPRET:
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set "
                         "before zaya_kernels is imported to run them in the CPU interpreter")


def launch_opts(cfg: dict) -> dict:
    """The compile options of a kernel's launch settings (each module's `_cfg`): warps and pipeline stages."""
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= n, at least `lo` (GPU tl.dot needs every dimension >= 16)."""
    return max(lo, triton_next_pow2(n))


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

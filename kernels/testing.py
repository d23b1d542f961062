"""Comparison helpers for the kernel tests and the notebook (fla `assert_close` and mamba's half-precision rule).

- `rel_rmse(ref, out)`: RMSE(out - ref) / RMSE(ref), the fla error ratio; insensitive to the tensor's scale.
- `assert_close(name, ref, out, ratio, atol)`: passes when the max abs error is <= atol (for references that are ~0,
  e.g. dq of a single token) or the ratio is <= `ratio`; the failure message gives max/mean abs error and the ratio.
- `assert_half_close(name, ref32, ref_half, out, atol)`: the kernel's error against the fp32 truth must be at most
  twice the eager PyTorch half-precision error plus atol (mamba's rule, style.md §5).
"""
from __future__ import annotations

import torch


def rel_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _diff(ref, out):
    d = (out.detach().double() - ref.detach().double()).abs()
    return d.max().item() if d.numel() else 0.0, d.mean().item() if d.numel() else 0.0


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float, atol: float = 0.0) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    mx, mean = _diff(ref, out)
    if mx <= atol:
        return
    r = rel_rmse(ref, out)
    assert r <= ratio, f"{name}: rel-RMSE {r:.3g} > {ratio:g} (max abs err {mx:.3g}, mean {mean:.3g})"


def assert_half_close(name: str, ref32: torch.Tensor, ref_half: torch.Tensor, out: torch.Tensor, atol: float) -> None:
    assert ref32.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref32.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, mean = _diff(ref32, out)
    err_pt, _ = _diff(ref32, ref_half)
    assert err <= 2 * err_pt + atol, (f"{name}: max abs err {err:.3g} (mean {mean:.3g}) > 2 x eager half error "
                                      f"{err_pt:.3g} + atol {atol:.3g}")


def compare_to_reference(fn, ref, leaves, extra_args=(), seed: int = 0, names=None) -> dict:
    """Run `fn` and `ref` on copies of `leaves` (floating ones require grad), backprop the same random cotangents,
    and return {name: rel-RMSE for each output then each gradient, "kernel_seconds": fwd+bwd wall time of fn}.
    `names` labels outputs then gradients (default out<i>, grad<j>)."""
    import time

    probe = ref(*leaves, *extra_args)
    probe = probe if isinstance(probe, tuple) else (probe,)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in probe]

    def go(f):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves]
        t0 = time.perf_counter()
        outs = f(*xs, *extra_args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, cot[: len(outs)])
        return outs, [x.grad for x in xs if x.is_floating_point()], time.perf_counter() - t0

    outs, grads, secs = go(fn)
    outs_r, grads_r, _ = go(ref)
    errs = [rel_rmse(r, o) for o, r in zip(outs, outs_r)] + [rel_rmse(r, x) for x, r in zip(grads, grads_r)]
    names = names or [f"out{i}" for i in range(len(outs))] + [f"grad{j}" for j in range(len(grads))]
    row = dict(zip(names, errs))
    row["kernel_seconds"] = round(secs, 2)
    return row

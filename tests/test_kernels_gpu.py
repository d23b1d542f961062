"""GPU-only kernel checks at ZAYA1-8B head geometry in bf16 (Hq=8, Hk=2, d=128) against fp32 references.

Skipped without CUDA (the interpreter tests in test_kernels_{cca_qk,attention,moe}.py cover the math on the CPU;
they run on the GPU too when one is present). Tolerance: mamba's rule, <= 2x eager bf16 error + a few bf16 ulps."""
import pytest
import torch

import _helpers  # noqa: F401 (first: the Triton interpreter without CUDA)
from zaya_kernels import (cca_qk_prep, cca_qk_prep_ref, latent_attention, latent_attention_decode,
                          latent_attention_decode_ref, latent_attention_ref, moe_experts, moe_experts_ref)
from zaya_kernels.cca_qk import rope_cos_sin
from zaya_kernels.testing import assert_half_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16, ULP = torch.bfloat16, torch.finfo(torch.bfloat16).eps


def _grads(fn, leaves, args, dys):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    outs = fn(*leaves, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.float() * dy).sum() for o, dy in zip(outs, dys)).backward()
    return outs, [x.grad for x in leaves]


def _check(name, fn, ref, leaves, args, dys):
    outs, grads = _grads(fn, leaves, args, dys)
    outs_h, grads_h = _grads(ref, leaves, args, dys)
    outs32, grads32 = _grads(ref, [x.float() for x in leaves], [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args], dys)
    for i, (o, oh, o32) in enumerate(zip(outs, outs_h, outs32)):
        assert_half_close(f"{name} out{i}", o32, oh.float(), o.float(), 4 * ULP * o32.abs().max().item())
    # a gradient that is exactly 0 in exact arithmetic (dq of a single token: softmax over one key) is rounding
    # noise in both half-precision paths: judge it against 1% of the largest gradient's scale
    floor = 0.01 * max(g.abs().max().item() for g in grads32)
    for i, (g, gh, g32) in enumerate(zip(grads, grads_h, grads32)):
        assert_half_close(f"{name} grad{i}", g32, gh.float(), g.float(), 4 * ULP * max(g32.abs().max().item(), floor))


@pytest.mark.gpu
def test_gpu_cca_qk_bf16():
    B, T, Hq, Hk, d = 2, 512, 8, 2, 128
    C = (Hq + Hk) * d
    dev = "cuda"
    leaves = [torch.randn(B, T, C, device=dev, dtype=BF16), 0.7 * torch.randn(C, 1, 2, device=dev, dtype=BF16),
              0.3 * torch.randn(C, device=dev, dtype=BF16), torch.randn(C, d, 2, device=dev, dtype=BF16) / 16,
              0.3 * torch.randn(C, device=dev, dtype=BF16), (torch.rand(Hk, device=dev) + 0.5).to(BF16)]
    cos, sin = rope_cos_sin(B, T, d // 2, theta=1e4, device=dev, dtype=BF16)
    dys = [torch.randn(B, T, Hq, d, device=dev), torch.randn(B, T, Hk, d, device=dev)]
    _check("cca_qk", cca_qk_prep, cca_qk_prep_ref, leaves, [cos, sin, Hq, Hk, d], dys)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 1024], ids=lambda t: f"T{t}")
def test_gpu_attention_bf16(T):
    B, Hq, Hk, d = 2, 8, 2, 128
    leaves = [torch.randn(B, Hq, T, d, device="cuda", dtype=BF16), torch.randn(B, Hk, T, d, device="cuda", dtype=BF16),
              torch.randn(B, Hk, T, d, device="cuda", dtype=BF16)]
    _check("attention", latent_attention, latent_attention_ref, leaves, [], [torch.randn(B, Hq, T, d, device="cuda")])


@pytest.mark.gpu
def test_gpu_attention_decode_bf16():
    B, Hq, Hk, S, d = 4, 8, 2, 4096, 128
    q = torch.randn(B, Hq, 1, d, device="cuda", dtype=BF16)
    kc, vc = (torch.randn(B, Hk, S, d, device="cuda", dtype=BF16) for _ in range(2))
    L = torch.tensor([4096, 1, 777, 2048], device="cuda")
    o = latent_attention_decode(q, kc, vc, L)
    o32 = latent_attention_decode_ref(q.float(), kc.float(), vc.float(), L)
    assert_half_close("decode", o32, latent_attention_decode_ref(q, kc, vc, L).float(), o.float(), 4 * ULP * o32.abs().max().item())


@pytest.mark.gpu
def test_gpu_moe_bf16():
    N, D, F, E = 4096, 512, 512, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    idx = torch.randint(-1, E, (N,), device="cuda", generator=g)
    leaves = [torch.randn(N, D, device="cuda", dtype=BF16), torch.rand(N, device="cuda", dtype=BF16),
              torch.randn(E, 2 * F, D, device="cuda", dtype=BF16) / D ** 0.5, torch.randn(E, D, F, device="cuda", dtype=BF16) / F ** 0.5]

    def fn(x, gate, wgu, wd):
        return moe_experts(x, idx, gate, wgu, wd)

    def ref(x, gate, wgu, wd):
        return moe_experts_ref(x, idx, gate, wgu, wd)

    dy = torch.randn(N, D, device="cuda")
    outs, grads = _grads(fn, leaves, [], [dy])
    outs_h, grads_h = _grads(ref, leaves, [], [dy])
    outs32, grads32 = _grads(ref, [x.float() for x in leaves], [], [dy])
    assert_half_close("y", outs32[0], outs_h[0].float(), outs[0].float(), 4 * ULP * outs32[0].abs().max().item())
    # dgate_n = dy_n . o_n cancels, so its rounding error scales with sum |dy_n o_n| rather than |dgate|
    o32 = moe_experts_ref(leaves[0].float(), idx, torch.ones(N, device="cuda"), leaves[2].float(), leaves[3].float())
    scales = [grads32[0].abs().max().item(), (dy.abs() * o32.abs()).sum(-1).max().item(),
              grads32[2].abs().max().item(), grads32[3].abs().max().item()]
    for name, gk, gh, g32, sc in zip(("dx", "dgate", "dgate_up", "ddown"), grads, grads_h, grads32, scales):
        assert_half_close(name, g32, gh.float(), gk.float(), 4 * ULP * sc)

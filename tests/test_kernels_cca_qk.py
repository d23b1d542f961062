"""Fused CCA q/k preparation kernel vs its PyTorch reference: forward, every gradient, decode with conv_state, errors.

Runs on a GPU when CUDA is present, else in the Triton CPU interpreter (`_helpers` sets it up before the kernels are
imported)."""
import pytest
import torch

from _helpers import DEVICE, HALF  # first: the Triton interpreter without CUDA
from zaya_kernels import cca_qk_prep, cca_qk_prep_ref
from zaya_kernels.cca_qk import rope_cos_sin
from zaya_kernels.testing import assert_close, assert_half_close

# fp32: the kernel computes exactly the reference's arithmetic in another order; 1e-4 rel-RMSE leaves ~100x margin
# over the ~1e-6 measured in the interpreter, and IEEE (not TF32) dots keep it on a GPU.
RATIO32 = 1e-4

SHAPES = [  # (B, T, Hq, Hk, d)
    (1, 63, 4, 2, 32),
    (1, 1, 2, 1, 16),      # a single token: only the pad feeds the convs
    (1, 200, 2, 1, 16),
    (1, 7, 8, 2, 64),      # the real head ratio G = 4
    (3, 2, 2, 2, 32),      # G = 1, T = 2
]
IDS = ["B{}-T{}-Hq{}-Hk{}-d{}".format(*s) for s in SHAPES]


def make_inputs(B, T, Hq, Hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = (Hq + Hk) * d

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    # non-default values everywhere: biases nonzero, temperatures far from 0/1, so every path carries signal
    inputs = dict(qk=r(B, T, C), dw_weight=r(C, 1, 2, scale=0.7), dw_bias=r(C, scale=0.3),
                  g_weight=r(C, d, 2, scale=(2 * d) ** -0.5), g_bias=r(C, scale=0.3),
                  temp=(torch.rand(Hk, generator=g) + 0.5).to(DEVICE, dtype))
    cos, sin = rope_cos_sin(B, T, d // 2, theta=100.0, device=DEVICE, dtype=dtype)
    return inputs, cos, sin


def run(fn, inputs, cos, sin, dims, grads_out):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    q, k = fn(*leaves.values(), cos, sin, *dims)
    (q.float() * grads_out[0]).sum().add((k.float() * grads_out[1]).sum()).backward()
    return (q, k), {name: x.grad for name, x in leaves.items()}


def check_fp32_against_reference(shape, seed=0):
    """Kernel vs reference in fp32: q, k and the gradient of every input (atol covers exact-zero references)."""
    B, T, Hq, Hk, d = shape
    inputs, cos, sin = make_inputs(*shape, torch.float32, seed=seed)
    go = (torch.randn(B, T, Hq, d, device=DEVICE), torch.randn(B, T, Hk, d, device=DEVICE))
    (q, k), grads = run(cca_qk_prep, inputs, cos, sin, (Hq, Hk, d), go)
    (qr, kr), grads_ref = run(cca_qk_prep_ref, inputs, cos, sin, (Hq, Hk, d), go)
    assert_close("q", qr, q, RATIO32)
    assert_close("k", kr, k, RATIO32)
    for name in grads_ref:
        assert_close(f"d{name}", grads_ref[name], grads[name], RATIO32, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_cca_qk_fp32(shape):
    check_fp32_against_reference(shape)


@pytest.mark.parametrize("dtype", HALF, ids=[str(d)[6:] for d in HALF])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_cca_qk_half(shape, dtype):
    B, T, Hq, Hk, d = shape
    inputs, cos, sin = make_inputs(*shape, dtype)
    go = (torch.randn(B, T, Hq, d, device=DEVICE), torch.randn(B, T, Hk, d, device=DEVICE))
    (q, k), grads = run(cca_qk_prep, inputs, cos, sin, (Hq, Hk, d), go)
    (qh, kh), grads_h = run(cca_qk_prep_ref, inputs, cos, sin, (Hq, Hk, d), go)
    in32 = {n: v.float() for n, v in inputs.items()}
    (q32, k32), grads32 = run(cca_qk_prep_ref, in32, cos.float(), sin.float(), (Hq, Hk, d), go)
    # atol: a few half-precision ulps at the tensor's largest magnitude (the output is rounded to `dtype` once)
    ulp = torch.finfo(dtype).eps

    def atol(ref):
        return 4 * ulp * ref.abs().max().item()

    assert_half_close("q", q32, qh, q.float(), atol(q32))
    assert_half_close("k", k32, kh, k.float(), atol(k32))
    for name in grads32:
        assert_half_close(f"d{name}", grads32[name], grads_h[name], grads[name].float(), atol(grads32[name]))


@pytest.mark.parametrize("tiles", [(16, 3), (16, 8), (32, 2)], ids=lambda t: f"BT{t[0]}-NB{t[1]}")
def test_cca_qk_time_blocks_per_program(tiles, monkeypatch):
    """The GPU forward gives each program several time blocks (NB) and loads the conv taps once; force that path
    (and small blocks in the backward) in the interpreter: the last program's blocks run past T (masked)."""
    import importlib

    C_ = importlib.import_module("zaya_kernels.cca_qk.cca_qk")
    BT, NB = tiles
    for kernel in ("fwd", "bwd_dy", "bwd_conv"):
        monkeypatch.setitem(C_.TUNING, kernel, {"BT": BT, "NB": NB})
    check_fp32_against_reference((2, 101, 4, 2, 32), seed=3)


@pytest.mark.parametrize("split", [1, 2, 5], ids=["split1", "split2", "split5"])
def test_cca_qk_conv_state_continues_the_sequence(split):
    """Prefill [0, split) then continue [split, T) with conv_state = the last two raw columns (zero-padded when
    split < 2) gives the full forward's q/k; split = T-1 continues with a single token (the decode form)."""
    B, T, Hq, Hk, d = 2, 6, 2, 1, 16
    inputs, cos, sin = make_inputs(B, T, Hq, Hk, d, torch.float32, seed=1)
    dims = (Hq, Hk, d)
    w = [inputs[k] for k in ("dw_weight", "dw_bias", "g_weight", "g_bias", "temp")]
    qk = inputs["qk"]
    q_full, k_full = cca_qk_prep(qk, *w, cos, sin, *dims)
    state = torch.nn.functional.pad(qk[:, :split].transpose(1, 2), (2, 0))[..., -2:]     # [B, C, 2]
    for lo, hi in [(split, split + 1), (split, T)]:
        q, k = cca_qk_prep(qk[:, lo:hi], *w, cos[:, lo:hi], sin[:, lo:hi], *dims, conv_state=state)
        qr, kr = cca_qk_prep_ref(qk[:, lo:hi], *w, cos[:, lo:hi], sin[:, lo:hi], *dims, conv_state=state)
        assert_close("q vs reference", qr, q, RATIO32)
        assert_close("k vs reference", kr, k, RATIO32)
        assert_close("q vs full forward", q_full[:, lo:hi], q, RATIO32)
        assert_close("k vs full forward", k_full[:, lo:hi], k, RATIO32)


def test_cca_qk_zero_temperature_zeroes_keys_not_queries():
    """temp = 0 (HF's init) gives k = 0 exactly and still a finite dtemp (the gradient that lets training leave 0)."""
    B, T, Hq, Hk, d = 1, 5, 2, 1, 16
    inputs, cos, sin = make_inputs(B, T, Hq, Hk, d, torch.float32)
    inputs["temp"] = torch.zeros(Hk, device=DEVICE)
    go = (torch.randn(B, T, Hq, d, device=DEVICE), torch.randn(B, T, Hk, d, device=DEVICE))
    (q, k), grads = run(cca_qk_prep, inputs, cos, sin, (Hq, Hk, d), go)
    (_, _), grads_ref = run(cca_qk_prep_ref, inputs, cos, sin, (Hq, Hk, d), go)
    assert k.abs().max().item() == 0.0 and q.abs().max().item() > 0
    assert_close("dtemp", grads_ref["temp"], grads["temp"], RATIO32)


def test_cca_qk_shared_rope_table():
    """cos/sin of shape [1, T, R] are shared by the batch (same result as the expanded [B, T, R] tables)."""
    B, T, Hq, Hk, d = 2, 5, 2, 1, 16
    inputs, cos, sin = make_inputs(B, T, Hq, Hk, d, torch.float32)
    q, k = cca_qk_prep(*inputs.values(), cos, sin, Hq, Hk, d)
    q1, k1 = cca_qk_prep(*inputs.values(), cos[:1], sin[:1], Hq, Hk, d)
    assert torch.equal(q, q1) and torch.equal(k, k1)


def test_cca_qk_rejects_bad_inputs():
    B, T, Hq, Hk, d = 1, 4, 2, 1, 16
    inputs, cos, sin = make_inputs(B, T, Hq, Hk, d, torch.float32)
    args = list(inputs.values())
    with pytest.raises(ValueError, match="dtype"):
        cca_qk_prep(args[0].double(), *args[1:], cos, sin, Hq, Hk, d)
    with pytest.raises(ValueError, match=r"qk must be \[B, T, C\]"):
        cca_qk_prep(args[0][0], *args[1:], cos, sin, Hq, Hk, d)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cca_qk_prep(*args, cos, sin, 3, 2, d)
    with pytest.raises(ValueError, match="power of two"):
        cca_qk_prep(*args, cos, sin, 3, 1, 12)          # 48 channels = (3+1)*12 but d = 12
    with pytest.raises(ValueError, match="channels"):
        cca_qk_prep(*args, cos, sin, 4, 1, d)
    with pytest.raises(ValueError, match="g_weight"):
        cca_qk_prep(*args[:3], args[3][:, :8], *args[4:], cos, sin, Hq, Hk, d)
    with pytest.raises(ValueError, match="cos"):
        cca_qk_prep(*args, cos[..., :4], sin, Hq, Hk, d)
    with pytest.raises(ValueError, match="conv_state"):
        cca_qk_prep(*args, cos, sin, Hq, Hk, d, conv_state=torch.zeros(B, 48, 3, device=DEVICE))


@pytest.mark.parametrize("BT", [None, 16], ids=["default", "BT16"])
def test_cca_qk_document_mask_equals_documents_alone(BT, monkeypatch):
    """doc_pos (document masking of packed windows): q, k and every input's gradient equal the reference run on each
    document alone (conv history and zero pad restart at every document start, including 1- and 2-token documents)."""
    import importlib

    from zaya_lib.model.documents import DocMask

    if BT is not None:
        C_ = importlib.import_module("zaya_kernels.cca_qk.cca_qk")
        for kernel in ("fwd", "bwd_dy", "bwd_conv"):
            monkeypatch.setitem(C_.TUNING, kernel, {"BT": BT})
    lens = [[9, 30, 1, 2, 3, 25], [70]]
    B, T, Hq, Hk, d = 2, 70, 4, 2, 16
    inputs, cos, sin = make_inputs(B, T, Hq, Hk, d, torch.float32, seed=4)
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lens]).to(DEVICE)
    g = torch.Generator().manual_seed(5)
    go = (torch.randn(B, T, Hq, d, generator=g).to(DEVICE), torch.randn(B, T, Hk, d, generator=g).to(DEVICE))
    pos = DocMask(doc_ids).position_ids
    (q, k), grads = run(lambda *a: cca_qk_prep(*a, doc_pos=pos), inputs, cos, sin, (Hq, Hk, d), go)

    leaves = {n: v.detach().clone().requires_grad_() for n, v in inputs.items()}
    w = [leaves[n] for n in ("dw_weight", "dw_bias", "g_weight", "g_bias", "temp")]
    loss = 0.0
    for b, row in enumerate(lens):
        s = 0
        for n in row:
            sl = slice(s, s + n)
            qa, ka = cca_qk_prep_ref(leaves["qk"][b:b + 1, sl], *w, cos[b:b + 1, sl], sin[b:b + 1, sl], Hq, Hk, d)
            loss = loss + (qa * go[0][b:b + 1, sl]).sum() + (ka * go[1][b:b + 1, sl]).sum()
            assert_close(f"q row {b} at {s}", qa, q[b:b + 1, sl], RATIO32)
            assert_close(f"k row {b} at {s}", ka, k[b:b + 1, sl], RATIO32)
            s += n
    loss.backward()
    for name, leaf in leaves.items():
        assert_close(f"d{name}", leaf.grad, grads[name], RATIO32, atol=1e-6)
    with pytest.raises(ValueError, match="doc_pos must be"):
        cca_qk_prep(*inputs.values(), cos, sin, Hq, Hk, d, doc_pos=pos[:, :3])

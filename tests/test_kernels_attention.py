"""Latent causal GQA attention kernels vs SDPA and the explicit-softmax reference: forward, dq/dk/dv, decode, errors.

Runs on a GPU when CUDA is present, else in the Triton CPU interpreter (`_helpers` sets it up before the kernels are
imported)."""
import pytest
import torch
import torch.nn.functional as F

from _helpers import DEVICE, HALF  # first: the Triton interpreter without CUDA
from zaya_kernels import latent_attention, latent_attention_decode, latent_attention_decode_ref, latent_attention_ref  # noqa: E501
from zaya_kernels.testing import assert_close, assert_half_close

# fp32: same math as SDPA up to summation order and exp2 vs exp; measured ~3e-7 rel-RMSE, 1e-4 leaves wide margin.
# atol 1e-6 covers references that are exactly 0 (dq of a single token: softmax over one key has no q gradient).
RATIO32, ATOL32 = 1e-4, 1e-6

SHAPES = [  # (B, Hq, Hk, T, d)
    (2, 4, 2, 63, 32),
    (1, 2, 1, 200, 16),
    (1, 4, 1, 1, 32),     # a single token
    (1, 8, 2, 17, 64),    # the real head ratio G = 4
    (3, 2, 2, 5, 16),     # G = 1 (plain MHA)
]
IDS = ["B{}-Hq{}-Hk{}-T{}-d{}".format(*s) for s in SHAPES]


def make_qkv(B, Hq, Hk, T, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q is built [B, T, H, d] and transposed, as the model does: the kernels must honour strides
    q = torch.randn(B, T, Hq, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hk, T, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hk, T, d, generator=g).to(DEVICE, dtype)
    return q, k, v


def run(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    (o.float() * do).sum().backward()
    return o, (q.grad, k.grad, v.grad)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_attention_fp32(shape):
    q, k, v = make_qkv(*shape, torch.float32)
    do = torch.randn(q.shape, device=DEVICE)
    o, grads = run(latent_attention, q, k, v, do)
    o_ref, grads_ref = run(sdpa, q, k, v, do)
    o_ex, _ = run(latent_attention_ref, q, k, v, do)
    assert_close("o vs explicit reference", o_ex, o, RATIO32)
    assert_close("o", o_ref, o, RATIO32)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, gr, g, RATIO32, ATOL32)


@pytest.mark.parametrize("dtype", HALF, ids=[str(d)[6:] for d in HALF])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_attention_half(shape, dtype):
    q, k, v = make_qkv(*shape, dtype)
    do = torch.randn(q.shape, device=DEVICE)
    o, grads = run(latent_attention, q, k, v, do)
    o_h, grads_h = run(latent_attention_ref, q, k, v, do)
    o32, grads32 = run(latent_attention_ref, q.float(), k.float(), v.float(), do)
    ulp = torch.finfo(dtype).eps   # atol: a few ulps at the largest magnitude (outputs are rounded to dtype once)
    assert_half_close("o", o32, o_h.float(), o.float(), 4 * ulp * o32.abs().max().item())
    for name, g, gh, g32 in zip(("dq", "dk", "dv"), grads, grads_h, grads32):
        assert_half_close(name, g32, gh.float(), g.float(), 4 * ulp * g32.abs().max().item() + 1e-6)


def test_attention_scale_argument():
    q, k, v = make_qkv(1, 2, 1, 9, 16, torch.float32)
    assert_close("o", sdpa(q * 1, k * 0.3, v), latent_attention(q, k, v, scale=0.3 / 16 ** 0.5), RATIO32)


DECODE = [  # (B, Hq, Hk, S, d, lengths)
    (3, 8, 2, 70, 32, [70, 1, 33]),
    (2, 4, 4, 1, 16, [1, 1]),            # cache of one token, G = 1
    (2, 2, 1, 200, 16, [0, 137]),        # an empty row returns zeros
]


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=["float32"] + [str(d)[6:] for d in HALF])
@pytest.mark.parametrize("case", DECODE, ids=["B{}-Hq{}-Hk{}-S{}-d{}-L{}".format(*c[:5], "_".join(map(str, c[5]))) for c in DECODE])
def test_attention_decode(case, dtype):
    B, Hq, Hk, S, d, lengths = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, Hq, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    kc = torch.randn(B, S, Hk, d, generator=g).to(DEVICE, dtype).transpose(1, 2)   # a strided [B, Hk, S, d] cache
    vc = torch.randn(B, S, Hk, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
    L = torch.tensor(lengths, device=DEVICE)
    o = latent_attention_decode(q, kc, vc, L)
    o32 = latent_attention_decode_ref(q.float(), kc.float(), vc.float(), L)
    if dtype == torch.float32:
        assert_close("o", o32, o, RATIO32, ATOL32)
    else:
        o_h = latent_attention_decode_ref(q, kc, vc, L)
        assert_half_close("o", o32, o_h.float(), o.float(), 4 * torch.finfo(dtype).eps * o32.abs().max().item())
    assert (o[torch.tensor(lengths, device=DEVICE) == 0] == 0).all()


def test_decode_matches_last_row_of_full_attention():
    """The decode kernel on a cache of T keys gives the full causal attention's last row."""
    q, k, v = make_qkv(2, 4, 2, 40, 32, torch.float32, seed=3)
    full = latent_attention(q, k, v)
    L = torch.full((2,), 40, device=DEVICE)
    assert_close("o", full[:, :, -1:], latent_attention_decode(q[:, :, -1:], k, v, L), RATIO32)


def check_with_key_start(q, k, v, ks):
    """Kernel vs the explicit-softmax reference with an optional left pad: output and dq/dk/dv in fp32."""
    do = torch.randn(q.shape, device=DEVICE)
    o, grads = run(lambda a, b_, c: latent_attention(a, b_, c, key_start=ks), q, k, v, do)
    o_ref, grads_ref = run(lambda a, b_, c: latent_attention_ref(a, b_, c, key_start=ks), q, k, v, do)
    assert_close("o", o_ref, o, RATIO32, ATOL32)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, gr, g, RATIO32, ATOL32)
    return o, grads


@pytest.mark.parametrize("starts", [[0, 5], [40, 13], [39, 0]], ids=["pad0_5", "pad40_13", "pad39_0"])
def test_attention_left_padding_key_start(starts):
    """key_start masks a left pad: real rows equal the sequence run alone, pad rows are 0, pads get no gradient."""
    B, Hq, Hk, T, d = 2, 4, 2, 40, 32
    q, k, v = make_qkv(B, Hq, Hk, T, d, torch.float32, seed=5)
    ks = torch.tensor(starts, device=DEVICE)
    o, grads = check_with_key_start(q, k, v, ks)
    for b, st in enumerate(starts):
        assert (o[b, :, :st] == 0).all() and (grads[1][b, :, :st] == 0).all() and (grads[0][b, :, :st] == 0).all()
        if st < T:
            alone = latent_attention(q[b:b + 1, :, st:], k[b:b + 1, :, st:], v[b:b + 1, :, st:])
            assert_close(f"row {b} vs alone", alone, o[b:b + 1, :, st:], RATIO32)
    L = torch.full((B,), T, device=DEVICE)
    dec = latent_attention_decode(q[:, :, -1:], k, v, L, key_start=ks)
    assert_close("decode", latent_attention_decode_ref(q[:, :, -1:], k, v, L, key_start=ks), dec, RATIO32, ATOL32)
    assert_close("decode vs full", o[:, :, -1:], dec, RATIO32, ATOL32)


@pytest.mark.parametrize("tiles", [(32, 16), (64, 32), (32, 32)], ids=lambda t: f"BM{t[0]}-BN{t[1]}")
@pytest.mark.parametrize("starts", [None, [0, 37]], ids=["nopad", "pad0_37"])
def test_attention_causal_split_tiles(tiles, starts, monkeypatch):
    """Small tiles give many key blocks wholly below the diagonal, which skip the causal mask: with and without a
    left pad (key_start inside a block), at a length that is no multiple of the tiles, fwd and grads match."""
    import importlib

    A = importlib.import_module("zaya_kernels.latent_attention.latent_attention")
    BM, BN = tiles
    monkeypatch.setitem(A.TUNING, "fwd", {"BM": BM, "BN": BN})
    monkeypatch.setitem(A.TUNING, "bwd", {"BM": BM, "BN": BN})
    q, k, v = make_qkv(2, 4, 2, 101, 16, torch.float32, seed=9)
    check_with_key_start(q, k, v, None if starts is None else torch.tensor(starts, device=DEVICE))
    monkeypatch.setitem(A.TUNING, "fwd", {"BM": 16, "BN": 32})
    with pytest.raises(ValueError, match="must divide"):
        latent_attention(q, k, v)


def test_attention_decode_merges_several_splits(monkeypatch):
    """Force the KV cache into several splits (the GPU's flash-decoding path; the interpreter defaults to one): the
    merge kernel must weight the splits by their logsumexps, give empty splits no weight and an empty row 0."""
    import importlib

    A = importlib.import_module("zaya_kernels.latent_attention.latent_attention")
    B, Hq, Hk, S, d = 4, 8, 2, 150, 32
    q, k, v = make_qkv(B, Hq, Hk, S, d, torch.float32, seed=11)
    q = q[:, :, -1:]
    L = torch.tensor([150, 1, 0, 77], device=DEVICE)   # all splits; first split only; none; a partial split
    # one split per key block: BN is 128 in the interpreter (S=150 -> 2 splits), 64 on a GPU (3 splits)
    monkeypatch.setitem(A.TUNING, "decode", {"SPLIT": 128 if DEVICE == "cpu" else 64})
    out = latent_attention_decode(q, k, v, L)
    assert_close("decode", latent_attention_decode_ref(q, k, v, L), out, RATIO32, ATOL32)
    assert (out[2] == 0).all()
    monkeypatch.setitem(A.TUNING, "decode", {"SPLIT": 100})
    with pytest.raises(ValueError, match="multiple of BN"):
        latent_attention_decode(q, k, v, L)


def test_attention_rejects_bad_inputs():
    q, k, v = make_qkv(1, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        latent_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="dtypes differ"):
        latent_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        latent_attention(q[0], k, v)
    with pytest.raises(ValueError, match="not a multiple"):
        latent_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="power of two"):
        latent_attention(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match=r"v has shape"):
        latent_attention(q, k, v[:, :, :5])
    L = torch.full((1,), 8, device=DEVICE)
    with pytest.raises(ValueError, match="one token"):
        latent_attention_decode(q, k, v, L)
    with pytest.raises(ValueError, match="lengths"):
        latent_attention_decode(q[:, :, :1], k, v, L.float())
    with pytest.raises(ValueError, match="key_start"):
        latent_attention(q, k, v, key_start=torch.zeros(3, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("tiles", [None, (32, 16), (16, 16), (64, 32)],
                         ids=lambda t: f"BM{t[0]}-BN{t[1]}" if t else "default")
def test_attention_document_mask(tiles, monkeypatch):
    """doc_start (document masking of packed windows): equals SDPA with the block-diagonal causal mask, forward and
    dq/dk/dv, and each document equals the same attention run on it alone. Small tiles make query blocks whose rows
    start in different documents and key blocks no row of a block can see (skipped)."""
    import importlib

    from zaya_lib.model.documents import DocMask

    A = importlib.import_module("zaya_kernels.latent_attention.latent_attention")
    if tiles is not None:
        monkeypatch.setitem(A.TUNING, "fwd", {"BM": tiles[0], "BN": tiles[1]})
        monkeypatch.setitem(A.TUNING, "bwd", {"BM": tiles[0], "BN": tiles[1]})
    lens = [[9, 30, 1, 20, 10, 1], [71]]
    B, Hq, Hk, T, d = 2, 4, 2, 71, 16
    doc_ids = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lens])
    dm = DocMask(doc_ids.to(DEVICE))
    q, k, v = make_qkv(B, Hq, Hk, T, d, torch.float32, seed=13)
    do = torch.randn(B, Hq, T, d, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    o, grads = run(lambda a, b, c: latent_attention(a, b, c, doc_start=dm.start), q, k, v, do)
    mask = dm.attn_mask()
    o_ref, grads_ref = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask, enable_gqa=True),
                           q, k, v, do)
    assert_close("o", o_ref, o, RATIO32, ATOL32)
    for name, g, gr in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, gr, g, RATIO32, ATOL32)
    s = 0
    for n in lens[0]:
        alone = latent_attention(q[:1, :, s:s + n], k[:1, :, s:s + n], v[:1, :, s:s + n])
        assert_close(f"document at {s}", alone, o[:1, :, s:s + n], RATIO32, ATOL32)
        s += n
    with pytest.raises(ValueError, match="doc_start must be"):
        latent_attention(q, k, v, doc_start=dm.start[:, :5])
    with pytest.raises(ValueError, match="exclusive"):
        latent_attention(q, k, v, key_start=torch.zeros(B, dtype=torch.long, device=DEVICE), doc_start=dm.start)

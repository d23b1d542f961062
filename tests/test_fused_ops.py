"""The hand-differentiated training nodes against the plain autograd expressions they replace.

Each node is checked with `torch.autograd.gradcheck` in float64 (finite differences, the default tolerances of
1e-5 relative / 1e-8 absolute on a Jacobian of O(1) entries) and its forward against the plain expression. The
plain expressions are what runs without autograd, so a node that drifted from them would also make training and
decoding disagree.
"""
import pytest
import torch
import torch.nn.functional as F

from zaya_lib.model import attention
from zaya_lib.model.attention import (_ConvPlusSkip, block_causal_attention, conv_plus_skip, use_block_attention)
from zaya_lib.model.fused_ops import _ResidualScale, _RMSNorm, residual_scale, rms_norm
from zaya_lib.model.moe import _RoutedSwiGLU, experts_forward_eager

f64 = dict(dtype=torch.float64)


def _rand(*shape, grad=True):
    return torch.randn(*shape, **f64).requires_grad_(grad)


def test_rms_norm_node_matches_plain_and_gradcheck():
    torch.manual_seed(0)
    x, w = _rand(3, 5, 16), _rand(16)
    plain = w * F.rms_norm(x, (16,), eps=1e-5)
    torch.testing.assert_close(_RMSNorm.apply(x, w, 1e-5), plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x, w))
    with torch.no_grad():  # the no-autograd branch is the plain expression
        torch.testing.assert_close(rms_norm(x, w, 1e-5), plain.detach(), rtol=1e-12, atol=1e-12)


def test_rms_norm_node_fp32_weight_on_bf16_input():
    """bf16 activations with fp32 weights (mixed precision): normalised in fp32, cast back, then scaled, as before."""
    torch.manual_seed(0)
    x = torch.randn(4, 32).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.1 * torch.randn(32)).requires_grad_()
    out = rms_norm(x, w, 1e-5)
    ref = w * F.rms_norm(x.float(), (32,), eps=1e-5).to(torch.bfloat16)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn(4, 32)
    (gx, gw), (rx, rw) = torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)  # fp32 sums of the same bf16-rounded xhat
    torch.testing.assert_close(gx, rx, rtol=2e-2, atol=2e-2)  # bf16 output: one bf16 rounding (2^-8) apart


def test_residual_scale_node_matches_plain_and_gradcheck():
    torch.manual_seed(0)
    h, r = _rand(2, 7, 8), _rand(2, 7, 8)
    vecs = [_rand(8) for _ in range(4)]
    hs, hb, rs, rb = vecs
    plain = (h + hb) * hs + (r + rb) * rs
    torch.testing.assert_close(_ResidualScale.apply(h, r, *vecs), plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: _ResidualScale.apply(*a), (h, r, *vecs))
    with torch.no_grad():
        torch.testing.assert_close(residual_scale(h, r, *vecs), plain.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Hk,G", [(2, 4), (1, 1), (3, 2)])
def test_conv_plus_skip_node(Hk, G):
    torch.manual_seed(0)
    d, B, T = 4, 2, 5
    C = (Hk * G + Hk) * d
    conv, qk0 = _rand(B, C, T), _rand(B, T, C)
    with torch.no_grad():
        plain = conv_plus_skip(conv, qk0, Hk, G, d)
    # the skip terms spelled out: q heads average with their KV head; key heads take the group mean of that
    q0 = qk0[..., : Hk * G * d].reshape(B, T, Hk, G, d)
    k0 = qk0[..., Hk * G * d:].reshape(B, T, Hk, 1, d)
    qm = (q0 + k0) / 2
    want = conv.transpose(1, 2).reshape(B, T, -1, d) + torch.cat([qm.reshape(B, T, Hk * G, d), qm.mean(3)], dim=2)
    torch.testing.assert_close(plain, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_ConvPlusSkip.apply(conv, qk0, Hk, G, d), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: _ConvPlusSkip.apply(a, b, Hk, G, d), (conv, qk0))


def _dense_experts(x, choice, gate, W1, W2, E):
    """Per-token reference: y_n = gate_n * W2_e (silu(g) * u), 0 for the skip slot (choice == E)."""
    out = []
    for n in range(x.shape[0]):
        e = int(choice[n])
        if e == E:
            out.append(torch.zeros_like(x[n]))
            continue
        g, u = (W1[e] @ x[n]).chunk(2)
        out.append(gate[n] * (W2[e] @ (F.silu(g) * u)))
    return torch.stack(out)


def test_routed_swiglu_node_matches_per_token_reference():
    """An empty expert (its weight gradient must be exactly 0, not stale memory) and skip-slot tokens (output 0)."""
    torch.manual_seed(0)
    E, D, Fw, N = 4, 6, 5, 11
    x, gate = _rand(N, D), torch.rand(N, **f64).add_(0.1).requires_grad_()
    W1, W2 = _rand(E, 2 * Fw, D), _rand(E, D, Fw)
    choice = torch.tensor([0, 3, 3, 4, 1, 0, 3, 4, 1, 1, 0])  # expert 2 empty; two tokens in the skip slot (4)
    y = experts_forward_eager(x, choice, gate, W1, W2, E)
    ref = _dense_experts(x, choice, gate, W1, W2, E)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn(N, D, **f64)
    got = torch.autograd.grad(y, (x, gate, W1, W2), gy)
    want = torch.autograd.grad(ref, (x, gate, W1, W2), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[2][2].abs().max() == 0 and got[3][2].abs().max() == 0  # the empty expert
    assert got[0][3].abs().max() == 0 and got[1][7] == 0  # skip-slot tokens get no gradient

    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=E + 1).tolist()
    n = N - counts[E]
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N).clamp_max(n)
    assert torch.autograd.gradcheck(lambda *a: _RoutedSwiGLU.apply(*a, order[:n], pos, counts[:E]), (x, gate, W1, W2))


@pytest.mark.parametrize("B,T,Hq,Hk,d", [(2, 200, 4, 2, 8), (1, 64, 2, 2, 4), (2, 130, 6, 1, 8), (1, 1, 2, 1, 4)])
def test_block_causal_attention_equals_sdpa(B, T, Hq, Hk, d):
    """Blocks of 32 rows: two full blocks (64), a partial last block (200 = 6 * 32 + 8), MHA (G = 1), T = 1."""
    torch.manual_seed(0)
    qk = _rand(B, T, Hq + Hk, d)  # the model's layout: q and k are head slices of one [B, T, H, d] tensor
    v = _rand(B, Hk, T, d)
    go = torch.randn(B, T, Hq * d, **f64)

    def run(fn):
        q, k = qk.transpose(1, 2).split([Hq, Hk], 1)
        out = fn(q, k, v).transpose(1, 2).reshape(B, T, Hq * d)
        return out, torch.autograd.grad(out, (qk, v), go)

    a, ga = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True))
    b, gb = run(lambda q, k, v: block_causal_attention(q, k, v, 0.3))
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # an output gradient in [B, Hq, T, d] memory (not o_proj's layout) takes the same path through a copy
    q, k = qk.transpose(1, 2).split([Hq, Hk], 1)
    g_bhtd = torch.randn(B, Hq, T, d, **f64)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    for x, y in zip(torch.autograd.grad(block_causal_attention(q, k, v, 0.3), (qk, v), g_bhtd),
                    torch.autograd.grad(sdpa, (qk, v), g_bhtd)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_block_attention_gate(monkeypatch):
    q = torch.randn(2, 4, 256, 8, requires_grad=True)
    k = torch.randn(2, 2, 256, 8)
    assert use_block_attention(q, k)
    with torch.no_grad():
        assert not use_block_attention(q, k)  # decoding / evaluation: SDPA keeps nothing
    assert not use_block_attention(q.detach(), k)
    assert not use_block_attention(q.to(torch.bfloat16), k)
    # kept probabilities: blocks of r rows, block i keeps r x (i + 1) r scores per (batch, head), 4 bytes each
    r = attention.BLOCK_ROWS
    nb = 256 // r
    kept = 2 * 4 * r * r * nb * (nb + 1) // 2 * 4
    monkeypatch.setattr(attention, "BLOCK_ATTN_MAX_BYTES", kept)
    assert use_block_attention(q, k)
    monkeypatch.setattr(attention, "BLOCK_ATTN_MAX_BYTES", kept - 1)
    assert not use_block_attention(q, k)


def test_model_trains_the_same_through_block_attention_and_sdpa(monkeypatch):
    """The whole debug model, fp32: loss and every gradient with the block path vs SDPA (rounding apart only)."""
    from zaya_lib.config import get_config
    from zaya_lib.model import ZayaForCausalLM

    torch.manual_seed(0)
    model = ZayaForCausalLM(get_config("debug")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 100))

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l_block, g_block = grads()
    monkeypatch.setattr(attention, "BLOCK_ATTN_MAX_BYTES", 0)
    l_sdpa, g_sdpa = grads()
    assert abs(l_block - l_sdpa) < 1e-6 * abs(l_sdpa)
    assert g_block.keys() == g_sdpa.keys()
    for n, g in g_sdpa.items():
        # fp32: two exact kernels summing in different orders; 1e-3 of each tensor's largest entry is far above that
        # rounding (and far below a wrong gradient, which is O(1) of scale)
        scale = float(g.abs().max())
        assert float((g_block[n] - g).abs().max()) <= 1e-3 * scale + 1e-12, n


@pytest.mark.parametrize("rows", [4, 32])
def test_block_attention_with_documents_equals_masked_sdpa_and_gradcheck(rows, monkeypatch):
    """Document masking in the block path (`doc_block_attention`): each block scores only from its smallest document
    start (tiles with no shared document skipped) and masks keys before each row's own start. Equal to SDPA with the
    block-diagonal causal mask (forward and gradients, 1e-12), and gradcheck of the node itself."""
    from zaya_lib.model.documents import DocMask

    monkeypatch.setattr(attention, "BLOCK_ROWS", rows)
    torch.manual_seed(0)
    B, T, Hq, Hk, d = 2, 23, 4, 2, 4
    lens = [[3, 9, 1, 10], [12, 11]]
    doc = DocMask(torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in lens]))
    qk, v = _rand(B, T, Hq + Hk, d), _rand(B, Hk, T, d)
    go = torch.randn(B, Hq, T, d, **f64)

    def run(fn):
        q, k = qk.transpose(1, 2).split([Hq, Hk], 1)
        out = fn(q, k, v)
        return out, torch.autograd.grad(out, (qk, v), go)

    mask = doc.attn_mask()
    a, ga = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True))
    b, gb = run(lambda q, k, v: attention.doc_block_attention(q, k, v, 0.3, doc.start))
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    lo = attention.block_key_starts(doc.start)
    if rows == 4:
        assert lo == [0, 0, 0, 12, 12, 12]  # row 1's first document spans rows 0-11, its second starts at 12
    q, k = (x.detach().requires_grad_() for x in qk.transpose(1, 2).split([Hq, Hk], 1))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention._BlockCausalAttention.apply(q, k, v, 0.3, doc.start, lo), (q, k, v))


def test_conv_history_restarts_at_document_starts_and_gradcheck():
    """CCAProjection.convolve with doc_pos: each document's conv output equals the document convolved alone (its
    history zero-padded), including documents of 1 and 2 tokens; the overwrite node's backward is exact (gradcheck
    through the convs, the recomputed windows and the overwrite)."""
    from zaya_lib.config import get_config
    from zaya_lib.model.attention import CCAProjection
    from zaya_lib.model.documents import DocMask

    torch.manual_seed(0)
    proj = CCAProjection(get_config("debug", hidden_size=8, head_dim=4, num_attention_heads=2,
                                    num_key_value_heads=1), 0).double()
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn_like(p))
    lens = [[4, 1, 2, 5], [12]]
    doc = DocMask(torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(r)]) for r in lens]))
    u = _rand(2, 12, 12)  # [B, C, T], C = (2 + 1) * 4
    out, state = proj.convolve(u, None, doc.position_ids)
    assert torch.equal(state, u[..., -2:])
    for b, row in enumerate(lens):
        s = 0
        for n in row:
            torch.testing.assert_close(out[b:b + 1, :, s:s + n], proj.convolve(u[b:b + 1, :, s:s + n], None)[0],
                                       rtol=1e-12, atol=1e-12)
            s += n
    assert torch.autograd.gradcheck(lambda x: proj.convolve(x, None, doc.position_ids)[0], (u,))
    weights = [proj.conv_qk_depthwise.weight, proj.conv_qk_grouped.weight]
    assert torch.autograd.gradcheck(lambda *w: _conv_with(proj, w, u.detach(), doc.position_ids), weights)


class _Convolve(torch.nn.Module):
    """proj.convolve as a module's forward, so torch.func.functional_call can swap the conv weights (gradcheck)."""

    def __init__(self, proj):
        super().__init__()
        self.p = proj

    def forward(self, u, pos):
        return self.p.convolve(u, None, pos)[0]


def _conv_with(proj, weights, u, pos):
    from torch.func import functional_call

    names = ["p.conv_qk_depthwise.weight", "p.conv_qk_grouped.weight"]
    return functional_call(_Convolve(proj), dict(zip(names, weights)), (u, pos))

"""zaya_lib.model.walkthrough: the probes behind notebook 01_architecture.

All fp32 on the debug preset. Parity tolerance 1e-4 is the model issue's acceptance (two fp32 implementations of the
same math agree to ~1e-6 here); "exact" probes (attention rows, routing hooks) compare with the model's own outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zaya_lib.config import get_config
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.model.attention import rope_cos_sin
from zaya_lib.model.walkthrough import (attention_probs, decode_vs_prefill_diff, randomize_weights, record_routing,
                                        reference_logit_diff)


def _model(seed=0):
    return randomize_weights(ZayaForCausalLM(get_config("debug")), seed=seed).eval()


def test_randomize_weights_moves_every_default():
    fresh, m = ZayaForCausalLM(get_config("debug")), _model()
    for (name, p0), (_, p1) in zip(fresh.named_parameters(), m.named_parameters()):
        assert not torch.equal(p0, p1), f"{name} kept its initial value"
    temps = [layer.self_attn.qk_norm.temp.tolist() for layer in m.model.layers]
    assert all(abs(t[0] - 0.7) < 1e-6 and abs(t[1] - 1.6) < 1e-6 for t in temps)
    for r in m.routers():
        assert r.balancing_biases[: r.E].abs().sum() > 0 and float(r.balancing_biases[-1]) == -1.0
    # seeded: the same seed gives the same weights
    assert all(torch.equal(a, b) for a, b in zip(_model(3).parameters(), _model(3).parameters()))


@torch.no_grad()
def test_reference_and_decode_diffs_are_small_and_sensitive():
    m = _model(1)
    ids = torch.randint(0, m.config.vocab_size, (2, 13))
    d = reference_logit_diff(m, ids)
    assert d["max_abs_logit"] > 0.5 and d["full_forward"] < 1e-4 and d["cached_decode"] < 1e-4
    assert decode_vs_prefill_diff(m, ids, n_prefill=5) < 1e-4
    # the probe is sensitive: a model whose weights differ is far from this one (so 1e-4 is a real bound)
    other = _model(2)(ids).logits
    assert float((other - m(ids).logits).abs().max()) > 1e-2


def test_attention_probs_rows_reproduce_the_layer():
    m = _model(2)
    attn = m.model.layers[0].self_attn
    B, T = 2, 9
    x = F.rms_norm(torch.randn(B, T, m.config.hidden_size), (m.config.hidden_size,))
    cos, sin = rope_cos_sin(torch.arange(T)[None].expand(B, T), m.config.rotary_dim, m.config.rope_theta)
    P = attention_probs(attn, x, cos, sin)
    assert P.shape == (B, attn.Hq, T, T)
    torch.testing.assert_close(P.sum(-1), torch.ones(B, attn.Hq, T), atol=1e-6, rtol=0)
    assert float(P.triu(1).abs().max()) == 0.0  # causal
    # P @ V through o_proj equals the layer's own forward (fp32: ~1e-7)
    _, v = attn.qkv_proj(x)
    v = v.transpose(1, 2).repeat_interleave(attn.Hq // attn.Hk, dim=1)
    y = attn.o_proj((P @ v).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(y, attn(x, cos, sin), atol=1e-5, rtol=0)


def test_record_routing_matches_router_outputs():
    m = _model(4)
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    rec = record_routing(m, ids)
    L, E = m.config.num_hidden_layers, m.config.num_experts
    assert rec["choice"].shape == (L, 20) and rec["probs"].shape == (L, 20, E + 1)
    chosen = (rec["probs"] + torch.stack([r.balancing_biases for r in m.routers()])[:, None]).argmax(-1)
    assert torch.equal(chosen, rec["choice"])  # top-1 on bias-adjusted probabilities
    torch.testing.assert_close(rec["gate"], rec["probs"].gather(-1, rec["choice"][..., None]).squeeze(-1))
    assert all(not r._forward_hooks for r in m.routers())  # hooks removed

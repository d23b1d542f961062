"""Checks and probes behind notebook 01_architecture: random non-default weights, parity with transformers' port,
decode versus prefill, attention maps and routing decisions of a built model.

Shape legend: B batch, T tokens, S keys, Hq query heads, Hk KV heads, d head width, L layers, N = B * T tokens.

Notable features:
- `randomize_weights` moves every parameter, key temperature and balancing bias off its initial value, so a parity
  check cannot pass by accident on defaults (temperature 0 in transformers' init would zero every attention logit;
  residual scales of exactly 1 and biases of 0 would hide a swapped scale/bias pair).
- `reference_logit_diff` runs the same ids through our model and through transformers' own `ZayaForCausalLM`
  holding the same weights (`checkpoint.to_hf_reference`), full forward and step-by-step cached decode.
- `attention_probs` recomputes one layer's causal softmax in the latent from the layer's own modules (projection,
  QK-norm, partial RoPE), returning the [B, Hq, T, T] matrix that SDPA never materialises.
- `record_routing` captures every router's top-1 choice and gate weight through forward hooks (no model changes).
"""
from __future__ import annotations

import torch

from .attention import CCAttention, apply_partial_rope
from .cache import ZayaCache
from .checkpoint import to_hf_reference
from .modeling import CACHE_NAME

__all__ = ["randomize_weights", "reference_logit_diff", "decode_vs_prefill_diff", "attention_probs", "record_routing"]


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0, temps: tuple[float, ...] = (0.7, 1.6),
                      bias_std: float = 0.05) -> torch.nn.Module:
    """Every parameter to base + 0.1 N(0, 1) (base 1 for norms and scales, 0 otherwise), key temperatures to `temps`
    (cycled over KV heads), routing biases of the real experts to N(0, bias_std^2) (the skip slot keeps -1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        base = 1.0 if ("scale" in name or "norm" in name) else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g).to(p))
    for m in model.modules():
        if isinstance(m, CCAttention):
            t = torch.tensor([temps[i % len(temps)] for i in range(m.Hk)])
            m.qk_norm.temp.copy_(t.to(m.qk_norm.temp))
    for r in model.routers():
        r.balancing_biases[: r.E] = bias_std * torch.randn(r.E, generator=g).to(r.balancing_biases)
    return model


@torch.no_grad()
def reference_logit_diff(model, ids_BT: torch.Tensor, n_prefill: int | None = None) -> dict[str, float]:
    """Max |logit difference| against transformers' ZayaForCausalLM with the same weights (fp32, eval mode).

    Returns {"full_forward": ..., "cached_decode": ..., "max_abs_logit": ...}; the decode check prefills
    `n_prefill` tokens (default T // 2) and then feeds the rest one token at a time to both models.
    """
    from transformers import DynamicCache

    model.eval()
    ref = to_hf_reference(model).eval()
    ours_full, ref_full = model(ids_BT).logits, ref(ids_BT).logits
    T = ids_BT.shape[1]
    n0 = T // 2 if n_prefill is None else n_prefill
    c_ours, c_ref = ZayaCache(model.config.num_hidden_layers), DynamicCache(config=ref.config)
    worst = 0.0
    for t0, t1 in [(0, n0)] + [(t, t + 1) for t in range(n0, T)]:
        a = model(ids_BT[:, t0:t1], past_key_values=c_ours, use_cache=True).logits
        b = ref(ids_BT[:, t0:t1], use_cache=True, **{CACHE_NAME: c_ref}).logits  # the installed transformers' name
        worst = max(worst, float((a - b).abs().max()))
    return {"full_forward": float((ours_full - ref_full).abs().max()), "cached_decode": worst,
            "max_abs_logit": float(ours_full.abs().max())}


@torch.no_grad()
def decode_vs_prefill_diff(model, ids_BT: torch.Tensor, n_prefill: int) -> float:
    """Max |logit difference| between one full forward and prefill(n_prefill) + token-by-token cached decode."""
    model.eval()
    full = model(ids_BT).logits
    cache = ZayaCache(model.config.num_hidden_layers)
    steps = [model(ids_BT[:, :n_prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(n_prefill, ids_BT.shape[1]):
        steps.append(model(ids_BT[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return float((torch.cat(steps, dim=1) - full).abs().max())


@torch.no_grad()
def attention_probs(attn: CCAttention, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The layer's causal attention probabilities [B, Hq, T, T] (query head h reads KV head h // G)."""
    qk, _ = attn.qkv_proj(x_BTD)
    qk = apply_partial_rope(attn.qk_norm(qk, attn.Hq), cos, sin).transpose(1, 2)  # [B, Hq + Hk, T, d]
    q, k = qk.split([attn.Hq, attn.Hk], dim=1)
    k = k.repeat_interleave(attn.Hq // attn.Hk, dim=1)  # [B, Hq, T, d]
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def record_routing(model, ids_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `ids_BT` once (eval mode) and return every router's decisions: {"choice": [L, N] long (index E = skip),
    "gate": [L, N] unnormalised weight, "probs": [L, N, E + 1] softmax over the router classes}."""
    seen: list[tuple] = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: seen.append(out)) for r in model.routers()]
    try:
        model.eval()
        model(ids_BT)
    finally:
        for h in hooks:
            h.remove()
    choice = torch.stack([o[0] for o in seen])
    return {"choice": choice, "gate": torch.stack([o[1] for o in seen]),
            "probs": torch.stack([torch.softmax(o[3].float(), dim=-1) for o in seen])}

"""Parameters, FLOPs and KV-cache bytes from a config, without building the model.

Notable features:
- Counts follow the checkpoint's tensors exactly (a test checks them against a built model's `numel`), split into
  embeddings, attention, router, experts, norms and residual scales.
- Active parameters per token: everything non-embedding except the E - 1 experts a token does not visit (top-1).
- KV-cache bytes per token: CCA caches only the compressed K and V (2 * Hk * d per layer); the conv and delayed-value
  states are O(1) per sequence. Compared with multi-head attention at the same hidden width.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ZayaConfig

__all__ = ["ParamCounts", "count_parameters", "kv_cache_bytes_per_token", "mha_kv_cache_bytes_per_token",
           "flops_per_token", "summary_table"]


@dataclass
class ParamCounts:
    embedding: int
    attention_per_layer: int
    router_per_layer_first: int  # layer 0 has no EDA gamma
    router_per_layer: int
    expert: int  # one expert
    norms_and_scales_per_layer: int
    globals: int  # input scale/bias + final norm
    total: int
    non_embedding: int
    active_non_embedding: int
    active_with_embedding: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(cfg: ZayaConfig) -> ParamCounts:
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    Hq, Hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, Fw, R, K = cfg.num_experts, cfg.moe_intermediate_size, cfg.router_hidden_size, cfg.num_router_classes
    C = (Hq + Hk) * d
    attn = (D * Hq * d + D * Hk * d + D * Hk * d  # q, k, v_current + v_delayed (each Hk*d/2)
            + C * cfg.cca_time0 + C  # depthwise conv + bias
            + C * d * cfg.cca_time1 + C  # head-wise conv + bias
            + Hk  # key temperature
            + Hq * d * D)  # o_proj
    router0 = D * R + R + R + 2 * (R * R + R) + R * K  # down (+bias), norm, fc1, fc2, out_proj
    router = router0 + R  # + EDA gamma
    expert = 2 * Fw * D + D * Fw
    norms = 2 * D + 2 * 4 * D  # two RMSNorms + two residual scalings of 4 vectors
    glob = 2 * D + D
    emb = V * D  # tied head: counted once
    non_emb = L * (attn + norms + E * expert) + router0 + (L - 1) * router + glob
    active = non_emb - L * (E - cfg.num_experts_per_tok) * expert
    head = 0 if cfg.tie_word_embeddings else V * D
    return ParamCounts(emb, attn, router0, router, expert, norms, glob, emb + head + non_emb, non_emb, active, active + emb)


def kv_cache_bytes_per_token(cfg: ZayaConfig, bytes_per_value: int = 2) -> int:
    """Compressed K and V for every layer: 2 * Hk * d * L values per token (bf16 by default)."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers * bytes_per_value


def mha_kv_cache_bytes_per_token(cfg: ZayaConfig, bytes_per_value: int = 2) -> int:
    """Full multi-head attention at the same width: D / d heads of K and V per layer."""
    heads = cfg.hidden_size // cfg.head_dim
    return 2 * heads * cfg.head_dim * cfg.num_hidden_layers * bytes_per_value


def flops_per_token(cfg: ZayaConfig, seq_len: int, training: bool = False) -> float:
    """Matmul FLOPs per token: 2 x active weights (embedding lookup free, tied head counted) plus causal attention
    scores and values in the latent (2 * 2 * Hq * d * seq_len / 2 on average per layer). Training = 3x forward."""
    pc = count_parameters(cfg)
    weights = 2 * (pc.active_non_embedding + cfg.vocab_size * cfg.hidden_size)
    attn = cfg.num_hidden_layers * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * (seq_len / 2)
    f = weights + attn
    return 3 * f if training else f


def summary_table(cfg: ZayaConfig) -> list[tuple[str, str]]:
    """Human-readable rows for notebooks and the report."""
    pc = count_parameters(cfg)
    kv = kv_cache_bytes_per_token(cfg)
    mha = mha_kv_cache_bytes_per_token(cfg)
    return [
        ("total parameters (with embeddings)", f"{pc.total / 1e9:.3f} B"),
        ("embedding parameters", f"{pc.embedding / 1e9:.3f} B"),
        ("non-embedding parameters", f"{pc.non_embedding / 1e9:.3f} B"),
        ("active non-embedding parameters / token", f"{pc.active_non_embedding / 1e9:.3f} B"),
        ("attention / layer", f"{pc.attention_per_layer / 1e6:.2f} M"),
        ("router / layer", f"{pc.router_per_layer / 1e6:.2f} M"),
        ("one expert", f"{pc.expert / 1e6:.2f} M"),
        ("KV cache / token (bf16, CCA)", f"{kv / 1024:.1f} KiB"),
        ("KV cache / token (bf16, MHA same width)", f"{mha / 1024:.1f} KiB"),
        ("KV compression vs MHA", f"{mha / kv:.1f}x"),
    ]

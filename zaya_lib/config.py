"""The ZAYA1 config, its named presets and validation.

Notable features:
- Field names follow transformers' `ZayaConfig` (model_type "zaya") so `config.json` files are interchangeable with the
  released ZAYA1-8B checkpoint and with transformers' own port.
- Presets are the paper's geometry (`zaya1-8b`), the CPU reproduction size (`tiny`), a test size (`debug`) and the
  benchmark size of the model issue (`bench`). All of them are real MoEs: 16 experts, top-1, plus the skip slot.
- `validate()` raises a ValueError that names the offending field before any tensor is allocated.
- Training-only knobs that the reference lacks (`attn_impl`, `moe_impl`, `balance_lr`, `temp_init`) ride along in the
  same config; transformers ignores them when it loads our `config.json`.
"""
from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

__all__ = ["ZayaConfig", "PRESETS", "get_config"]


class ZayaConfig(PretrainedConfig):
    """ZAYA1 ("MoE++") configuration. Symbols follow the technical report and `shared/spec/architecture.md`."""

    model_type = "zaya"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache under both its names

    def __init__(
        self,
        vocab_size: int = 262272,  # V: Gemma3 tokenizer, padded to a multiple of 64
        hidden_size: int = 2048,  # D: residual width
        num_hidden_layers: int = 40,  # L: blocks of (CCA, MoE)
        num_attention_heads: int = 8,  # Hq: query heads in the compressed latent (2x compression vs 16 MHA heads)
        num_key_value_heads: int = 2,  # Hk: KV heads (GQA 4:1, KV cache 8x smaller than MHA)
        head_dim: int = 128,  # d: per-head width in the latent
        hidden_act: str = "silu",  # expert activation (SwiGLU)
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        rope_parameters: dict | None = None,  # {"hybrid": {"rope_theta", "partial_rotary_factor", ...}}
        sliding_window: int | None = None,
        attention_dropout: float = 0.0,
        moe_intermediate_size: int = 2048,  # F: expert SwiGLU width (fc1 is 2F: gate and up)
        num_experts_per_tok: int = 1,  # top-1 routing [TR]
        num_experts: int = 16,  # E routed experts (+1 skip slot in the router)
        output_router_logits: bool = False,
        layer_types: list[str] | None = None,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 2,
        eos_token_id: int | list[int] | None = 106,
        attention_bias: bool = False,
        lm_head_bias: bool = False,
        router_hidden_size: int = 256,  # R: router latent width
        cca_time0: int = 2,  # depthwise causal conv kernel over time
        cca_time1: int = 2,  # head-wise (grouped) causal conv kernel over time
        # --- ours: training features and backends (ignored by transformers) ---
        attn_impl: str = "eager",  # "eager" (PyTorch/SDPA) | "triton" (zaya_kernels)
        moe_impl: str = "eager",  # "eager" (sorted grouped matmul) | "triton"
        balance_lr: float = 1e-3,  # step size of the aux-loss-free balancing-bias optimizer [TR eq.5]
        temp_init: float = 1.0,  # key temperature at init (0 would zero every q/k gradient; see modeling._init_weights)
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.sliding_window = sliding_window
        self.attention_dropout = attention_dropout
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts_per_tok = num_experts_per_tok
        self.num_experts = num_experts
        self.output_router_logits = output_router_logits
        self.layer_types = ["hybrid"] * num_hidden_layers if layer_types is None else list(layer_types)
        self.attention_bias = attention_bias
        self.lm_head_bias = lm_head_bias
        self.router_hidden_size = router_hidden_size
        self.cca_time0 = cca_time0
        self.cca_time1 = cca_time1
        if rope_parameters is None:
            rope_parameters = {
                "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
                "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
            }
        self.rope_parameters = copy.deepcopy(rope_parameters)
        self.attn_impl = attn_impl
        self.moe_impl = moe_impl
        self.balance_lr = balance_lr
        self.temp_init = temp_init
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # --- derived sizes -------------------------------------------------------------------------------------------
    @property
    def rope_theta(self) -> float:
        """RoPE base of the full-attention ("hybrid") layers: 1e4 at 4K, 1e6 at 32K, 5e6 at 131K [TR Tab. II]."""
        return float(self._hybrid_rope()["rope_theta"])

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self._hybrid_rope()["rope_theta"] = float(value)

    @property
    def partial_rotary_factor(self) -> float:
        return float(self._hybrid_rope().get("partial_rotary_factor", 0.5))

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (the first `rotary_dim` of `head_dim`; 64 of 128 in ZAYA1-8B)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_router_classes(self) -> int:
        return self.num_experts + 1  # 16 experts + the skip ("MOD") slot

    def _hybrid_rope(self) -> dict:
        rp = self.rope_parameters
        return rp["hybrid"] if "hybrid" in rp else rp

    # --- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> "ZayaConfig":
        """Raise ValueError naming the field if this config cannot build a correct ZAYA1 model."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"invalid ZayaConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "moe_intermediate_size", "num_experts", "router_hidden_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.num_experts_per_tok == 1, f"num_experts_per_tok must be 1 (ZAYA1 routes top-1), got {self.num_experts_per_tok}")
        need(self.num_experts >= 2, f"num_experts must be >= 2, got {self.num_experts}")
        need((self.num_key_value_heads * self.head_dim) % 2 == 0,
             "num_key_value_heads * head_dim must be even (half the value channels are time-delayed)")
        need(0.0 < self.partial_rotary_factor <= 1.0, f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
             f"head_dim * partial_rotary_factor must be a positive even integer, got {self.head_dim * self.partial_rotary_factor}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.cca_time0 >= 1 and self.cca_time1 >= 1, f"cca_time0/cca_time1 must be >= 1, got {self.cca_time0}/{self.cca_time1}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {"hybrid"})
        need(not bad, f"layer_types {bad} not supported (ZAYA1-8B uses only full-attention 'hybrid' layers)")
        need(self.attn_impl in ("eager", "triton"), f"attn_impl must be 'eager' or 'triton', got {self.attn_impl!r}")
        need(self.moe_impl in ("eager", "triton"), f"moe_impl must be 'eager' or 'triton', got {self.moe_impl!r}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        need(not self.attention_bias, "attention_bias=True is not supported (ZAYA1 has no attention biases)")
        need(self.balance_lr >= 0, f"balance_lr must be >= 0, got {self.balance_lr}")
        return self


# Named sizes. `zaya1-8b` is the released geometry; the others keep every architectural feature at CPU scale.
PRESETS: dict[str, dict[str, Any]] = {
    "zaya1-8b": dict(),
    # The reproduction's CPU model (spec/calibration.md): 16 experts of 128, ~3.5M parameters, ~0.5M active/token.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, moe_intermediate_size=128, router_hidden_size=32, max_position_embeddings=4096,
                 rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
                 pad_token_id=0, bos_token_id=1, eos_token_id=6, balance_lr=1e-2),
    # Unit-test size: seconds on a CPU, still 16 experts, GQA 2:1, partial RoPE.
    "debug": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, moe_intermediate_size=64, router_hidden_size=16, max_position_embeddings=512,
                  rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # The benchmark size named in the model issue (hidden 256, 4 layers, 8/2 heads of 32, 16 experts of 256, router 64).
    "bench": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=32, moe_intermediate_size=256, router_hidden_size=64, max_position_embeddings=4096,
                  rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
                  pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def get_config(name: str, **overrides: Any) -> ZayaConfig:
    """Build a validated preset config; `overrides` replace fields (e.g. `vocab_size=tokenizer_vocab`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown ZAYA preset {name!r}; known presets: {sorted(PRESETS)}")
    kwargs = copy.deepcopy(PRESETS[name])
    if "rope_theta" in overrides:  # convenience: a flat RoPE base
        theta = float(overrides.pop("rope_theta"))
        rp = kwargs.setdefault("rope_parameters", None) or {
            "hybrid": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5}}
        rp["hybrid"]["rope_theta"] = theta
        kwargs["rope_parameters"] = rp
    kwargs.update(overrides)
    return ZayaConfig(**kwargs).validate()

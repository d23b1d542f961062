"""Checkpoints: the phases' Hugging Face folders (the one writer and the one reader), and transformers' 40-layer ZAYA
layout (ours) <-> the original 80-half-layer layout [spec §5].

Notable features:
- `save_hf_checkpoint` writes every phase's checkpoint (pretraining, midtraining, SFT, RL): `save_pretrained` of
  the model, the tokenizer and any extra files, atomically (`zaya_lib.utils.atomic_dir`). `load_hf_checkpoint` reads
  them back as (model, tokenizer), with the routing statistics off the meta device; `checkpoint_tokenizer` reads
  only the tokenizer (the folder's own copy, else `<run_dir>/tokenizer`).
- `convert_original_to_hf` / `convert_hf_to_original`: the 80 alternating half-layers (even = CCA, odd = MoE) with a
  `res_scale` at the start of each half-layer map 1:1 onto our (attention, MoE) blocks with two residual scalings.
- `load_state_dict_checked`: missing, unexpected and mis-shaped tensors are all named in one ValueError, before any
  weight is copied (so a bad file never leaves a half-loaded model behind).
- `load_checkpoint(path)`: config.json + safetensors (single file or sharded index), either layout, detected by key names.
- `to_hf_reference(model)`: the same weights in transformers' own `ZayaForCausalLM` (for parity tests and benchmarks).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..utils import atomic_dir

__all__ = [
    "save_hf_checkpoint", "load_hf_checkpoint", "checkpoint_tokenizer", "convert_original_to_hf",
    "convert_hf_to_original", "load_state_dict_checked", "load_checkpoint", "read_safetensors_dir",
    "is_original_layout", "to_hf_reference", "hf_reference_config",
]

_RES = ("hidden_states_scale", "hidden_states_bias", "residual_scale", "residual_bias")
_ATTN_MAP = {  # original CCA half-layer name -> ours (under model.layers.L.)
    "self_attn.qkv.linear_q.weight": "self_attn.qkv_proj.q_proj.weight",
    "self_attn.qkv.linear_k.weight": "self_attn.qkv_proj.k_proj.weight",
    "self_attn.qkv.val_proj1.weight": "self_attn.qkv_proj.v_proj_current.weight",
    "self_attn.qkv.val_proj2.weight": "self_attn.qkv_proj.v_proj_delayed.weight",
    "self_attn.qkv.conv_qk.0.weight": "self_attn.qkv_proj.conv_qk_depthwise.weight",
    "self_attn.qkv.conv_qk.0.bias": "self_attn.qkv_proj.conv_qk_depthwise.bias",
    "self_attn.qkv.conv_qk.1.weight": "self_attn.qkv_proj.conv_qk_grouped.weight",
    "self_attn.qkv.conv_qk.1.bias": "self_attn.qkv_proj.conv_qk_grouped.bias",
    "self_attn.qkv.temp": "self_attn.qk_norm.temp",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "input_norm.weight": "input_layernorm.weight",
}
_MOE_MAP = {  # original MoE half-layer name -> ours
    "input_norm.weight": "post_attention_layernorm.weight",
    "zaya_block.router.down_proj.weight": "mlp.gate.down_proj.weight",
    "zaya_block.router.down_proj.bias": "mlp.gate.down_proj.bias",
    "zaya_block.router.router_states_scale": "mlp.gate.router_states_scale",
    "zaya_block.router.balancing_biases": "mlp.gate.balancing_biases",
    "zaya_block.router.rmsnorm_eda.weight": "mlp.gate.router_mlp.norm.weight",
    "zaya_block.router.router_mlp.0.weight": "mlp.gate.router_mlp.fc1.weight",
    "zaya_block.router.router_mlp.0.bias": "mlp.gate.router_mlp.fc1.bias",
    "zaya_block.router.router_mlp.2.weight": "mlp.gate.router_mlp.fc2.weight",
    "zaya_block.router.router_mlp.2.bias": "mlp.gate.router_mlp.fc2.bias",
    "zaya_block.router.router_mlp.4.weight": "mlp.gate.router_mlp.out_proj.weight",
}
_TOP_MAP = {  # original name outside the half-layers -> ours
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "model.final_norm.weight": "model.norm.weight",
}
_EXPERT_RE = re.compile(r"zaya_block\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight")


def is_original_layout(keys) -> bool:
    return any(".zaya_block." in k or ".res_scale." in k or k.startswith("model.final_norm") for k in keys)


def convert_original_to_hf(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """80 half-layers (2L = CCA, 2L+1 = MoE) -> 40 blocks. Raises ValueError naming any key it cannot place."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = t
            continue
        m = re.fullmatch(r"model\.res_scale\.(\w+)", key)
        if m and m.group(1) in _RES:  # the final merge after the last MoE half-layer
            out[f"model.layers.{num_layers - 1}.post_mlp_residual_scale.{m.group(1)}"] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m:
            unknown.append(key)
            continue
        j, rest = int(m.group(1)), m.group(2)
        L = j // 2
        rs = re.fullmatch(r"res_scale\.(\w+)", rest)
        if rs and rs.group(1) in _RES:
            name = rs.group(1)
            if j == 0:  # only the input pair lives at half-layer 0: (embeddings + b) * s
                if name.startswith("hidden_states"):
                    out[f"model.input_{name}"] = t
                continue
            if j % 2 == 1:  # merges the CCA output of block L into the residual
                out[f"model.layers.{L}.post_attention_residual_scale.{name}"] = t
            else:  # merges the MoE output of block L - 1
                out[f"model.layers.{L - 1}.post_mlp_residual_scale.{name}"] = t
            continue
        table = _ATTN_MAP if j % 2 == 0 else _MOE_MAP
        if rest in table:
            out[f"model.layers.{L}.{table[rest]}"] = t
            continue
        em = _EXPERT_RE.fullmatch(rest)
        if em and j % 2 == 1:
            experts.setdefault(L, {})[(int(em.group(1)), em.group(2))] = t
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"original-layout checkpoint has {len(unknown)} key(s) with no place in ZAYA: {unknown[:10]}")
    for L, parts in experts.items():
        E = 1 + max(e for e, _ in parts)
        missing = [f"local_experts.{e}.linear_fc{w}" for e in range(E) for w in "12" if (e, w) not in parts]
        if missing:
            raise ValueError(f"layer {2 * L + 1}: missing expert tensors {missing}")
        out[f"model.layers.{L}.mlp.experts.gate_up_proj"] = torch.stack([parts[(e, "1")] for e in range(E)])
        out[f"model.layers.{L}.mlp.experts.down_proj"] = torch.stack([parts[(e, "2")] for e in range(E)])
    return out


def convert_hf_to_original(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of `convert_original_to_hf` (layer 0's residual_* pair, which the original never uses, is dropped)."""
    out: dict[str, torch.Tensor] = {}
    inv_attn = {v: k for k, v in _ATTN_MAP.items()}
    inv_moe = {v: k for k, v in _MOE_MAP.items()}
    inv_top = {v: k for k, v in _TOP_MAP.items()}
    for key, t in sd.items():
        if key in inv_top:
            out[inv_top[key]] = t
            continue
        m = re.fullmatch(r"model\.input_(hidden_states_\w+)", key)
        if m:
            out[f"model.layers.0.res_scale.{m.group(1)}"] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if not m:
            raise ValueError(f"unexpected key {key!r}")
        L, rest = int(m.group(1)), m.group(2)
        rs = re.fullmatch(r"(post_attention|post_mlp)_residual_scale\.(\w+)", rest)
        if rs:
            if rs.group(1) == "post_attention":
                out[f"model.layers.{2 * L + 1}.res_scale.{rs.group(2)}"] = t
            elif L == num_layers - 1:
                out[f"model.res_scale.{rs.group(2)}"] = t
            else:
                out[f"model.layers.{2 * L + 2}.res_scale.{rs.group(2)}"] = t
            continue
        if rest in inv_attn:
            out[f"model.layers.{2 * L}.{inv_attn[rest]}"] = t
        elif rest in inv_moe:
            out[f"model.layers.{2 * L + 1}.{inv_moe[rest]}"] = t
        elif rest == "mlp.experts.gate_up_proj":
            for e in range(t.shape[0]):
                out[f"model.layers.{2 * L + 1}.zaya_block.experts.local_experts.{e}.linear_fc1.weight"] = t[e]
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"model.layers.{2 * L + 1}.zaya_block.experts.local_experts.{e}.linear_fc2.weight"] = t[e]
        else:
            raise ValueError(f"unexpected key {key!r}")
    return out


def load_state_dict_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy `sd` into `model`, raising one ValueError that names every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in expected if k not in sd and k not in tied)
    unexpected = sorted(k for k in sd if k not in expected)
    mis = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mis:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:12]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:12]}")
        if mis:
            parts.append(f"mis-shaped {len(mis)}: {mis[:12]}")
        raise ValueError(f"{source} does not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, t in sd.items():
            expected[k].copy_(t)


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or a sharded `model.safetensors.index.json` in `path`."""
    from safetensors.torch import load_file

    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            if not (path / s).exists():
                raise FileNotFoundError(f"{index} names shard {s!r}, which is missing from {path}")
            sd.update(load_file(str(path / s)))
        return sd
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_checkpoint(path: str | Path, **config_overrides):
    """Build our `ZayaForCausalLM` from a checkpoint folder in either layout (config.json + safetensors)."""
    from ..config import ZayaConfig
    from .modeling import ZayaForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    raw = json.loads(cfg_file.read_text())
    if raw.get("num_hidden_layers") == 80 or "zaya_mlp_expansion" in raw:  # original fork's config: 80 half-layers
        raw["num_hidden_layers"] = raw["num_hidden_layers"] // 2
        if "num_query_groups" in raw:
            raw["num_key_value_heads"] = raw.pop("num_query_groups")
        if "ffn_hidden_size" in raw:
            raw["moe_intermediate_size"] = raw.pop("ffn_hidden_size") // 2
        if "kv_channels" in raw:
            raw["head_dim"] = raw.pop("kv_channels")
        raw.pop("layer_types", None)
    raw.update(config_overrides)
    config = ZayaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}).validate()
    sd = read_safetensors_dir(path)
    if is_original_layout(sd.keys()):
        sd = convert_original_to_hf(sd, config.num_hidden_layers)
    model = ZayaForCausalLM(config)
    load_state_dict_checked(model, sd, source=str(path))
    model.tie_weights()
    return model.eval()


def hf_reference_config(config):
    """transformers' own ZayaConfig with the same geometry (for parity checks and benchmarks)."""
    from transformers.models.zaya import ZayaConfig as HFConfig

    fields = getattr(HFConfig, "__dataclass_fields__", {})
    kw = {k: v for k, v in config.to_dict().items() if k in fields}
    return HFConfig(**kw)


def to_hf_reference(model):
    """transformers' `ZayaForCausalLM` holding exactly `model`'s weights (checking and benchmarking only)."""
    from transformers.models.zaya import ZayaForCausalLM as HFZaya

    ref = HFZaya(hf_reference_config(model.config))
    load_state_dict_checked(ref, model.state_dict(), source="our model")
    ref.tie_weights()
    return ref.train(model.training)


# ---------------------------------------------------------------------------------------------------------------------
# the phases' checkpoints


def save_hf_checkpoint(model, tokenizer, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """`save_pretrained` of the model (config.json + safetensors, transformers' ZAYA layout), the tokenizer and any
    `extra_files` ({name: text}) into `path`, atomically: written in a hidden temp dir next to it, then swapped in by
    rename, so a reader sees the old checkpoint or the new one, never a partial one. The one writer of every phase's
    checkpoint (pretraining, midtraining, SFT, RL)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def load_hf_checkpoint(path: str | os.PathLike, device="cpu"):
    """(model, tokenizer) from a phase checkpoint folder; the tokenizer from the same folder, else
    `<run_dir>/tokenizer`. The one reader of the phases' checkpoints (`save_hf_checkpoint` writes them)."""
    from transformers.utils import logging as hf_logging

    from ..utils import progress_enabled
    from .modeling import ZayaForCausalLM

    if not progress_enabled():
        hf_logging.disable_progress_bar()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face checkpoint at {str(path)!r} (config.json missing); run the earlier "
                                "phase's notebook first")
    model = ZayaForCausalLM.from_pretrained(path).to(device)
    for r in model.routers():  # routing statistics are not weights: from_pretrained may leave them on the meta device
        if getattr(r, "load_counts", None) is not None and r.load_counts.is_meta:
            r.load_counts = torch.zeros(r.K, device=device)
            r.prob_sum = torch.zeros(r.K, device=device)
            r.entropy_sum = torch.zeros((), device=device)
    return model, checkpoint_tokenizer(path)


def checkpoint_tokenizer(path: str | os.PathLike):
    """The tokenizer of a phase checkpoint folder (its own copy, else `<run_dir>/tokenizer`), without the weights."""
    from ..data.tokenizer import load_tokenizer

    path = Path(path)
    return load_tokenizer(path if (path / "tokenizer.json").is_file() else path.parent.parent / "tokenizer")

"""The ZAYA1 decode cache: compressed K/V plus the two small CCA recurrent states.

Per layer it holds (shapes for ZAYA1-8B in brackets):
- `k`, `v`: keys after QK-norm, temperature and RoPE, and values, in the compressed latent: [B, Hk, S, d] ([B, 2, S, 128]),
  i.e. 2 * Hk * d numbers per token (1 KB/token/layer in bf16, 8x less than 16-head MHA).
- `conv`: the last (cca_time0 - 1) + (cca_time1 - 1) raw [q0 | k0] columns, [B, C, 2] with C = (Hq + Hk) * d, so the two
  causal convolutions can continue exactly where the prefill stopped.
- `vdel`: the previous token's delayed-value projection W_v2 x_{t-1}, [B, Hk * d / 2].

Notable features:
- Storage can be preallocated once (`max_length`), which the generation engine uses: decoding writes in place and
  never reallocates; without it the buffers grow by doubling.
- Recurrent states are kept in fp32 (released configs serve with `mamba_cache_dtype: float32`).
- `reorder(index)` keeps a subset/permutation of the batch (used when finished sequences leave the engine's batch).
"""
from __future__ import annotations

import torch

__all__ = ["ZayaCache"]


class ZayaCache:
    """Decode state for all layers. `seq_len` counts the tokens already processed (padding included)."""

    is_compileable = False
    is_croppable = False  # generate() (transformers >= 5.24) asks before deferring its stop check on MPS

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.num_layers = num_layers
        self.max_length = max_length
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.conv: list[torch.Tensor | None] = [None] * num_layers
        self.vdel: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    # --- the GenerationMixin-facing surface ---------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    @property
    def seq_len(self) -> int:
        return self.lengths[0]

    def __len__(self) -> int:
        return self.num_layers

    # --- K/V ------------------------------------------------------------------------------------------------------
    def update_kv(self, layer_idx: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k_new/v_new [B, Hk, T, d]; return views of all keys/values so far [B, Hk, S + T, d]."""
        B, H, T, d = k_new.shape
        old = self.lengths[layer_idx]
        new = old + T
        buf_k = self.k[layer_idx]
        if buf_k is None or buf_k.shape[2] < new or buf_k.shape[0] != B:
            cap = self.max_length if (self.max_length is not None and self.max_length >= new) else max(new, 2 * old, 16)
            nk = k_new.new_empty(B, H, cap, d)
            nv = v_new.new_empty(B, H, cap, d)
            if buf_k is not None and old > 0:
                nk[:, :, :old] = buf_k[:, :, :old]
                nv[:, :, :old] = self.v[layer_idx][:, :, :old]
            self.k[layer_idx], self.v[layer_idx] = nk, nv
        self.k[layer_idx][:, :, old:new] = k_new
        self.v[layer_idx][:, :, old:new] = v_new
        self.lengths[layer_idx] = new
        return self.k[layer_idx][:, :, :new], self.v[layer_idx][:, :, :new]

    # --- recurrent states -----------------------------------------------------------------------------------------
    def get_conv(self, layer_idx: int) -> torch.Tensor | None:
        return self.conv[layer_idx]

    def set_conv(self, layer_idx: int, state: torch.Tensor) -> None:
        self.conv[layer_idx] = state.float()

    def get_vdel(self, layer_idx: int) -> torch.Tensor | None:
        return self.vdel[layer_idx]

    def set_vdel(self, layer_idx: int, state: torch.Tensor) -> None:
        self.vdel[layer_idx] = state.float()

    # --- batch surgery --------------------------------------------------------------------------------------------
    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (a permutation or subset) in every buffer."""
        for i in range(self.num_layers):
            for store in (self.k, self.v, self.conv, self.vdel):
                if store[i] is not None:
                    store[i] = store[i].index_select(0, index.to(store[i].device))

    reorder_cache = reorder

    def nbytes_per_token(self) -> float:
        """Bytes of K/V per cached token summed over layers (recurrent states excluded: they do not grow)."""
        total = 0
        for k, v, n in zip(self.k, self.v, self.lengths):
            if k is None or n == 0:
                continue
            B, H, _, d = k.shape
            total += 2 * H * d * k.element_size()
        return float(total)

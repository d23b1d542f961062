"""Pure-PyTorch references for latent causal GQA attention (architecture.md §3 step 6) and its decode form."""
from __future__ import annotations

import torch


def latent_attention_ref(q, k, v, scale=None, key_start=None):
    """Explicit softmax: q [B, Hq, T, d], k/v [B, Hk, T, d] -> o [B, Hq, T, d]. Materialises the T x T scores.
    key_start [B] (optional): keys before it are masked; query rows with no valid key give 0."""
    B, Hq, T, d = q.shape
    G = Hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)     # query head h <- kv head h // G
    s = (q @ k.transpose(-1, -2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = causal[None, None]
    if key_start is not None:
        mask = mask & (torch.arange(T, device=q.device)[None, :] >= key_start[:, None])[:, None, None, :]
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v


def latent_attention_decode_ref(q, k_cache, v_cache, lengths, scale=None, key_start=None):
    """q [B, Hq, 1, d] over keys at positions key_start[b] <= j < lengths[b] of k/v_cache [B, Hk, S, d] -> [B, Hq, 1, d]."""
    B, Hq, _, d = q.shape
    G = Hq // k_cache.shape[1]
    S = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    k, v = k_cache.repeat_interleave(G, dim=1), v_cache.repeat_interleave(G, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale                                     # [B, Hq, 1, S]
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None]      # [B, S]
    if key_start is not None:
        valid = valid & (torch.arange(S, device=q.device)[None, :] >= key_start[:, None])
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                              # lengths 0 -> zeros
    return p @ v

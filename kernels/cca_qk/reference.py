"""Pure-PyTorch reference for the fused CCA q/k preparation (architecture.md §3 steps 1-3 and 5).

Computes in the dtype of `qk` (so the half-precision reference error can be measured) and follows the equations
literally: one 2-column left pad of the raw packed columns, depthwise conv (length T+1), head-wise grouped conv
(length T), qk-mean skips, L2 norm times sqrt(d), linear key temperature, partial NeoX RoPE on the first d/2 dims.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX rotate_half: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def cca_qk_prep_ref(qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin,
                    num_q_heads: int, num_kv_heads: int, head_dim: int, conv_state=None):
    """qk [B, T, C] (C = (Hq+Hk)*d) -> q [B, T, Hq, d], k [B, T, Hk, d]. Shapes as in `cca_qk_prep`."""
    B, T, C = qk.shape
    Hq, Hk, d = num_q_heads, num_kv_heads, head_dim
    G, R = Hq // Hk, d // 2
    u_BCT = qk.transpose(1, 2)
    pad_BC2 = qk.new_zeros(B, C, 2) if conv_state is None else conv_state.to(qk.dtype)
    u_BCT = torch.cat([pad_BC2, u_BCT], dim=-1)                                   # padded ONCE, length T+2
    a_BCT = F.conv1d(u_BCT, dw_weight.to(qk.dtype), dw_bias.to(qk.dtype), groups=C)          # length T+1
    y_BCT = F.conv1d(a_BCT, g_weight.to(qk.dtype), g_bias.to(qk.dtype), groups=Hq + Hk)      # length T
    y_BTC = y_BCT.transpose(1, 2)
    qc, kc = y_BTC[..., : Hq * d].reshape(B, T, Hq, d), y_BTC[..., Hq * d:].reshape(B, T, Hk, d)
    qh, kh = qk[..., : Hq * d].reshape(B, T, Hq, d), qk[..., Hq * d:].reshape(B, T, Hk, d)
    qm = (qh + kh.repeat_interleave(G, dim=2)) / 2                                # q-head j uses kv-head j // G
    km = (qh.reshape(B, T, Hk, G, d).mean(3) + kh) / 2                            # = mean over the group of qm
    q, k = qc + qm, kc + km
    eps = torch.finfo(qk.dtype).eps
    q = math.sqrt(d) * q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    k = math.sqrt(d) * k / k.norm(dim=-1, keepdim=True).clamp_min(eps) * temp.to(qk.dtype)[:, None]
    c, s = cos.to(qk.dtype)[:, :, None, :], sin.to(qk.dtype)[:, :, None, :]       # [B, T, 1, R]

    def rope(x):
        xr, xp = x[..., :R], x[..., R:]
        return torch.cat([xr * c + rotate_half(xr) * s, xp], dim=-1)

    return rope(q), rope(k)


def rope_cos_sin(B: int, T: int, rot_dim: int, theta: float = 10000.0, offset: int = 0, device=None,
                 dtype=torch.float32):
    """HF NeoX tables cos, sin [B, T, rot_dim] for positions offset..offset+T-1 (cos = cat(cos f, cos f))."""
    inv_freq = theta ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim)   # [R/2]
    ang = (torch.arange(offset, offset + T, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :])
    ang = torch.cat([ang, ang], dim=-1)
    return (ang.cos().to(dtype)[None].expand(B, T, rot_dim).contiguous(),
            ang.sin().to(dtype)[None].expand(B, T, rot_dim).contiguous())

"""Pure-PyTorch reference for the top-1 SwiGLU experts (architecture.md §4, last line): a loop over experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts_ref(x, expert_idx, gate, gate_up_proj, down_proj):
    """x [N, D], expert_idx [N] (-1 = skipped), gate [N], gate_up_proj [E, 2F, D], down_proj [E, D, F] -> y [N, D]."""
    E, F2, _ = gate_up_proj.shape
    if expert_idx.numel() and (expert_idx.min() < -1 or expert_idx.max() >= E):
        raise ValueError(f"expert_idx must lie in [-1, {E}), got range [{expert_idx.min()}, {expert_idx.max()}]")
    y = torch.zeros_like(x)
    for e in range(E):
        rows = (expert_idx == e).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        g, u = (x[rows] @ gate_up_proj[e].T).chunk(2, dim=-1)          # gate rows first, then up
        out = (F.silu(g) * u) @ down_proj[e].T
        y = y.index_put((rows,), out * gate[rows, None].to(x.dtype))
    return y

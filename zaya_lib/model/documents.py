"""Document masking for packed training windows: every document of a window is computed as if it were alone.

A packed window holds several documents (SFT samples placed by `zaya_lib.data.packing.pack_sft`, or pretraining
documents separated by `<eos>`). Without a mask, attention and the CCA causal convolutions (which look
t0 + t1 - 2 = 2 tokens back) and the one-token value delay all run across document boundaries, so each document is
conditioned on the unrelated ones before it. With `doc_ids` ([B, T], a document = a maximal run of equal ids, e.g.
`SFTPacked.doc_ids` with -1 on the padding run) the model:
- restarts the RoPE positions at every document start (unless `position_ids` are passed);
- zeroes the conv history and the delayed value at every document start, exactly as the zero pad does at t = 0
  (a tap reaching `lag` tokens back is used only where the token's position in its document is >= lag);
- keeps attention within documents: key j is visible to query i iff start(i) <= j <= i, where start(i) is the
  first position of i's document (the block-diagonal causal mask).

Shapes: B batch, T tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DocMask", "doc_attn_mask"]


def doc_attn_mask(start: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T] from document starts [B, T]: key j visible to query i iff start[i] <= j <= i."""
    k = torch.arange(start.shape[1], device=start.device)
    return ((k[None, None, :] >= start[:, :, None]) & (k[None, None, :] <= k[None, :, None]))[:, None]


class DocMask:
    """The document structure of a batch of packed windows, derived once per forward from `doc_ids` [B, T].

    start [B, T]: first position of each token's document; position_ids [B, T] = t - start (0 at each document
    start); cont [B, T] bool: token t - 1 lies in t's document (False at t = 0 and at every document start)."""

    def __init__(self, doc_ids: torch.Tensor):
        if doc_ids.ndim != 2:
            raise ValueError(f"doc_ids must be [batch, seq], got shape {tuple(doc_ids.shape)}")
        B, T = doc_ids.shape
        idx = torch.arange(T, device=doc_ids.device)
        self.cont = F.pad(doc_ids[:, 1:] == doc_ids[:, :-1], (1, 0), value=False)
        # a document starts where cont is False; the running max of those start positions is each token's start
        self.start = torch.where(self.cont, 0, idx).cummax(dim=1).values
        self.position_ids = idx - self.start
        self._mask = None

    def attn_mask(self) -> torch.Tensor:
        """bool [B, 1, T, T] (True = attend): causal and within the query's document (for SDPA); built once."""
        if self._mask is None:
            self._mask = doc_attn_mask(self.start)
        return self._mask

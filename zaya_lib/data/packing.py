"""Sequence packing: fixed windows for pretraining, best-fit-decreasing (BFD) bins for SFT.

Notable features:
- Pretraining (`pack_pretraining`): documents (already `<bos>...<eos>`) are concatenated in the given order and cut
  into windows of T+1 tokens with stride T, so window i is `stream[i*T : i*T + T + 1]` (input = [:-1],
  label = [1:]) and every token after the first is a label exactly once. Deterministic; the ragged tail is dropped
  and reported.
- SFT (`pack_sft`): whole samples (ids + loss mask) go into windows of W tokens by best-fit-decreasing, the paper's
  SFT packing (spec architecture.md §6): no sample is ever split or truncated; a sample longer than W is an error
  (it should have been AP-trimmed) or, if asked, skipped and reported. Windows are padded with the pad id and loss
  mask 0.
- Per window: `position_ids` restart at 0 at every sample (RoPE sees each sample from position 0) and `doc_ids`
  (sample slot in the window, -1 on padding) let a trainer keep attention within a sample
  (`doc_ids[:, :, None] == doc_ids[:, None, :]` & causal); `boundaries` lists (start, end, sample index).
- Loss masks stay aligned with ids token for token. With the HF convention (labels shifted inside the model),
  `labels = where(loss_mask, ids, -100)`; the first token of every sample (`<bos>`) has mask 0, so no loss ever
  crosses a sample boundary.

Shapes: N = windows, T = pretraining context, W = SFT window.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

__all__ = ["PretrainWindows", "pack_pretraining", "SFTPacked", "best_fit_decreasing", "first_fit", "pack_sft"]


# ---------------------------------------------------------------------------------------------------------------
# pretraining

@dataclass
class PretrainWindows:
    tokens_NT1: torch.Tensor     # [N, T+1] int64; inputs = [:, :-1], labels = [:, 1:]
    tokens_total: int            # tokens in the concatenated stream
    tokens_dropped: int          # ragged tail that did not fill a window (never a label)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens_NT1[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return self.tokens_NT1[:, 1:]


def pack_pretraining(docs: Iterable[Sequence[int]], seq_len: int) -> PretrainWindows:
    """Concatenate tokenised documents and cut windows of `seq_len + 1` tokens with stride `seq_len` ([N, T+1])."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
    n = max(0, (len(stream) - 1) // seq_len)
    if n == 0:
        raise ValueError(f"{len(stream)} tokens cannot fill one window of {seq_len + 1} tokens")
    flat = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    # overlapping views: window i starts at i*T, length T+1 (shares its last token with window i+1's first)
    windows = flat.unfold(0, seq_len + 1, seq_len).contiguous()
    return PretrainWindows(windows, len(stream), len(stream) - (n * seq_len + 1))


# ---------------------------------------------------------------------------------------------------------------
# SFT: bin packing of whole samples

def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """BFD bin packing: longest first (ties by index, so deterministic), each into the open bin with the LEAST room
    that still fits it, else a new bin. Returns bins as lists of sample indices (in placement order).
    Every length must be in [1, capacity]."""
    _check_lengths(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []   # sorted (room left, bin index); bisect finds the tightest fit in O(log n)
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit in arrival order (the baseline BFD is compared with): each sample goes into the first open bin
    with room, else a new bin."""
    _check_lengths(lengths, capacity)
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for b, r in enumerate(room):
            if r >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    if capacity <= 0:
        raise ValueError(f"window length must be positive, got {capacity}")
    bad = [(i, n) for i, n in enumerate(lengths) if not 1 <= n <= capacity]
    if bad:
        raise ValueError(f"{len(bad)} samples do not fit a window of {capacity} tokens (index, length): {bad[:5]}; "
                         "trim them first (zaya_lib.data.trimming) or pass on_oversize='skip'")


@dataclass
class SFTPacked:
    input_ids: torch.Tensor      # [N, W] int64, padded with pad_id
    loss_mask: torch.Tensor      # [N, W] int64, 1 = target token, 0 = prompt / padding
    position_ids: torch.Tensor   # [N, W] int64, restarting at 0 at each sample (and at the padding run)
    doc_ids: torch.Tensor        # [N, W] int64, sample slot within the window (0, 1, ...), -1 on padding
    boundaries: list[list[tuple[int, int, int]]]   # per window: (start, end, sample index), end exclusive
    skipped: list[int]           # indices of samples longer than W (on_oversize="skip")
    fill_ratio: float            # real tokens / (N * W)

    @property
    def labels(self) -> torch.Tensor:
        """HF-convention labels ([N, W]; shifted inside the model): the id where the loss mask is 1, else -100."""
        return torch.where(self.loss_mask.bool(), self.input_ids, torch.full_like(self.input_ids, -100))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_sft(samples: Sequence[tuple[Sequence[int], Sequence[int]]], window: int, pad_id: int = 0,
             on_oversize: str = "raise", method: str = "bfd") -> SFTPacked:
    """Pack (ids, loss_mask) samples into windows of `window` tokens without splitting any sample.

    `on_oversize`: "raise" (default; the error lists the offending samples) or "skip" (reported in `.skipped`).
    `method`: "bfd" (best-fit-decreasing, the paper's) or "first_fit" (arrival order; for comparison).
    """
    if on_oversize not in ("raise", "skip"):
        raise ValueError(f"on_oversize must be 'raise' or 'skip', got {on_oversize!r}")
    if method not in ("bfd", "first_fit"):
        raise ValueError(f"method must be 'bfd' or 'first_fit', got {method!r}")
    if window <= 0:
        raise ValueError(f"window length must be positive, got {window}")
    for i, (ids, mask) in enumerate(samples):
        if len(ids) != len(mask):
            raise ValueError(f"sample {i}: {len(ids)} ids but {len(mask)} loss-mask entries")
        if len(ids) == 0:
            raise ValueError(f"sample {i} is empty")
    lengths = [len(ids) for ids, _ in samples]
    skipped = [i for i, n in enumerate(lengths) if n > window]
    if skipped and on_oversize == "raise":
        _check_lengths(lengths, window)
    keep = [i for i, n in enumerate(lengths) if n <= window]
    packer = best_fit_decreasing if method == "bfd" else first_fit
    bins = [[keep[j] for j in b] for b in packer([lengths[i] for i in keep], window)]

    n = len(bins)
    ids_NW = torch.full((n, window), pad_id, dtype=torch.long)
    mask_NW = torch.zeros((n, window), dtype=torch.long)
    pos_NW = torch.zeros((n, window), dtype=torch.long)
    doc_NW = torch.full((n, window), -1, dtype=torch.long)
    boundaries: list[list[tuple[int, int, int]]] = []
    for w, b in enumerate(bins):
        start = 0
        spans = []
        for slot, i in enumerate(b):
            ids, mask = samples[i]
            end = start + len(ids)
            ids_NW[w, start:end] = torch.as_tensor(list(ids), dtype=torch.long)
            mask_NW[w, start:end] = torch.as_tensor(list(mask), dtype=torch.long)
            pos_NW[w, start:end] = torch.arange(end - start)
            doc_NW[w, start:end] = slot
            spans.append((start, end, i))
            start = end
        pos_NW[w, start:] = torch.arange(window - start)
        boundaries.append(spans)
    used = sum(lengths[i] for i in keep)
    return SFTPacked(ids_NW, mask_NW, pos_NW, doc_NW, boundaries, skipped, used / max(n * window, 1))

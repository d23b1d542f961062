"""Packing: pretraining windows (stride T, T+1 tokens) and best-fit-decreasing SFT windows (no sample split)."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from zaya_lib.data.packing import best_fit_decreasing, first_fit, pack_pretraining, pack_sft


def test_pretraining_windows_cover_stream_once():
    rng = random.Random(0)
    docs = [[1] + [rng.randrange(9, 500) for _ in range(rng.randrange(1, 40))] + [2] for _ in range(30)]
    stream = [t for d in docs for t in d]
    T = 16
    w = pack_pretraining(docs, T)
    n = (len(stream) - 1) // T
    assert w.tokens_NT1.shape == (n, T + 1) and w.tokens_NT1.dtype == torch.long
    assert w.tokens_dropped == len(stream) - (n * T + 1) and 0 <= w.tokens_dropped < T
    # window i is stream[i*T : i*T+T+1]: inputs tile the stream and every label is the next token
    assert w.inputs.reshape(-1).tolist() == stream[: n * T]
    assert w.labels.reshape(-1).tolist() == stream[1: n * T + 1]
    assert torch.equal(pack_pretraining(docs, T).tokens_NT1, w.tokens_NT1)   # deterministic
    with pytest.raises(ValueError, match="cannot fill one window"):
        pack_pretraining([[1, 5, 2]], 8)
    with pytest.raises(ValueError, match="positive"):
        pack_pretraining(docs, 0)


def make_samples(lengths, seed=0):
    """Samples shaped like SFT chats: <bos>=1 with mask 0, a prompt (mask 0), then a response (mask 1)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [1] + [rng.randrange(3, 1000) for _ in range(n - 1)]
        cut = rng.randrange(1, n + 1)
        out.append((ids, [0] * cut + [1] * (n - cut)))
    return out


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60), window=st.integers(64, 130))
def test_sft_packing_properties(lengths, window):
    samples = make_samples(lengths)
    p = pack_sft(samples, window, pad_id=0)
    seen = []
    for w, spans in enumerate(p.boundaries):
        end_prev = 0
        for slot, (start, end, i) in enumerate(spans):
            ids, mask = samples[i]
            assert start == end_prev and end - start == len(ids)          # contiguous, never split or truncated
            assert p.input_ids[w, start:end].tolist() == ids               # content intact
            assert p.loss_mask[w, start:end].tolist() == mask               # mask aligned token for token
            assert p.position_ids[w, start:end].tolist() == list(range(len(ids)))   # restart per sample
            assert (p.doc_ids[w, start:end] == slot).all()
            seen.append(i)
            end_prev = end
        assert (p.input_ids[w, end_prev:] == 0).all() and (p.loss_mask[w, end_prev:] == 0).all()
        assert (p.doc_ids[w, end_prev:] == -1).all()
    assert sorted(seen) == list(range(len(samples)))                        # every sample exactly once
    assert p.fill_ratio == pytest.approx(sum(lengths) / (len(p) * window))
    # labels: -100 off the mask, so no loss on prompts, padding, or a sample's first token (<bos>, mask 0)
    assert torch.equal(p.labels == -100, p.loss_mask == 0)
    # any-fit guarantee: a window opens only when its first item x fits no open window; if an earlier window A
    # were still <= half full, x > W/2 and x's own window is > half full. So at most one window is <= half full.
    half = [(p.doc_ids[w] >= 0).sum().item() <= window / 2 for w in range(len(p))]
    assert sum(half) <= 1


def test_bfd_fills_better_than_first_fit():
    """A realistic SFT length mix (many short chats, some long reasoning traces; fixed seed): BFD uses no more
    windows than first-fit in arrival order, and fills them to >= 95% (measured 0.99 here; the slack covers only
    seed changes to this test, not the algorithm)."""
    rng = random.Random(1)
    lengths = [min(512, int(rng.lognormvariate(4.3, 0.8)) + 8) for _ in range(2000)]
    bfd, ff = best_fit_decreasing(lengths, 512), first_fit(lengths, 512)
    fill_bfd = sum(lengths) / (len(bfd) * 512)
    fill_ff = sum(lengths) / (len(ff) * 512)
    print(f"fill ratio: BFD {fill_bfd:.4f} ({len(bfd)} windows), first-fit {fill_ff:.4f} ({len(ff)} windows)")
    assert len(bfd) <= len(ff) and fill_bfd >= 0.95
    # first-fit through pack_sft gives the same windows as the plain function
    p = pack_sft(make_samples(lengths[:300]), 512, method="first_fit")
    assert [[i for _, _, i in b] for b in p.boundaries] == first_fit(lengths[:300], 512)


def test_bfd_picks_tightest_window():
    # sorted: 6, 5, 4, 3, 2 into capacity 10 -> [6] [5] then 4 fits both (rooms 4, 5): tightest is the 6-bin;
    # 3 fits only the 5-bin (room 5 -> 2); 2 fits the 5-bin exactly (room 2)
    assert best_fit_decreasing([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]


def test_oversize_and_bad_input():
    samples = make_samples([10, 70, 20, 90])
    with pytest.raises(ValueError, match=r"2 samples do not fit a window of 64 tokens.*\(1, 70\), \(3, 90\)"):
        pack_sft(samples, 64)
    p = pack_sft(samples, 64, on_oversize="skip")
    assert p.skipped == [1, 3] and sorted(i for b in p.boundaries for _, _, i in b) == [0, 2]
    with pytest.raises(ValueError, match="sample 0: 3 ids but 2 loss-mask"):
        pack_sft([([1, 2, 3], [0, 1])], 8)
    with pytest.raises(ValueError, match="sample 1 is empty"):
        pack_sft([([1], [0]), ([], [])], 8)
    with pytest.raises(ValueError, match="on_oversize"):
        pack_sft(samples, 64, on_oversize="truncate")

"""Flash-style causal GQA attention in the CCA latent (forward, backward, decode) in Triton.

Notable features:
- Online softmax (FlashAttention-2 order): a program owns BM query rows of one query head, streams the BN-key blocks
  of its kv head up to the causal diagonal, and never materialises the T x T score matrix. Scores are kept in base 2
  (scale * log2 e folded in) so the inner loop uses exp2; the per-row logsumexp is saved for the backward.
- GQA without repeat_kv: query head h reads kv head h // G through index arithmetic, so K/V are never copied G times.
  The backward's dK/dV program loops over the G query heads of its kv head and accumulates in registers (no atomics).
- Inputs may be strided views (e.g. [B, T, H, d] transposed to [B, H, T, d]); only the last dim must be contiguous.
- Decode (one query token over the compressed cache): one program per (batch, kv head, KV split) carries all G query
  heads of the group as the rows of one tile (padded to 16 for tl.dot), reads only keys below lengths[b], and the
  splits are merged in torch by their logsumexps (flash-decoding), so a long cache still fills the GPU.
Legend: B batch, Hq/Hk query/kv heads, G = Hq/Hk, T time, S cache length, d head_dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import INTERPRET, check_tensor, dot_dtype, launch_opts, pow2

LOG2E = 1.4426950408889634


@triton.jit
def _key_start(key_start, b, HAS_START: tl.constexpr):
    """First valid key of sequence b (left padding); 0 without key_start."""
    if HAS_START:
        st = tl.load(key_start + b).to(tl.int32)
    else:
        st = 0
    return st


@triton.jit
def _fwd_block(q_t, kb, vb, m, start, st, st_row, T, skt, svt, m_i, l_i, acc, qs,
               BN: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr, HAS_START: tl.constexpr,
               DOC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """One BN-key block of the online softmax. MASK: the block touches the diagonal or the end of the sequence, so
    the causal and length masks apply; blocks wholly below the diagonal skip them (and their masked loads).
    DOC: some keys of the block precede some row's document start st_row [BM] (document masking)."""
    n = start + tl.arange(0, BN)
    dd = tl.arange(0, D)
    if MASK:
        k_t = tl.load(kb + n[:, None] * skt + dd[None, :], mask=(n < T)[:, None], other=0.0).to(DOT_T)
        v_t = tl.load(vb + n[:, None] * svt + dd[None, :], mask=(n < T)[:, None], other=0.0).to(DOT_T)
    else:
        k_t = tl.load(kb + n[:, None] * skt + dd[None, :]).to(DOT_T)
        v_t = tl.load(vb + n[:, None] * svt + dd[None, :]).to(DOT_T)
    s = tl.dot(q_t, tl.trans(k_t), input_precision=PREC) * qs
    if MASK:
        s = tl.where((m[:, None] >= n[None, :]) & ((n < T) & (n >= st))[None, :], s, float("-inf"))
    elif HAS_START:
        s = tl.where((n >= st)[None, :], s, float("-inf"))
    if DOC:
        s = tl.where(n[None, :] >= st_row[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASK or HAS_START or DOC:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with no valid key yet (left pad): p = 0
    else:
        m_sub = m_new
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(DOT_T), v_t, acc * alpha[:, None], input_precision=PREC)   # the MMA accumulates in place
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(q, k, v, o, lse, key_start, doc_start, sm_scale, T,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                HAS_START: tl.constexpr, HAS_DOC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
                REV: tl.constexpr):
    """One program: BM query rows of query head h. REV: the last query blocks (the most key blocks) start first, so
    the causal triangle's long programs do not form the tail of the launch. Key blocks [lo, diag) lie wholly below
    the causal diagonal and run unmasked; [diag, hi) get the causal/length mask (BN divides BM, so diag = pid_m * BM
    is a block boundary). Document masking (doc_start [B, T], non-decreasing along T): keys start at the block's
    first row's document start, and the blocks before the last row's document start get the per-row mask."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    if REV:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // G
    m = pid_m * BM + tl.arange(0, BM)
    dd = tl.arange(0, D)
    qs = sm_scale * 1.4426950408889634  # log2(e): scores in base 2
    q_t = tl.load(q + b * sqb + h * sqh + m[:, None] * sqt + dd[None, :], mask=(m < T)[:, None], other=0.0).to(DOT_T)
    kb, vb = k + b * skb + hk * skh, v + b * svb + hk * svh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    st = _key_start(key_start, b, HAS_START)
    diag = pid_m * BM
    hi = tl.minimum(diag + BM, T)
    if HAS_DOC:
        st_row = tl.load(doc_start + b * T + m, mask=m < T, other=0).to(tl.int32)
        lo = (tl.load(doc_start + b * T + diag).to(tl.int32) // BN) * BN
        st_last = tl.load(doc_start + b * T + hi - 1).to(tl.int32)
        mid = tl.maximum(lo, tl.minimum(tl.cdiv(st_last, BN) * BN, diag))   # blocks from here: every row sees all
        for start in range(lo, mid, BN):
            m_i, l_i, acc = _fwd_block(q_t, kb, vb, m, start, st, st_row, T, skt, svt, m_i, l_i, acc, qs, BN=BN,
                                       D=D, MASK=False, HAS_START=False, DOC=True, DOT_T=DOT_T, PREC=PREC)
    else:
        st_row = m
        lo = (st // BN) * BN
        mid = lo
    for start in range(mid, diag, BN):
        m_i, l_i, acc = _fwd_block(q_t, kb, vb, m, start, st, st_row, T, skt, svt, m_i, l_i, acc, qs, BN=BN, D=D,
                                   MASK=False, HAS_START=HAS_START, DOC=False, DOT_T=DOT_T, PREC=PREC)
    for start in range(tl.maximum(mid, diag), hi, BN):
        m_i, l_i, acc = _fwd_block(q_t, kb, vb, m, start, st, st_row, T, skt, svt, m_i, l_i, acc, qs, BN=BN, D=D,
                                   MASK=True, HAS_START=HAS_START, DOC=HAS_DOC, DOT_T=DOT_T, PREC=PREC)
    # pad query rows (m < key_start) saw no key: output 0 and lse = +inf, so the backward gives them p = 0
    ok = l_i > 0
    acc = acc / tl.where(ok, l_i, 1.0)[:, None]
    row = (b * HQ + h) * T + m
    tl.store(o + row[:, None] * D + dd[None, :], acc.to(o.dtype.element_ty), mask=(m < T)[:, None])
    tl.store(lse + row, tl.where(ok, m_i + tl.log2(tl.where(ok, l_i, 1.0)), float("inf")), mask=m < T)


@triton.jit
def _bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, key_start, doc_start, doc_end, sm_scale, T,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                     HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, HAS_START: tl.constexpr, HAS_DOC: tl.constexpr,
                     DOT_T: tl.constexpr, PREC: tl.constexpr):
    """One program: BN keys of kv head hk; loops over the G query heads and the query blocks at or after the keys
    (with document masking, only up to the end of the last key's document, doc_end [B, T]).
    do, lse, delta, dk, dv are contiguous ([B, Hq, T, d], [B, Hq, T], [B, Hq, T], [B, Hk, T, d] x2)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HK, pid_bh % HK
    n = pid_n * BN + tl.arange(0, BN)
    dd = tl.arange(0, D)
    qs = sm_scale * 1.4426950408889634
    nmask = (n < T) & (n >= _key_start(key_start, b, HAS_START))   # keys in the left pad get no gradient
    k_t = tl.load(k + b * skb + hk * skh + n[:, None] * skt + dd[None, :], mask=nmask[:, None], other=0.0).to(DOT_T)
    v_t = tl.load(v + b * svb + hk * svh + n[:, None] * svt + dd[None, :], mask=nmask[:, None], other=0.0).to(DOT_T)
    dk_acc = tl.zeros([BN, D], tl.float32)
    dv_acc = tl.zeros([BN, D], tl.float32)
    lo = (pid_n * BN // BM) * BM
    if HAS_DOC:
        q_hi = tl.load(doc_end + b * T + tl.minimum(pid_n * BN + BN, T) - 1).to(tl.int32)
    else:
        q_hi = T
    for j in range(G):
        h = hk * G + j
        row0 = (b * HQ + h) * T
        for start in range(lo, q_hi, BM):
            m = start + tl.arange(0, BM)
            mmask = m < T
            q_t = tl.load(q + b * sqb + h * sqh + m[:, None] * sqt + dd[None, :], mask=mmask[:, None], other=0.0).to(DOT_T)
            do_t = tl.load(do + (row0 + m)[:, None] * D + dd[None, :], mask=mmask[:, None], other=0.0).to(DOT_T)
            lse_m = tl.load(lse + row0 + m, mask=mmask, other=0.0)
            dl_m = tl.load(delta + row0 + m, mask=mmask, other=0.0)
            # s^T [BN, BM]: keys as rows so dV = P^T dO is a plain dot
            sT = tl.dot(k_t, tl.trans(q_t), input_precision=PREC) * qs
            keep = (m[None, :] >= n[:, None]) & mmask[None, :] & nmask[:, None]
            if HAS_DOC:
                keep = keep & (n[:, None] >= tl.load(doc_start + b * T + m, mask=mmask, other=0)[None, :])
            pT = tl.where(keep, tl.exp2(sT - lse_m[None, :]), 0.0)
            dv_acc += tl.dot(pT.to(DOT_T), do_t, input_precision=PREC)
            dpT = tl.dot(v_t, tl.trans(do_t), input_precision=PREC)
            dsT = pT * (dpT - dl_m[None, :])
            dk_acc += tl.dot(dsT.to(DOT_T), q_t, input_precision=PREC)
    out = (b * HK + hk) * T + n
    tl.store(dk + out[:, None] * D + dd[None, :], (dk_acc * sm_scale).to(dk.dtype.element_ty), mask=(n < T)[:, None])
    tl.store(dv + out[:, None] * D + dd[None, :], dv_acc.to(dv.dtype.element_ty), mask=(n < T)[:, None])


@triton.jit
def _bwd_dq_kernel(q, k, v, do, lse, delta, dq, key_start, doc_start, sm_scale, T,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                   HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   HAS_START: tl.constexpr, HAS_DOC: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
                   REV: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    if REV:   # the last query blocks have the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // G
    m = pid_m * BM + tl.arange(0, BM)
    dd = tl.arange(0, D)
    mmask = m < T
    qs = sm_scale * 1.4426950408889634
    row = (b * HQ + h) * T + m
    q_t = tl.load(q + b * sqb + h * sqh + m[:, None] * sqt + dd[None, :], mask=mmask[:, None], other=0.0).to(DOT_T)
    do_t = tl.load(do + row[:, None] * D + dd[None, :], mask=mmask[:, None], other=0.0).to(DOT_T)
    lse_m = tl.load(lse + row, mask=mmask, other=0.0)
    dl_m = tl.load(delta + row, mask=mmask, other=0.0)
    kb, vb = k + b * skb + hk * skh, v + b * svb + hk * svh
    dq_acc = tl.zeros([BM, D], tl.float32)
    st = _key_start(key_start, b, HAS_START)
    if HAS_DOC:
        st_row = tl.load(doc_start + b * T + m, mask=mmask, other=0).to(tl.int32)
        st = tl.load(doc_start + b * T + pid_m * BM).to(tl.int32)   # the block's smallest document start
    hi = tl.minimum((pid_m + 1) * BM, T)
    for start in range((st // BN) * BN, hi, BN):
        n = start + tl.arange(0, BN)
        k_t = tl.load(kb + n[:, None] * skt + dd[None, :], mask=(n < T)[:, None], other=0.0).to(DOT_T)
        v_t = tl.load(vb + n[:, None] * svt + dd[None, :], mask=(n < T)[:, None], other=0.0).to(DOT_T)
        s = tl.dot(q_t, tl.trans(k_t), input_precision=PREC) * qs
        keep = (m[:, None] >= n[None, :]) & ((n < T) & (n >= st))[None, :] & mmask[:, None]
        if HAS_DOC:
            keep = keep & (n[None, :] >= st_row[:, None])
        p = tl.where(keep, tl.exp2(s - lse_m[:, None]), 0.0)
        dp = tl.dot(do_t, tl.trans(v_t), input_precision=PREC)
        ds = p * (dp - dl_m[:, None])
        dq_acc += tl.dot(ds.to(DOT_T), k_t, input_precision=PREC)
    tl.store(dq + row[:, None] * D + dd[None, :], (dq_acc * sm_scale).to(dq.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _decode_kernel(q, k, v, lengths, key_start, o_part, lse_part, sm_scale, S, SPLIT, NS,
                   sqb, sqh, skb, skh, skt, svb, svh, svt,
                   HK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                   HAS_START: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """Rows = the G query heads of kv head hk (padded to BG); keys [split * SPLIT, +SPLIT) in [key_start[b], lengths[b]).
    Writes the split's normalised output o_part [B, Hq, NS, d] and logsumexp lse_part [B, Hq, NS] (base 2)."""
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HK, pid_bh % HK
    g = tl.arange(0, BG)
    dd = tl.arange(0, D)
    h = hk * G + g
    gmask = g < G
    qs = sm_scale * 1.4426950408889634
    q_t = tl.load(q + b * sqb + h[:, None] * sqh + dd[None, :], mask=gmask[:, None], other=0.0).to(DOT_T)
    L = tl.minimum(tl.load(lengths + b).to(tl.int32), S)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, L)
    lo = tl.maximum(lo, _key_start(key_start, b, HAS_START))
    kb, vb = k + b * skb + hk * skh, v + b * svb + hk * svh
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    for start in range(lo, hi, BN):
        n = start + tl.arange(0, BN)
        nm = (n < hi) & (n >= lo)
        k_t = tl.load(kb + n[:, None] * skt + dd[None, :], mask=nm[:, None], other=0.0).to(DOT_T)
        v_t = tl.load(vb + n[:, None] * svt + dd[None, :], mask=nm[:, None], other=0.0).to(DOT_T)
        s = tl.dot(q_t, tl.trans(k_t), input_precision=PREC) * qs
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v_t, input_precision=PREC)
        m_i = m_new
    # an empty split (lo >= L) keeps l_i = 0: write o = 0 and lse = -inf so it gets zero weight in the merge
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    row = (b * HK * G + h) * NS + pid_s
    tl.store(o_part + row[:, None] * D + dd[None, :], acc / safe_l[:, None], mask=gmask[:, None])
    tl.store(lse_part + row, tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf")), mask=gmask)


@triton.jit
def _decode_merge_kernel(o_part, lse_part, o, NS, D: tl.constexpr, BS: tl.constexpr):
    """Flash-decoding merge of one (batch, query head) row: o = sum_s w_s o_s with w_s = softmax over the splits' base-2
    logsumexps. Empty splits (lse = -inf) get weight 0; a row with no valid key at all (lengths 0) gets 0."""
    row = tl.program_id(0)
    sp = tl.arange(0, BS)
    dd = tl.arange(0, D)
    lse = tl.load(lse_part + row * NS + sp, mask=sp < NS, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx)))
    op = tl.load(o_part + (row * NS + sp)[:, None] * D + dd[None, :], mask=(sp < NS)[:, None], other=0.0)
    tot = tl.sum(w, 0)
    acc = tl.sum(w[:, None] * op, 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(o + row * D + dd, acc.to(o.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------------------
# launchers

# Launch settings per kernel, filled by benchmarks/tune_kernels.py to try variants ({"fwd": {"BM": 128, ...}}).
TUNING: dict[str, dict] = {}


def _cfg(kernel: str, T: int, d: int, dtype=torch.bfloat16) -> dict:
    """Tile sizes, warps and pipeline stages of one kernel ("fwd", "bwd"), defaults overridden by TUNING[kernel]."""
    if INTERPRET:  # cost is per program per op: few, big programs
        b = min(pow2(T), 128)
        cfg = dict(BM=b, BN=b, num_warps=4, num_stages=1)
    elif dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles (bigger ones spill heavily)
        cfg = dict(BM=32, BN=32, num_warps=4 if d < 128 else 8, num_stages=2)
    else:
        # bf16/fp16, d=128: 64x64 tiles and 4 warps were fastest on an H100 (benchmarks/tune_kernels.py, B2 T4096:
        # fwd 0.179 ms vs 0.29 ms with 8 warps; fwd+bwd 1.07 ms with 2 stages in the backward vs 1.15 with 3)
        cfg = dict(BM=128 if d <= 64 else 64, BN=64, num_warps=4, num_stages=3 if kernel == "fwd" else 2)
    cfg.setdefault("REV", True)
    cfg.update(TUNING.get(kernel, {}))
    if kernel == "fwd" and cfg["BM"] % cfg["BN"]:
        raise ValueError(f"latent_attention: BN={cfg['BN']} must divide BM={cfg['BM']} (the causal split)")
    return cfg


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def attention_fwd(q, k, v, scale, key_start=None, doc_start=None):
    B, Hq, T, d = q.shape
    Hk = k.shape[1]
    c = _cfg("fwd", T, d, q.dtype)
    BM, BN = c["BM"], c["BN"]
    DOT_T, PREC = dot_dtype(q.dtype)
    o = torch.empty(B, Hq, T, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(T, BM), B * Hq)](q, k, v, o, lse, key_start if key_start is not None else lse,
                                              doc_start if doc_start is not None else lse, scale, T,
                                              *_strides(q), *_strides(k), *_strides(v), HQ=Hq, G=Hq // Hk, D=d,
                                              BM=BM, BN=BN, HAS_START=key_start is not None,
                                              HAS_DOC=doc_start is not None, DOT_T=DOT_T, PREC=PREC,
                                              REV=c["REV"], **launch_opts(c))
    return o, lse


def _doc_end(doc_start):
    """[B, T] int32: one past the last position of each token's document, from the document starts."""
    T = doc_start.shape[1]
    idx = torch.arange(T, device=doc_start.device, dtype=torch.int32)
    nxt = torch.cat([doc_start[:, 1:], doc_start.new_full((doc_start.shape[0], 1), T)], 1)
    e = torch.where(nxt != doc_start, idx + 1, T)   # token t ends its document (the next one starts elsewhere)
    return e.flip(1).cummin(dim=1).values.flip(1).to(torch.int32).contiguous()


def attention_bwd(do, q, k, v, o, lse, scale, key_start=None, doc_start=None):
    B, Hq, T, d = q.shape
    Hk = k.shape[1]
    c = _cfg("bwd", T, d, q.dtype)
    BM, BN = c["BM"], c["BN"]
    DOT_T, PREC = dot_dtype(q.dtype)
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # D_i = rowsum(dO * O), FlashAttention-2 preprocessing
    dq = torch.empty(B, Hq, T, d, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Hk, T, d, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hk, T, d, device=q.device, dtype=v.dtype)
    st = (*_strides(q), *_strides(k), *_strides(v))
    ks, has = (key_start, True) if key_start is not None else (lse, False)
    ds, de, has_doc = ((doc_start, _doc_end(doc_start), True) if doc_start is not None else (lse, lse, False))
    _bwd_dkdv_kernel[(triton.cdiv(T, BN), B * Hk)](q, k, v, do, lse, delta, dk, dv, ks, ds, de, scale, T, *st,
                                                   HQ=Hq, HK=Hk, G=Hq // Hk, D=d, BM=BM, BN=BN, HAS_START=has,
                                                   HAS_DOC=has_doc, DOT_T=DOT_T, PREC=PREC, **launch_opts(c))
    _bwd_dq_kernel[(triton.cdiv(T, BM), B * Hq)](q, k, v, do, lse, delta, dq, ks, ds, scale, T, *st,
                                                 HQ=Hq, G=Hq // Hk, D=d, BM=BM, BN=BN, HAS_START=has,
                                                 HAS_DOC=has_doc, DOT_T=DOT_T, PREC=PREC, REV=c["REV"],
                                                 **launch_opts(c))
    return dq, dk, dv


class LatentAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, key_start, doc_start=None):
        o, lse = attention_fwd(q, k, v, scale, key_start, doc_start)
        ctx.save_for_backward(q, k, v, o, lse, key_start, doc_start)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_start, doc_start = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.scale, key_start, doc_start)
        return dq, dk, dv, None, None, None


def _check_qkv(fn, q, k, v, same_len=True):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor [B, H, T, d], got shape {getattr(x, 'shape', None)}")
    B, Hq, T, d = q.shape
    Hk = k.shape[1]
    if Hk < 1 or Hq % Hk:
        raise ValueError(f"{fn}: q has {Hq} heads, not a multiple of k's {Hk} kv heads")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"{fn}: head_dim={d} must be a power of two in [16, 256]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{fn}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    S = T if same_len else k.shape[2]
    check_tensor("q", q, (B, Hq, T, d))
    check_tensor("k", k, (B, Hk, S, d))
    check_tensor("v", v, (B, Hk, S, d))
    if B < 1 or T < 1 or S < 1:
        raise ValueError(f"{fn}: empty batch or time axis (q {list(q.shape)}, k {list(k.shape)})")


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_key_start(fn, key_start, B, device):
    if key_start is None:
        return None
    if not isinstance(key_start, torch.Tensor) or key_start.shape != (B,) or key_start.dtype.is_floating_point:
        raise ValueError(f"{fn}: key_start must be an integer tensor of shape [{B}]")
    if key_start.device != device:
        raise ValueError(f"{fn}: key_start is on {key_start.device}, q on {device}")
    return key_start.contiguous()


def _check_doc_start(fn, doc_start, B, T, device):
    if doc_start is None:
        return None
    if not isinstance(doc_start, torch.Tensor) or doc_start.shape != (B, T) or doc_start.dtype.is_floating_point:
        raise ValueError(f"{fn}: doc_start must be an integer tensor of shape [{B}, {T}]")
    if doc_start.device != device:
        raise ValueError(f"{fn}: doc_start is on {doc_start.device}, q on {device}")
    return doc_start.to(torch.int32).contiguous()


def latent_attention(q, k, v, scale: float | None = None, key_start=None, doc_start=None):
    """Causal softmax attention with GQA, flash-style (no T x T matrix). Differentiable in q, k, v.

    Args:
        q: [B, Hq, T, d], k: [B, Hk, T, d], v: [B, Hk, T, d]; Hq a multiple of Hk (query head h uses kv head h // (Hq/Hk));
           fp32/fp16/bf16, head_dim a power of two in [16, 256]. Strided views are fine (last dim contiguous).
        scale: softmax scale, default 1/sqrt(d).
        key_start: optional [B] integer, the first real position of each left-padded sequence: keys before it are
           masked, and query rows before it (pads) return 0 with zero gradient.
        doc_start: optional [B, T] integer, document masking of packed windows: the first position of each query's
           document (non-decreasing along T, doc_start[b, i] <= i); query i sees keys doc_start[b, i] <= j <= i, and
           key blocks no query of a block can see are skipped. Not with key_start.
    Returns:
        o [B, Hq, T, d] in q's dtype. Equals SDPA(q, k, v, is_causal=True, enable_gqa=True, scale=scale) when
        key_start and doc_start are None (with doc_start: SDPA with the block-diagonal causal mask).
    """
    _check_qkv("latent_attention", q, k, v)
    key_start = _check_key_start("latent_attention", key_start, q.shape[0], q.device)
    doc_start = _check_doc_start("latent_attention", doc_start, q.shape[0], q.shape[2], q.device)
    if key_start is not None and doc_start is not None:
        raise ValueError("latent_attention: key_start (left padding) and doc_start (document masking) are exclusive")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return LatentAttentionFunction.apply(_last_contig(q), _last_contig(k), _last_contig(v), scale, key_start,
                                         doc_start)


def latent_attention_decode(q, k_cache, v_cache, lengths, scale: float | None = None, key_start=None):
    """One query token per sequence against the compressed KV cache (forward only).

    Args:
        q: [B, Hq, 1, d]; k_cache, v_cache: [B, Hk, S, d] (strided views fine); lengths: [B] integer, the keys at
           positions < lengths[b] are valid (the new token's own key must already be written); a row with
           lengths[b] == 0 returns zeros.
        scale: softmax scale, default 1/sqrt(d).
        key_start: optional [B] integer; keys before it (a left pad) are masked too.
    Returns:
        o [B, Hq, 1, d] in q's dtype.
    """
    _check_qkv("latent_attention_decode", q, k_cache, v_cache, same_len=False)
    B, Hq, T, d = q.shape
    if T != 1:
        raise ValueError(f"latent_attention_decode: q must hold one token per sequence, got T={T}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.dtype.is_floating_point:
        raise ValueError(f"latent_attention_decode: lengths must be an integer tensor of shape [{B}]")
    if lengths.device != q.device:
        raise ValueError(f"latent_attention_decode: lengths is on {lengths.device}, q on {q.device}")
    key_start = _check_key_start("latent_attention_decode", key_start, B, q.device)
    scale = float(d ** -0.5 if scale is None else scale)
    Hk, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    k_cache, v_cache = _last_contig(k_cache), _last_contig(v_cache)
    q = _last_contig(q)
    BN = min(pow2(S), 128) if INTERPRET else 64
    # Enough KV splits to give the GPU ~4 programs per SM-ish; the interpreter prefers one split.
    SPLIT = triton.cdiv(S, BN) * BN if INTERPRET else max(BN, triton.cdiv(triton.cdiv(S, max(1, 128 // (B * Hk))), BN) * BN)
    SPLIT = TUNING.get("decode", {}).get("SPLIT", SPLIT)   # a multiple of BN (tests force several splits)
    if SPLIT % BN:
        raise ValueError(f"latent_attention_decode: SPLIT={SPLIT} must be a multiple of BN={BN}")
    NS = triton.cdiv(S, SPLIT)
    DOT_T, PREC = dot_dtype(q.dtype)
    o_part = torch.empty(B, Hq, NS, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hq, NS, device=q.device, dtype=torch.float32)
    _decode_kernel[(B * Hk, NS)](q, k_cache, v_cache, lengths, key_start if key_start is not None else lengths,
                                 o_part, lse_part, scale, S, SPLIT, NS, q.stride(0), q.stride(1),
                                 *_strides(k_cache), *_strides(v_cache), HK=Hk, G=G, D=d, BG=pow2(G), BN=BN,
                                 HAS_START=key_start is not None, DOT_T=DOT_T, PREC=PREC)
    # flash-decoding merge of the splits (one small launch instead of ~10 torch ops: decode is launch-bound)
    o = torch.empty(B, Hq, 1, d, device=q.device, dtype=q.dtype)
    _decode_merge_kernel[(B * Hq,)](o_part, lse_part, o, NS, D=d, BS=pow2(NS, 1), num_warps=4)
    return o

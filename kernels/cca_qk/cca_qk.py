"""Fused CCA q/k preparation in Triton: causal convs + qk-mean skips + L2 norm * sqrt(d) + key temperature + RoPE.

Notable features:
- One program handles one (batch, head, block of BT time steps) and keeps the head's d channels in registers: the
  depthwise conv is two multiply-adds per channel, the head-wise grouped conv is two [BT, d] @ [d, d] dots (one per
  tap), and norm, temperature and RoPE are its epilogue. The raw packed columns are read once from `qk`; the
  single 2-column left pad (or the decode `conv_state`) is folded into the loads, so no padded copy is made.
- Partial NeoX RoPE needs each rotated dim's partner (`rotate_half`). Instead of permuting registers, the conv output
  is produced in three column chunks: x1 = dims [0, d/4), x2 = [d/4, d/2) (the rotated half) and x3 = [d/2, d)
  (pass-through), so RoPE is `x1*cos - x2*sin`, `x2*cos + x1*sin` on whole tiles. Chunks narrower than 16 columns
  are padded (masked) to 16 so every tl.dot shape is legal on a GPU.
- Backward recomputes the forward in registers (nothing but the inputs is saved) in two kernels: `_bwd_dy` undoes
  RoPE, the norm and the temperature (dtemp from per-program partial sums, reduced deterministically in torch);
  `_bwd_conv` turns dy into dx (transposed convs + skip paths) and accumulates the conv weight grads with fp32
  atomics.
Legend: B batch, T time, C = (Hq+Hk)*d packed channels, H = Hq+Hk heads, d head_dim, R = d/2 rotary dims.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import INTERPRET, check_tensor, dot_dtype, launch_opts, pow2


# ----------------------------------------------------------------------------------------------------------------
# helpers (inlined into the kernels)

@triton.jit
def _load_u(qk, state, b, t, ch, T, C, HAS_STATE: tl.constexpr):
    """Raw packed columns u[b, t, ch] as fp32 [BT, BC]; t in [-2, 0) reads conv_state (or the zero pad)."""
    inb = (t >= 0) & (t < T)
    u = tl.load(qk + (b * T + t)[:, None] * C + ch[None, :], mask=inb[:, None], other=0.0).to(tl.float32)
    if HAS_STATE:
        ins = (t < 0) & (t >= -2)
        u += tl.load(state + b * C * 2 + ch[None, :] * 2 + (t + 2)[:, None], mask=ins[:, None], other=0.0).to(tl.float32)
    return u


@triton.jit
def _skip(qk, state, b, t, h, co, j, W, T, C, HQ: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
          HAS_STATE: tl.constexpr):
    """qk-mean skip for head h on head-dims co + j (j < W): (q_h + k_g)/2 for a q head, (mean_g q + k_g)/2 for k head g."""
    cj = tl.where(j < W, co + j, 0)
    if h < HQ:
        g = h // G
        own = _load_u(qk, state, b, t, h * D + cj, T, C, HAS_STATE)
        kv = _load_u(qk, state, b, t, (HQ + g) * D + cj, T, C, HAS_STATE)
        res = (own + kv) * 0.5
    else:
        g = h - HQ
        kv = _load_u(qk, state, b, t, h * D + cj, T, C, HAS_STATE)
        qsum = tl.zeros_like(kv)
        for i in tl.static_range(G):
            qsum += _load_u(qk, state, b, t, (g * G + i) * D + cj, T, C, HAS_STATE)
        res = (qsum / G + kv) * 0.5
    return tl.where((j < W)[None, :], res, 0.0)  # padded chunk lanes must not enter the norm


@triton.jit
def _conv_weights(g_w, h, co, j, W, D: tl.constexpr, DOT_T: tl.constexpr):
    """Head-wise conv taps for head h, output dims co + j (j < W), as [D(in), BW(out)] dot operands."""
    i = tl.arange(0, D)
    oc = h * D + co + j
    wmask = (j < W)[None, :]
    w0 = tl.load(g_w + oc[None, :] * (D * 2) + i[:, None] * 2, mask=wmask, other=0.0).to(DOT_T)
    w1 = tl.load(g_w + oc[None, :] * (D * 2) + i[:, None] * 2 + 1, mask=wmask, other=0.0).to(DOT_T)
    return w0, w1


@triton.jit
def _conv_chunk(a0, a1, g_w, g_b, h, co, j, W, D: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """Grouped (head-wise) conv output for head h, dims co + j: a[t] @ W_tap0^T + a[t+1] @ W_tap1^T + bias -> [BT, BW]."""
    w0, w1 = _conv_weights(g_w, h, co, j, W, D, DOT_T)
    y = tl.dot(a0.to(DOT_T), w0, input_precision=PREC)
    y += tl.dot(a1.to(DOT_T), w1, input_precision=PREC)
    y += tl.load(g_b + h * D + co + j, mask=j < W, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _doc_pos(doc_pos, b, t, T):
    """Position of token t within its document ([BT] int32; 0 outside [0, T))."""
    return tl.load(doc_pos + b * T + t, mask=(t >= 0) & (t < T), other=0)


@triton.jit
def _depthwise(qk, state, dw_w, dw_b, doc_pos, b, t, h, T, C, D: tl.constexpr, HAS_STATE: tl.constexpr,
               HAS_DOC: tl.constexpr):
    """Depthwise conv outputs a[t] and a[t+1] for head h's channels (padded index: a[t] reads u[t-2], u[t-1]).
    HAS_DOC (document masking): the taps of output t read u[t - lag] only where doc_pos[t] >= lag, so a[t] and
    a[t+1] are the two tap inputs of output t alone (no longer shared with the neighbouring outputs)."""
    ch = h * D + tl.arange(0, D)
    u_m2 = _load_u(qk, state, b, t - 2, ch, T, C, HAS_STATE)
    u_m1 = _load_u(qk, state, b, t - 1, ch, T, C, HAS_STATE)
    u_0 = _load_u(qk, state, b, t, ch, T, C, HAS_STATE)
    if HAS_DOC:
        pos = _doc_pos(doc_pos, b, t, T)
        u_m2 = tl.where((pos >= 2)[:, None], u_m2, 0.0)
        u_m1 = tl.where((pos >= 1)[:, None], u_m1, 0.0)
    w0 = tl.load(dw_w + ch * 2).to(tl.float32)[None, :]
    w1 = tl.load(dw_w + ch * 2 + 1).to(tl.float32)[None, :]
    bias = tl.load(dw_b + ch).to(tl.float32)[None, :]
    return w0 * u_m2 + w1 * u_m1 + bias, w0 * u_m1 + w1 * u_0 + bias


@triton.jit
def _pre_norm(qk, state, dw_w, dw_b, g_w, g_b, doc_pos, b, t, h, jq, jh, T, C,
              HQ: tl.constexpr, D: tl.constexpr, G: tl.constexpr, HAS_STATE: tl.constexpr, HAS_DOC: tl.constexpr,
              DOT_T: tl.constexpr, PREC: tl.constexpr):
    """y = conv(qk) + skip, in the three chunks x1 [BT, BQ], x2 [BT, BQ], x3 [BT, BH] (see module docstring)."""
    Q4: tl.constexpr = D // 4
    R: tl.constexpr = D // 2
    a0, a1 = _depthwise(qk, state, dw_w, dw_b, doc_pos, b, t, h, T, C, D, HAS_STATE, HAS_DOC)
    y1 = _conv_chunk(a0, a1, g_w, g_b, h, 0, jq, Q4, D, DOT_T, PREC) + _skip(qk, state, b, t, h, 0, jq, Q4, T, C, HQ, D, G, HAS_STATE)
    y2 = _conv_chunk(a0, a1, g_w, g_b, h, Q4, jq, Q4, D, DOT_T, PREC) + _skip(qk, state, b, t, h, Q4, jq, Q4, T, C, HQ, D, G, HAS_STATE)
    y3 = _conv_chunk(a0, a1, g_w, g_b, h, R, jh, R, D, DOT_T, PREC) + _skip(qk, state, b, t, h, R, jh, R, T, C, HQ, D, G, HAS_STATE)
    return y1, y2, y3


@triton.jit
def _rope_tables(cos, sin, b, t, jq, T, tmask, D: tl.constexpr):
    """cos/sin [B, T, R] split into the halves that multiply x1 and x2: (c1, c2, s1, s2), each [BT, BQ]."""
    Q4: tl.constexpr = D // 4
    R: tl.constexpr = D // 2
    m = tmask[:, None] & (jq < Q4)[None, :]
    base = (b * T + t)[:, None] * R + jq[None, :]
    c1 = tl.load(cos + base, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos + base + Q4, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin + base, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin + base + Q4, mask=m, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


# ----------------------------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _fwd_kernel(qk, state, dw_w, dw_b, g_w, g_b, temp, cos, sin, doc_pos, out, T, eps, sqrt_d,
                HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HAS_STATE: tl.constexpr, HAS_DOC: tl.constexpr,
                BT: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
                NB: tl.constexpr):
    """One program: head h of sequence b over NB consecutive blocks of BT time steps. The head-wise conv's [D, D]
    taps (the only operand larger than the rows themselves) are loaded once per program and reused by every block,
    instead of once per BT rows."""
    H: tl.constexpr = HQ + HK
    G: tl.constexpr = HQ // HK
    Q4: tl.constexpr = D // 4
    R: tl.constexpr = D // 2
    C = H * D
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    jq, jh = tl.arange(0, BQ), tl.arange(0, BH)
    w10, w11 = _conv_weights(g_w, h, 0, jq, Q4, D, DOT_T)
    w20, w21 = _conv_weights(g_w, h, Q4, jq, Q4, D, DOT_T)
    w30, w31 = _conv_weights(g_w, h, R, jh, R, D, DOT_T)
    gb1 = tl.load(g_b + h * D + jq, mask=jq < Q4, other=0.0).to(tl.float32)[None, :]
    gb2 = tl.load(g_b + h * D + Q4 + jq, mask=jq < Q4, other=0.0).to(tl.float32)[None, :]
    gb3 = tl.load(g_b + h * D + R + jh, mask=jh < R, other=0.0).to(tl.float32)[None, :]
    tv = tl.load(temp + tl.maximum(h - HQ, 0)).to(tl.float32)
    tscale = tl.where(h >= HQ, tv, 1.0) * sqrt_d
    mq0 = (jq < Q4)[None, :]
    mh0 = (jh < R)[None, :]
    for it in range(NB):
        t = (pid_t * NB + it) * BT + tl.arange(0, BT)
        tmask = t < T
        a0, a1 = _depthwise(qk, state, dw_w, dw_b, doc_pos, b, t, h, T, C, D, HAS_STATE, HAS_DOC)
        a0, a1 = a0.to(DOT_T), a1.to(DOT_T)
        y1 = tl.dot(a0, w10, input_precision=PREC) + tl.dot(a1, w11, input_precision=PREC) + gb1
        y1 += _skip(qk, state, b, t, h, 0, jq, Q4, T, C, HQ, D, G, HAS_STATE)
        y2 = tl.dot(a0, w20, input_precision=PREC) + tl.dot(a1, w21, input_precision=PREC) + gb2
        y2 += _skip(qk, state, b, t, h, Q4, jq, Q4, T, C, HQ, D, G, HAS_STATE)
        y3 = tl.dot(a0, w30, input_precision=PREC) + tl.dot(a1, w31, input_precision=PREC) + gb3
        y3 += _skip(qk, state, b, t, h, R, jh, R, T, C, HQ, D, G, HAS_STATE)
        y1, y2, y3 = tl.where(mq0, y1, 0.0), tl.where(mq0, y2, 0.0), tl.where(mh0, y3, 0.0)   # padded chunk lanes
        ss = tl.sum(y1 * y1, 1) + tl.sum(y2 * y2, 1) + tl.sum(y3 * y3, 1)
        scale = tscale / tl.maximum(tl.sqrt(ss), eps)
        z1, z2, z3 = y1 * scale[:, None], y2 * scale[:, None], y3 * scale[:, None]
        c1, c2, s1, s2 = _rope_tables(cos, sin, b, t, jq, T, tmask, D)
        o1 = z1 * c1 - z2 * s1
        o2 = z2 * c2 + z1 * s2
        base = out + ((b * T + t) * H + h)[:, None] * D
        mq = tmask[:, None] & mq0
        tl.store(base + jq[None, :], o1.to(out.dtype.element_ty), mask=mq)
        tl.store(base + Q4 + jq[None, :], o2.to(out.dtype.element_ty), mask=mq)
        tl.store(base + R + jh[None, :], z3.to(out.dtype.element_ty), mask=tmask[:, None] & mh0)


@triton.jit
def _bwd_dy_kernel(qk, dw_w, dw_b, g_w, g_b, temp, cos, sin, doc_pos, dout, dy, dtemp_part, T, NT, eps, sqrt_d,
                   HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HAS_DOC: tl.constexpr,
                   BT: tl.constexpr, BQ: tl.constexpr, BH: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """dout [B, T, H, d] -> dy [B, T, C] fp32 (grad of conv+skip output) and dtemp partials [B, NT, H]."""
    H: tl.constexpr = HQ + HK
    G: tl.constexpr = HQ // HK
    Q4: tl.constexpr = D // 4
    R: tl.constexpr = D // 2
    C = H * D
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < T
    jq, jh = tl.arange(0, BQ), tl.arange(0, BH)
    y1, y2, y3 = _pre_norm(qk, qk, dw_w, dw_b, g_w, g_b, doc_pos, b, t, h, jq, jh, T, C, HQ, D, G, False, HAS_DOC,
                           DOT_T, PREC)
    ss = tl.sum(y1 * y1, 1) + tl.sum(y2 * y2, 1) + tl.sum(y3 * y3, 1)
    n = tl.sqrt(ss)
    nrm = tl.maximum(n, eps)
    tv = tl.load(temp + tl.maximum(h - HQ, 0)).to(tl.float32)
    tv = tl.where(h >= HQ, tv, 1.0)
    base = dout + ((b * T + t) * H + h)[:, None] * D
    mq = tmask[:, None] & (jq < Q4)[None, :]
    mh = tmask[:, None] & (jh < R)[None, :]
    do1 = tl.load(base + jq[None, :], mask=mq, other=0.0).to(tl.float32)
    do2 = tl.load(base + Q4 + jq[None, :], mask=mq, other=0.0).to(tl.float32)
    dz3 = tl.load(base + R + jh[None, :], mask=mh, other=0.0).to(tl.float32)
    c1, c2, s1, s2 = _rope_tables(cos, sin, b, t, jq, T, tmask, D)
    # RoPE is linear: o1 = z1 c1 - z2 s1, o2 = z2 c2 + z1 s2
    dz1 = do1 * c1 + do2 * s2
    dz2 = do2 * c2 - do1 * s1
    # z = s * y / max(|y|, eps), s = sqrt(d) * temp: dy = s/nrm * (dz - [|y| > eps] (y.dz) y / nrm^2)
    ydz = tl.sum(y1 * dz1, 1) + tl.sum(y2 * dz2, 1) + tl.sum(y3 * dz3, 1)
    sc = sqrt_d * tv / nrm
    proj = tl.where(n > eps, ydz / (nrm * nrm), 0.0)
    # dtemp = sum_t dz . (sqrt(d) y / nrm)  (rows beyond T load dz = 0)
    tl.store(dtemp_part + (b * NT + pid_t) * H + h, tl.sum(ydz * sqrt_d / nrm, 0))
    dbase = dy + (b * T + t)[:, None] * C + h * D
    tl.store(dbase + jq[None, :], sc[:, None] * (dz1 - proj[:, None] * y1), mask=mq)
    tl.store(dbase + Q4 + jq[None, :], sc[:, None] * (dz2 - proj[:, None] * y2), mask=mq)
    tl.store(dbase + R + jh[None, :], sc[:, None] * (dz3 - proj[:, None] * y3), mask=mh)


@triton.jit
def _bwd_conv_kernel(qk, dw_w, dw_b, g_w, dy, doc_pos, dqk, d_dw_w, d_dw_b, a_out, a0_out, T,
                     HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HAS_DOC: tl.constexpr, BT: tl.constexpr,
                     DOT_T: tl.constexpr, PREC: tl.constexpr):
    """dy [B, T, C] -> dqk [B, T, C], the depthwise weight grads (fp32, atomically accumulated: [C] vectors) and
    the depthwise output a [B, T+1, C] (in qk's dtype), from which the launcher gets the head-wise weight grads as one
    batched GEMM per tap (dW_k = dy^T a[. + k] per head; [D, D] atomics from every program were ~7 ms at 4096 tokens).

    Rows r cover [0, T] (T+1 rows): the depthwise output a has T+1 positions, a[s] = w0 u[s-2] + w1 u[s-1] + b
    (u = raw columns, u[<0] = pad), and y[t] = W0 a[t] + W1 a[t+1] + gb. Hence da[s] = W0^T dy[s] + W1^T dy[s-1],
    du[j] = w0 da[j+2] + w1 da[j+1].

    HAS_DOC (document masking, p = doc_pos, m_l[t] = p[t] >= l): output t has its own tap inputs
    a0[t] = w0 m2[t] u[t-2] + w1 m1[t] u[t-1] + b and a1[t] = w0 m1[t] u[t-1] + w1 u[t] + b. Then
    du[j] = w1 (da1[j] + m1[j+1] da0[j+1]) + w0 (m1[j+1] da1[j+1] + m2[j+2] da0[j+2]) with da_k = W_k^T dy (dy[j+1]
    and dy[j+2] masked before the dots); dw0 = sum_r (m2[r] da0[r] + m1[r-1] da1[r-1]) u[r-2],
    dw1 = sum_r (m1[r] da0[r] + da1[r-1]) u[r-1]; a_out[r] = a1[r-1] and a0_out[r] = a0[r] (they differ only at
    document starts, where a0 = b) for the head-wise weight grads."""
    H: tl.constexpr = HQ + HK
    G: tl.constexpr = HQ // HK
    C = H * D
    pid_r, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    r = pid_r * BT + tl.arange(0, BT)
    i = tl.arange(0, D)
    ch = h * D + i

    def_row = (r < T)
    dy_r = _load_u(dy, dy, b, r, ch, T, C, False)
    dy_m1 = _load_u(dy, dy, b, r - 1, ch, T, C, False)
    dy_p1 = _load_u(dy, dy, b, r + 1, ch, T, C, False)
    dy_p2 = _load_u(dy, dy, b, r + 2, ch, T, C, False)
    if HAS_DOC:
        p_m1 = _doc_pos(doc_pos, b, r - 1, T)
        p_r = _doc_pos(doc_pos, b, r, T)
        dy_p1 = tl.where((_doc_pos(doc_pos, b, r + 1, T) >= 1)[:, None], dy_p1, 0.0)
        dy_p2 = tl.where((_doc_pos(doc_pos, b, r + 2, T) >= 2)[:, None], dy_p2, 0.0)
    # grouped-conv weights as [D(out c), D(in i)] per tap
    w0 = tl.load(g_w + ch[:, None] * (D * 2) + i[None, :] * 2).to(DOT_T)
    w1 = tl.load(g_w + ch[:, None] * (D * 2) + i[None, :] * 2 + 1).to(DOT_T)
    da0_r = tl.dot(dy_r.to(DOT_T), w0, input_precision=PREC)
    da1_m1 = tl.dot(dy_m1.to(DOT_T), w1, input_precision=PREC)
    da_r = da0_r + da1_m1
    da_p1 = tl.dot(dy_p1.to(DOT_T), w0, input_precision=PREC) + tl.dot(dy_r.to(DOT_T), w1, input_precision=PREC)
    da_p2 = tl.dot(dy_p2.to(DOT_T), w0, input_precision=PREC) + tl.dot(dy_p1.to(DOT_T), w1, input_precision=PREC)

    dw0 = tl.load(dw_w + ch * 2).to(tl.float32)[None, :]
    dw1 = tl.load(dw_w + ch * 2 + 1).to(tl.float32)[None, :]
    dx = dw0 * da_p2 + dw1 * da_p1
    # qk-mean skip paths: q head j gets dy_j/2 + dy_{k g}/(2G); k head g gets sum_j dy_j/2 + dy_g/2
    if h < HQ:
        dx += 0.5 * dy_r + _load_u(dy, dy, b, r, (HQ + h // G) * D + i, T, C, False) * (0.5 / G)
    else:
        g = h - HQ
        dx += 0.5 * dy_r
        for jj in tl.static_range(G):
            dx += 0.5 * _load_u(dy, dy, b, r, (g * G + jj) * D + i, T, C, False)
    tl.store(dqk + (b * T + r)[:, None] * C + ch[None, :], dx.to(dqk.dtype.element_ty), mask=def_row[:, None])

    # depthwise weight grads from the rows this program owns (s = r in [0, T]; da[s > T] is zero by the masks)
    u_m2 = _load_u(qk, qk, b, r - 2, ch, T, C, False)
    u_m1 = _load_u(qk, qk, b, r - 1, ch, T, C, False)
    if HAS_DOC:
        tl.atomic_add(d_dw_w + ch * 2, tl.sum((tl.where((p_r >= 2)[:, None], da0_r, 0.0)
                                               + tl.where((p_m1 >= 1)[:, None], da1_m1, 0.0)) * u_m2, 0))
        tl.atomic_add(d_dw_w + ch * 2 + 1, tl.sum((tl.where((p_r >= 1)[:, None], da0_r, 0.0) + da1_m1) * u_m1, 0))
    else:
        tl.atomic_add(d_dw_w + ch * 2, tl.sum(da_r * u_m2, 0))
        tl.atomic_add(d_dw_w + ch * 2 + 1, tl.sum(da_r * u_m1, 0))
    tl.atomic_add(d_dw_b + ch, tl.sum(tl.where((r <= T)[:, None], da_r, 0.0), 0))
    # the depthwise output a[s] (s = r in [0, T]) for the head-wise weight grads, reduced outside by a GEMM
    dwb = tl.load(dw_b + ch).to(tl.float32)[None, :]
    if HAS_DOC:
        a_r = dw0 * tl.where((p_m1 >= 1)[:, None], u_m2, 0.0) + dw1 * u_m1 + dwb
        a0_r = tl.where((p_r >= 1)[:, None], a_r, dwb)
        tl.store(a0_out + (b * (T + 1) + r)[:, None] * C + ch[None, :], a0_r.to(a0_out.dtype.element_ty),
                 mask=(r <= T)[:, None])
    else:
        a_r = dw0 * u_m2 + dw1 * u_m1 + dwb
    tl.store(a_out + (b * (T + 1) + r)[:, None] * C + ch[None, :], a_r.to(a_out.dtype.element_ty), mask=(r <= T)[:, None])


# ----------------------------------------------------------------------------------------------------------------
# launchers

# Launch settings, filled by benchmarks/tune_kernels.py to try variants ({"fwd": {"BT": 32, "num_warps": 4}, ...}).
TUNING: dict[str, dict] = {}


def _cfg(kernel: str, T: int, d: int) -> dict:
    """Time block BT, warps and stages of one kernel ("fwd", "bwd_dy", "bwd_conv"), overridden by TUNING[kernel].

    The interpreter's cost is per program per op, so it gets one big time block. On an H100 at d=128 (bf16, B2 T4096,
    benchmarks/tune_kernels.py): the forward with BT=16 and 4 warps ran in 0.207 ms against 0.367 ms with 8 warps."""
    BT = min(pow2(T + 1), 256) if INTERPRET else (16 if d >= 128 else 32)
    warps, stages = 4, 1 if INTERPRET or kernel == "bwd_dy" else 3   # bwd_dy: 1.72 ms fwd+bwd vs 1.94 with 3 stages
    if not INTERPRET and kernel == "bwd_conv":
        BT, warps = 64, 8   # H100, d=128: 64 x 8 warps was fastest (tune_kernels.py)
    cfg = dict(BT=BT, num_warps=warps, num_stages=stages, NB=1 if INTERPRET else 8)   # NB: time blocks per program
    cfg.update(TUNING.get(kernel, {}))
    cfg["BQ"], cfg["BH"] = pow2(d // 4), pow2(d // 2)
    return cfg


def cca_qk_fwd(qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, Hq, Hk, d, conv_state=None, doc_pos=None):
    B, T, C = qk.shape
    out = torch.empty(B, T, Hq + Hk, d, device=qk.device, dtype=qk.dtype)
    c = _cfg("fwd", T, d)
    BT, BQ, BH = c["BT"], c["BQ"], c["BH"]
    DOT_T, PREC = dot_dtype(qk.dtype)
    state = conv_state.contiguous() if conv_state is not None else qk
    NB = max(1, min(c["NB"], triton.cdiv(T, BT)))
    grid = (triton.cdiv(T, BT * NB), B * (Hq + Hk))
    _fwd_kernel[grid](qk, state, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin,
                      doc_pos if doc_pos is not None else qk, out, T, torch.finfo(qk.dtype).eps, math.sqrt(d),
                      HQ=Hq, HK=Hk, D=d, HAS_STATE=conv_state is not None, HAS_DOC=doc_pos is not None,
                      BT=BT, BQ=BQ, BH=BH, DOT_T=DOT_T, PREC=PREC, NB=NB, **launch_opts(c))
    return out


def cca_qk_bwd(dout, qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, Hq, Hk, d, doc_pos=None):
    B, T, C = qk.shape
    H = Hq + Hk
    c, cc = _cfg("bwd_dy", T, d), _cfg("bwd_conv", T, d)
    BT, BQ, BH = c["BT"], c["BQ"], c["BH"]
    DOT_T, PREC = dot_dtype(qk.dtype)
    NT = triton.cdiv(T, BT)
    dy = torch.empty(B, T, C, device=qk.device, dtype=torch.float32)
    dtemp_part = torch.empty(B, NT, H, device=qk.device, dtype=torch.float32)
    has_doc = doc_pos is not None
    dp = doc_pos if has_doc else qk
    _bwd_dy_kernel[(NT, B * H)](qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, dp, dout, dy, dtemp_part,
                                T, NT, torch.finfo(qk.dtype).eps, math.sqrt(d), HQ=Hq, HK=Hk, D=d, HAS_DOC=has_doc,
                                BT=BT, BQ=BQ, BH=BH, DOT_T=DOT_T, PREC=PREC, **launch_opts(c))
    dqk = torch.empty_like(qk)
    f32 = dict(device=qk.device, dtype=torch.float32)
    d_dw_w, d_dw_b = torch.zeros(C, 1, 2, **f32), torch.zeros(C, **f32)
    a = torch.empty(B, T + 1, C, device=qk.device, dtype=qk.dtype)   # fp32 for fp32 inputs, else half
    a0 = torch.empty_like(a) if has_doc else a   # document masking: tap 0's own inputs (b at document starts)
    _bwd_conv_kernel[(triton.cdiv(T + 1, cc["BT"]), B * H)](qk, dw_weight, dw_bias, g_weight, dy, dp, dqk, d_dw_w,
                                                           d_dw_b, a, a0, T, HQ=Hq, HK=Hk, D=d, HAS_DOC=has_doc,
                                                           BT=cc["BT"], DOT_T=DOT_T, PREC=PREC, **launch_opts(cc))
    # head-wise conv weight grads: dW_k[h d + c, i] = sum_(b, t) dy[b, t, h d + c] a[b, t + k, h d + i], one batched
    # GEMM per tap in the inputs' precision (half operands, fp32 accumulation, as torch's own conv backward does)
    dy_h = dy.to(qk.dtype).view(B * T, H, d).permute(1, 2, 0)                       # [H, d(c), B T]
    d_g_w = torch.stack([torch.bmm(dy_h, (a0 if k == 0 else a)[:, k:T + k].reshape(B * T, H, d).transpose(0, 1))
                         for k in (0, 1)], -1)
    d_g_w = d_g_w.float().reshape(C, d, 2)
    d_g_b = dy.sum((0, 1))
    dtemp = dtemp_part.sum((0, 1))[Hq:]
    return dqk, d_dw_w, d_dw_b, d_g_w, d_g_b, dtemp


class CCAQKPrepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, Hq, Hk, d, conv_state, doc_pos=None):
        out = cca_qk_fwd(qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, Hq, Hk, d, conv_state, doc_pos)
        ctx.save_for_backward(qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, doc_pos)
        ctx.dims = (Hq, Hk, d)
        ctx.has_state = conv_state is not None
        return out[:, :, :Hq], out[:, :, Hq:]

    @staticmethod
    def backward(ctx, dq, dk):
        if ctx.has_state:
            raise NotImplementedError("cca_qk_prep: backward through a conv_state (decode) call is not supported")
        qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, doc_pos = ctx.saved_tensors
        Hq, Hk, d = ctx.dims
        dq = torch.zeros_like(qk[..., : Hq * d]).view(*qk.shape[:2], Hq, d) if dq is None else dq
        dk = torch.zeros_like(qk[..., Hq * d:]).view(*qk.shape[:2], Hk, d) if dk is None else dk
        dout = torch.cat([dq, dk], dim=2).contiguous()
        dqk, d_dw_w, d_dw_b, d_g_w, d_g_b, dtemp = cca_qk_bwd(dout, qk, dw_weight, dw_bias, g_weight, g_bias, temp,
                                                              cos, sin, Hq, Hk, d, doc_pos)
        return (dqk, d_dw_w.to(dw_weight.dtype), d_dw_b.to(dw_bias.dtype), d_g_w.to(g_weight.dtype),
                d_g_b.to(g_bias.dtype), dtemp.to(temp.dtype), None, None, None, None, None, None, None)


def cca_qk_prep(qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin, num_q_heads: int, num_kv_heads: int,
                head_dim: int, conv_state=None, doc_pos=None):
    """Fused CCA q/k preparation (architecture.md §3 steps 1-3, 5). Differentiable in every input but cos/sin.

    Args:
        qk: [B, T, C] packed raw projections concat(q0 [B,T,Hq*d], k0 [B,T,Hk*d]), C = (Hq+Hk)*d, pads already zeroed.
        dw_weight: [C, 1, 2], dw_bias: [C]   depthwise causal conv (kernel 2).
        g_weight: [C, d, 2], g_bias: [C]     head-wise grouped conv (groups = Hq+Hk, kernel 2).
        temp: [Hk] linear key temperature.
        cos, sin: [B, T, d/2] (or [1, T, d/2], shared by the batch) HF NeoX tables (cos = cat(cos f, cos f)).
        conv_state: optional [B, C, 2], the last two raw columns before this chunk (decode); forward only.
        doc_pos: optional [B, T] integer, document masking of packed windows: each token's position within its
           document; the conv taps reaching `lag` tokens back read zeros where doc_pos < lag (history restarts at
           every document start, as the zero pad at t = 0). Not with conv_state.
    Returns:
        q [B, T, Hq, d], k [B, T, Hk, d] (views of one [B, T, Hq+Hk, d] buffer), in qk's dtype.
    Raises:
        ValueError on a wrong rank/shape/dtype/device, head_dim not a power of two in [16, 256], or Hq % Hk != 0.
    """
    Hq, Hk, d = int(num_q_heads), int(num_kv_heads), int(head_dim)
    if Hq < 1 or Hk < 1 or Hq % Hk:
        raise ValueError(f"cca_qk_prep: num_q_heads={Hq} must be a positive multiple of num_kv_heads={Hk}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"cca_qk_prep: head_dim={d} must be a power of two in [16, 256]")
    if not isinstance(qk, torch.Tensor) or qk.dim() != 3:
        raise ValueError(f"cca_qk_prep: qk must be [B, T, C], got shape {getattr(qk, 'shape', None)}")
    B, T, C = qk.shape
    if C != (Hq + Hk) * d:
        raise ValueError(f"cca_qk_prep: qk has {C} channels, expected (Hq+Hk)*d = ({Hq}+{Hk})*{d} = {(Hq + Hk) * d}")
    if T < 1 or B < 1:
        raise ValueError(f"cca_qk_prep: qk has an empty batch or time axis (shape {list(qk.shape)})")
    check_tensor("qk", qk, (B, T, C))
    check_tensor("dw_weight", dw_weight, (C, 1, 2))
    check_tensor("dw_bias", dw_bias, (C,))
    check_tensor("g_weight", g_weight, (C, d, 2))
    check_tensor("g_bias", g_bias, (C,))
    check_tensor("temp", temp, (Hk,))
    if isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 3 and cos.shape[0] == 1 < B:
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)        # one table shared by the batch
    check_tensor("cos", cos, (B, T, d // 2))
    check_tensor("sin", sin, (B, T, d // 2))
    if conv_state is not None:
        check_tensor("conv_state", conv_state, (B, C, 2))
    if doc_pos is not None:
        if not isinstance(doc_pos, torch.Tensor) or doc_pos.shape != (B, T) or doc_pos.dtype.is_floating_point:
            raise ValueError(f"cca_qk_prep: doc_pos must be an integer tensor of shape [{B}, {T}]")
        if doc_pos.device != qk.device:
            raise ValueError(f"cca_qk_prep: doc_pos is on {doc_pos.device}, qk on {qk.device}")
        if conv_state is not None:
            raise ValueError("cca_qk_prep: doc_pos (document masking) cannot continue from a conv_state")
        doc_pos = doc_pos.to(torch.int32).contiguous()
    args = [x.contiguous() for x in (qk, dw_weight, dw_bias, g_weight, g_bias, temp, cos, sin)]
    return CCAQKPrepFunction.apply(*args, Hq, Hk, d, conv_state, doc_pos)

"""Top-1 MoE experts in Triton: sort by expert, grouped SwiGLU GEMMs over the stacked weights, weighted un-permute.

Notable features:
- No per-expert masks over all tokens and no per-expert Python loop: tokens are sorted by expert once (a stable
  argsort; skipped tokens, expert -1, go to the end and are never computed), and each GEMM is ONE launch over all
  experts. Its row tiles are listed per expert on the device (`_tile_map`: an upper bound of cdiv(N, BM) + E tiles,
  surplus tiles exit at once), so there is no host synchronisation and the launch is CUDA-graph friendly.
- The token permutation lives in the GEMMs' loads and stores: the gate/up GEMM gathers x rows through the sort order,
  the down GEMM multiplies by the router weight and scatters each row straight back to its token (top-1: no
  reduction). No permuted copy of x or y exists.
- gate_up_proj [E, 2F, D] is read as two [D, BN] tiles (gate rows n, up rows F + n) feeding two accumulators, so the
  SwiGLU h = silu(g) * u is the GEMM's epilogue; the backward's dh GEMM likewise emits d(gate), d(up) in its epilogue.
- Weight gradients are a second grouped kernel that reduces over each expert's rows (dW_e = A_e^T B_e), again one
  launch, with x gathered through the sort order.
Legend: N tokens, D model dim, F expert FFN dim, E experts, BM/BN/BK tile sizes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import INTERPRET, check_tensor, dot_dtype, launch_opts, pow2


@triton.jit
def _tile(tile_expert, tile_row, offsets, E):
    pid = tl.program_id(0)
    e = tl.load(tile_expert + pid)
    row0 = tl.load(tile_row + pid)
    row_end = tl.load(offsets + tl.minimum(e, E - 1) + 1)
    row_end = tl.where(e < E, row_end, row0)  # surplus tiles get an empty row range
    return e, row0, row_end


@triton.jit
def _up_swiglu_kernel(x, order, w_gu, h, gu, tile_expert, tile_row, offsets, E, D, F,
                      SAVE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      DOT_T: tl.constexpr, PREC: tl.constexpr, EVEN: tl.constexpr = False):
    """h[m, n] = silu(x[tok_m] . Wg_e[n]) * (x[tok_m] . Wu_e[n]) for sorted rows m of expert e; gu saves (g, u)."""
    e, row0, row_end = _tile(tile_expert, tile_row, offsets, E)
    if row0 >= row_end:
        return
    m = row0 + tl.arange(0, BM)
    mmask = m < row_end
    tok = tl.load(order + m, mask=mmask, other=0).to(tl.int64)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < F
    wb = w_gu + e.to(tl.int64) * (2 * F) * D
    acc_g = tl.zeros([BM, BN], tl.float32)
    acc_u = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < D
        if EVEN:   # D % BK == 0 and F % BN == 0: only the row mask, so loads stay full-width vectors
            a = tl.load(x + tok[:, None] * D + k[None, :], mask=mmask[:, None], other=0.0).to(DOT_T)
            wg = tl.load(wb + n[None, :] * D + k[:, None]).to(DOT_T)
            wu = tl.load(wb + (F + n[None, :]) * D + k[:, None]).to(DOT_T)
        else:
            a = tl.load(x + tok[:, None] * D + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0).to(DOT_T)
            wg = tl.load(wb + n[None, :] * D + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0).to(DOT_T)
            wu = tl.load(wb + (F + n[None, :]) * D + k[:, None], mask=nmask[None, :] & kmask[:, None],
                         other=0.0).to(DOT_T)
        acc_g += tl.dot(a, wg, input_precision=PREC)
        acc_u += tl.dot(a, wu, input_precision=PREC)
    out = acc_g * tl.sigmoid(acc_g) * acc_u
    msk = mmask[:, None] & nmask[None, :]
    tl.store(h + m[:, None] * F + n[None, :], out.to(h.dtype.element_ty), mask=msk)
    if SAVE:
        tl.store(gu + m[:, None] * (2 * F) + n[None, :], acc_g.to(gu.dtype.element_ty), mask=msk)
        tl.store(gu + m[:, None] * (2 * F) + F + n[None, :], acc_u.to(gu.dtype.element_ty), mask=msk)


@triton.jit
def _grouped_mm_kernel(a, w, c, order, gate, aux, tile_expert, tile_row, offsets, E, K, NOUT,
                       swe, swk, swn, EPI: tl.constexpr, SAVE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
                       EVEN: tl.constexpr = False):
    """acc[m, n] = sum_k a[m, k] W_e[k, n] over sorted rows m of expert e (a contiguous [N, K], W_e strided).

    EPI 0 ("down"):       c[tok_m] = gate[tok_m] * acc        (aux = o, the unscaled output, if SAVE)
    EPI 1 ("swiglu_bwd"): acc = dh; aux = gu (g, u) -> c = dgu [N, 2F] = (dh u silu'(g), dh silu(g)); NOUT = F
    EPI 2 ("scatter"):    c[tok_m] = acc
    """
    e, row0, row_end = _tile(tile_expert, tile_row, offsets, E)
    if row0 >= row_end:
        return
    m = row0 + tl.arange(0, BM)
    mmask = m < row_end
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < NOUT
    wb = w + e.to(tl.int64) * swe
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < K
        if EVEN:   # K % BK == 0 and NOUT % BN == 0
            at = tl.load(a + m[:, None].to(tl.int64) * K + k[None, :], mask=mmask[:, None], other=0.0)
            wt = tl.load(wb + k[:, None] * swk + n[None, :] * swn)
        else:
            at = tl.load(a + m[:, None].to(tl.int64) * K + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(wb + k[:, None] * swk + n[None, :] * swn, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.dot(at.to(DOT_T), wt.to(DOT_T), input_precision=PREC)
    msk = mmask[:, None] & nmask[None, :]
    if EPI == 0:
        tok = tl.load(order + m, mask=mmask, other=0).to(tl.int64)
        g = tl.load(gate + tok, mask=mmask, other=0.0).to(tl.float32)
        tl.store(c + tok[:, None] * NOUT + n[None, :], (g[:, None] * acc).to(c.dtype.element_ty), mask=msk)
        if SAVE:
            tl.store(aux + m[:, None] * NOUT + n[None, :], acc.to(aux.dtype.element_ty), mask=msk)
    elif EPI == 1:
        gp = aux + m[:, None].to(tl.int64) * (2 * NOUT) + n[None, :]
        gg = tl.load(gp, mask=msk, other=0.0).to(tl.float32)
        uu = tl.load(gp + NOUT, mask=msk, other=0.0).to(tl.float32)
        sg = tl.sigmoid(gg)
        cp = c + m[:, None].to(tl.int64) * (2 * NOUT) + n[None, :]
        # d silu(g)/dg = sig(g) (1 + g (1 - sig(g)))
        tl.store(cp, (acc * uu * sg * (1.0 + gg * (1.0 - sg))).to(c.dtype.element_ty), mask=msk)
        tl.store(cp + NOUT, (acc * gg * sg).to(c.dtype.element_ty), mask=msk)
    else:
        tok = tl.load(order + m, mask=mmask, other=0).to(tl.int64)
        tl.store(c + tok[:, None] * NOUT + n[None, :], acc.to(c.dtype.element_ty), mask=msk)


@triton.jit
def _wgrad_kernel(p, q, order, dw, offsets, P, Q, GATHER_Q: tl.constexpr,
                  BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """dw[e, i, j] = sum over expert e's sorted rows m of p[m, i] * q[row(m), j]; row(m) = order[m] if GATHER_Q."""
    e = tl.program_id(0)
    i = tl.program_id(1) * BP + tl.arange(0, BP)
    j = tl.program_id(2) * BQ + tl.arange(0, BQ)
    imask, jmask = i < P, j < Q
    lo = tl.load(offsets + e)
    hi = tl.load(offsets + e + 1)
    acc = tl.zeros([BP, BQ], tl.float32)
    for m0 in range(lo, hi, BM):
        m = m0 + tl.arange(0, BM)
        mmask = m < hi
        pt = tl.load(p + m[:, None].to(tl.int64) * P + i[None, :], mask=mmask[:, None] & imask[None, :], other=0.0)
        if GATHER_Q:
            r = tl.load(order + m, mask=mmask, other=0).to(tl.int64)
        else:
            r = m.to(tl.int64)
        qt = tl.load(q + r[:, None] * Q + j[None, :], mask=mmask[:, None] & jmask[None, :], other=0.0)
        acc += tl.dot(tl.trans(pt.to(DOT_T)), qt.to(DOT_T), input_precision=PREC)
    tl.store(dw + e.to(tl.int64) * P * Q + i[:, None] * Q + j[None, :], acc.to(dw.dtype.element_ty),
             mask=imask[:, None] & jmask[None, :])


@triton.jit
def _route_kernel(sorted_key, offsets, tile_expert, tile_row, N, MAX_TILES,
                  E: tl.constexpr, BE: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr):
    """One program builds the routing map from the sorted expert keys (skipped tokens carry key E, sorted last):
    offsets[e] = rows with key < e (e in [0, E]); the row tiles of BM rows listed expert by expert, tile t of expert e
    -> tile_expert[t] = e, tile_row[t] = its first row; surplus tiles get e = E (the GEMMs skip them).
    One launch in place of ~17 small torch ops: at small token counts the MoE is bound by launches, not the GPU."""
    es = tl.arange(0, BE)
    lt = tl.zeros([BE], tl.int32)          # rows with key < e
    eq = tl.zeros([BE], tl.int32)          # rows with key == e
    for r0 in range(0, N, BR):
        r = r0 + tl.arange(0, BR)
        k = tl.load(sorted_key + r, mask=r < N, other=E + 1).to(tl.int32)
        lt += tl.sum((k[None, :] < es[:, None]).to(tl.int32), 1)
        eq += tl.sum((k[None, :] == es[:, None]).to(tl.int32), 1)
    tl.store(offsets + es, lt, mask=es <= E)
    tiles = tl.where(es < E, (eq + BM - 1) // BM, 0)
    tile_end = tl.cumsum(tiles, 0)
    first = tile_end - tiles
    for t0 in range(0, MAX_TILES, BT):
        t = t0 + tl.arange(0, BT)
        ex = tl.sum(((tile_end[None, :] <= t[:, None]) & (es < E)[None, :]).to(tl.int32), 1)   # E: surplus tile
        hit = es[None, :] == ex[:, None]
        row = tl.sum(tl.where(hit, lt[None, :] + (t[:, None] - first[None, :]) * BM, 0), 1)
        tl.store(tile_expert + t, ex, mask=t < MAX_TILES)
        tl.store(tile_row + t, row, mask=t < MAX_TILES)


# ----------------------------------------------------------------------------------------------------------------
# launchers

# Launch settings, filled by benchmarks/tune_kernels.py to try variants ({"gemm": {"BM": 128, ...}, "wgrad": {...}}).
TUNING: dict[str, dict] = {}


def _cfg(kernel: str, N: int, D: int, F: int, dtype=torch.bfloat16) -> dict:
    """Tiles, warps and stages of the grouped GEMMs ("gemm": up/down/dh/dx, one BM for the routing tile map) and of
    the weight-gradient kernel ("wgrad": BP x BQ output tiles, BM rows per step), defaults overridden by TUNING."""
    if INTERPRET:  # few, big programs; still >= 16 everywhere so the shapes are legal on a GPU
        b = min(pow2(max(D, F)), 128)
        cfg = dict(BM=min(pow2(N), 64), BN=b, BK=b, num_warps=4, num_stages=1)
        if kernel == "wgrad":
            cfg = dict(BP=b, BQ=b, BM=cfg["BM"], num_warps=4, num_stages=1)
    elif kernel == "wgrad":
        cfg = dict(BP=128, BQ=128, BM=64, num_warps=4, num_stages=3)   # H100: 2.49 ms fwd+bwd vs 2.83 with 8 warps
    else:
        # H100, bf16, D=F=2048, 8192 tokens (benchmarks/tune_kernels.py): 64x128 tiles with a K step of 64, 8 warps
        # and 4 stages: forward 0.83 ms against 1.34 ms for 128x128x64 with 3 stages in the same run
        cfg = dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=4)
        if dtype == torch.float32:   # fp32 tiles take twice the shared memory: 4 stages exceed the H100's 227 KB
            cfg["num_stages"] = 3
    cfg.update(TUNING.get(kernel, {}))
    return cfg


def _tile_dtype(*tensors) -> torch.dtype:
    """fp32 if any GEMM operand is fp32 (e.g. fp32 master weights under bf16 autocast): its tiles set the shared
    memory a pipeline stage needs."""
    return torch.float32 if any(t.dtype == torch.float32 for t in tensors) else tensors[0].dtype


def _route(expert_idx, E: int, BM: int):
    """Sort order (skipped tokens last; int64), per-expert row offsets [E+1] and the device-side row-tile map.

    Three launches (where, sort, _route_kernel) and no host synchronisation: the old torch version (bincount, cumsum,
    searchsorted, gathers) cost ~17 launches, which dominated the layer below ~4K tokens on an H100."""
    N = expert_idx.shape[0]
    dev = expert_idx.device
    key = torch.where(expert_idx >= 0, expert_idx, E)
    sorted_key, order = torch.sort(key, stable=True)
    max_tiles = triton.cdiv(N, BM) + E                                  # sum_e cdiv(c_e, BM) <= N/BM + E
    offsets = torch.empty(E + 1, device=dev, dtype=torch.int32)
    tile_expert = torch.empty(max_tiles, device=dev, dtype=torch.int32)
    tile_row = torch.empty(max_tiles, device=dev, dtype=torch.int32)
    _route_kernel[(1,)](sorted_key, offsets, tile_expert, tile_row, N, max_tiles, E=E,
                        BE=triton.next_power_of_2(E + 1), BR=min(1024, triton.next_power_of_2(N)),
                        BT=min(512, triton.next_power_of_2(max_tiles)), BM=BM, num_warps=4)
    return order, offsets, tile_expert, tile_row, max_tiles


def moe_fwd(x, expert_idx, gate, w_gu, w_down, save: bool):
    N, D = x.shape
    E, F2, _ = w_gu.shape
    F = F2 // 2
    c = _cfg("gemm", N, D, F, _tile_dtype(x, w_gu, w_down))
    BM, BN, BK = c["BM"], c["BN"], c["BK"]
    DOT_T, PREC = dot_dtype(x.dtype)
    order, offsets, tile_expert, tile_row, max_tiles = _route(expert_idx, E, BM)
    h = torch.empty(N, F, device=x.device, dtype=x.dtype)
    gu = torch.empty(N, 2 * F, device=x.device, dtype=x.dtype) if save else h
    _up_swiglu_kernel[(max_tiles, triton.cdiv(F, BN))](x, order, w_gu, h, gu, tile_expert, tile_row, offsets, E, D, F,
                                                        SAVE=save, BM=BM, BN=BN, BK=BK, DOT_T=DOT_T, PREC=PREC,
                                                        EVEN=D % BK == 0 and F % BN == 0, **launch_opts(c))
    y = torch.zeros(N, D, device=x.device, dtype=x.dtype)   # skipped tokens stay 0
    o = torch.empty(N, D, device=x.device, dtype=x.dtype) if save else y
    # down: W_e[k, n] = down_proj[e, n, k]
    _grouped_mm_kernel[(max_tiles, triton.cdiv(D, BN))](h, w_down, y, order, gate, o, tile_expert, tile_row, offsets,
                                                         E, F, D, w_down.stride(0), 1, F, EPI=0, SAVE=save,
                                                         BM=BM, BN=BN, BK=BK, DOT_T=DOT_T, PREC=PREC, EVEN=F % BK == 0 and D % BN == 0,
                                                         **launch_opts(c))
    route = (order, offsets, tile_expert, tile_row, max_tiles)
    return y, (h, gu, o, route)


def moe_bwd(dy, x, gate, w_gu, w_down, saved):
    h, gu, o, (order, offsets, tile_expert, tile_row, max_tiles) = saved
    N, D = x.shape
    E, F2, _ = w_gu.shape
    F = F2 // 2
    dt = _tile_dtype(x, w_gu, w_down)
    c, cw = _cfg("gemm", N, D, F, dt), _cfg("wgrad", N, D, F, dt)
    BM, BN, BK = c["BM"], c["BN"], c["BK"]
    DOT_T, PREC = dot_dtype(x.dtype)
    dy = dy.contiguous()
    ol = order.long()
    n_routed = offsets[E]
    routed = torch.arange(N, device=x.device) < n_routed               # sorted rows that belong to an expert
    dy_s = dy.index_select(0, ol)                                      # [N, D] in sorted order
    # y = gate * o  ->  dgate = dy . o, do = gate * dy  (skipped tokens: dgate = 0)
    dgate_s = torch.where(routed, (dy_s.float() * o.float()).sum(-1), 0.0)
    dgate = torch.zeros(N, device=x.device, dtype=torch.float32).index_put_((ol,), dgate_s).to(gate.dtype)
    do_s = (dy_s.float() * gate.index_select(0, ol).float()[:, None]).to(x.dtype)
    # dgu = swiglu'(dh), dh = do @ down_e   (W_e[k, n] = down_proj[e, k, n]: k over D, n over F)
    dgu = torch.empty(N, 2 * F, device=x.device, dtype=x.dtype)
    _grouped_mm_kernel[(max_tiles, triton.cdiv(F, BN))](do_s, w_down, dgu, order, gate, gu, tile_expert, tile_row,
                                                         offsets, E, D, F, w_down.stride(0), F, 1, EPI=1, SAVE=False,
                                                         BM=BM, BN=BN, BK=BK, DOT_T=DOT_T, PREC=PREC, EVEN=D % BK == 0 and F % BN == 0,
                                                         **launch_opts(c))
    # dx[tok] = dgu @ gate_up_e   (W_e[k, n] = gate_up_proj[e, k, n]: k over 2F, n over D)
    dx = torch.zeros(N, D, device=x.device, dtype=x.dtype)
    _grouped_mm_kernel[(max_tiles, triton.cdiv(D, BN))](dgu, w_gu, dx, order, gate, dgu, tile_expert, tile_row,
                                                         offsets, E, 2 * F, D, w_gu.stride(0), D, 1, EPI=2, SAVE=False,
                                                         BM=BM, BN=BN, BK=BK, DOT_T=DOT_T, PREC=PREC, EVEN=(2 * F) % BK == 0 and D % BN == 0,
                                                         **launch_opts(c))
    # weight grads, fp32 accumulation: d down_e = do_e^T h_e [D, F]; d gate_up_e = dgu_e^T x_e [2F, D]
    BP, BQ, BMW = cw["BP"], cw["BQ"], cw["BM"]
    d_down = torch.empty(E, D, F, device=x.device, dtype=w_down.dtype)
    _wgrad_kernel[(E, triton.cdiv(D, BP), triton.cdiv(F, BQ))](do_s, h, order, d_down, offsets, D, F, GATHER_Q=False,
                                                                BP=BP, BQ=BQ, BM=BMW, DOT_T=DOT_T, PREC=PREC, **launch_opts(cw))
    d_gu = torch.empty(E, 2 * F, D, device=x.device, dtype=w_gu.dtype)
    _wgrad_kernel[(E, triton.cdiv(2 * F, BP), triton.cdiv(D, BQ))](dgu, x, order, d_gu, offsets, 2 * F, D,
                                                                    GATHER_Q=True, BP=BP, BQ=BQ, BM=BMW,
                                                                    DOT_T=DOT_T, PREC=PREC, **launch_opts(cw))
    return dx, dgate, d_gu, d_down


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_idx, gate, gate_up_proj, down_proj):
        save = any(ctx.needs_input_grad)
        y, saved = moe_fwd(x, expert_idx, gate, gate_up_proj, down_proj, save)
        if save:
            h, gu, o, route = saved
            ctx.save_for_backward(x, gate, gate_up_proj, down_proj, h, gu, o, *route[:4])
            ctx.max_tiles = route[4]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, w_gu, w_down, h, gu, o, order, offsets, tile_expert, tile_row = ctx.saved_tensors
        saved = (h, gu, o, (order, offsets, tile_expert, tile_row, ctx.max_tiles))
        dx, dgate, d_gu, d_down = moe_bwd(dy, x, gate, w_gu, w_down, saved)
        return dx, None, dgate, d_gu, d_down


def moe_experts(x, expert_idx, gate, gate_up_proj, down_proj):
    """Top-1 SwiGLU experts over stacked weights: y_n = gate_n * down_e(silu(Wg_e x_n) * Wu_e x_n), e = expert_idx[n].

    Args:
        x: [N, D] tokens (fp32/fp16/bf16).
        expert_idx: [N] int64 in [0, E), or -1 for a skipped token (its output is 0 and it gets no gradient).
        gate: [N] float router weight (not renormalised, architecture.md §4).
        gate_up_proj: [E, 2F, D] (rows: gate proj first F, then up proj F); down_proj: [E, D, F]. The weights may
            have another float dtype than x (fp32 masters under autocast); the GEMMs run in x's precision.
    Returns:
        y [N, D] in x's dtype. Differentiable in x, gate, gate_up_proj, down_proj.
    Indices >= E or < -1 are not checked on the device (that would need a host sync); the reference raises for them.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"moe_experts: x must be [N, D], got shape {getattr(x, 'shape', None)}")
    N, D = x.shape
    if not isinstance(gate_up_proj, torch.Tensor) or gate_up_proj.dim() != 3 or gate_up_proj.shape[1] % 2:
        raise ValueError(f"moe_experts: gate_up_proj must be [E, 2F, D], got {getattr(gate_up_proj, 'shape', None)}")
    E, F2, _ = gate_up_proj.shape
    F = F2 // 2
    if N < 1 or D < 1 or E < 1 or F < 1:
        raise ValueError(f"moe_experts: empty dimension (x {list(x.shape)}, gate_up_proj {list(gate_up_proj.shape)})")
    check_tensor("x", x, (N, D))
    # weights may be fp32 masters under bf16 autocast: every GEMM operand is cast to x's dot dtype in the kernels
    check_tensor("gate_up_proj", gate_up_proj, (E, 2 * F, D))
    check_tensor("down_proj", down_proj, (E, D, F))
    check_tensor("gate", gate, (N,))
    check_tensor("expert_idx", expert_idx, (N,), dtype=torch.int64)
    return MoEExpertsFunction.apply(x.contiguous(), expert_idx.contiguous(), gate.contiguous(),
                                    gate_up_proj.contiguous(), down_proj.contiguous())

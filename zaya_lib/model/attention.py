"""Compressed Convolutional Attention (CCA / CCGQA) as used in ZAYA1 [TR §II-A, App. C; spec §3].

Shape legend: B batch, T new tokens, S keys (cached + new), Hq query heads, Hk KV heads, G = Hq / Hk,
d head width, C = (Hq + Hk) * d packed q|k channels, R rotary dims (d * partial_rotary_factor).

Notable features:
- One fused projection GEMM for q0 | k0 | v_cur | v_del (four Linears kept as modules so checkpoint keys match HF).
- The causal depthwise and head-wise convolutions run on the packed [q0 | k0] channels, padded once by
  (t0 - 1) + (t1 - 1) zeros (or continued from the decode cache's raw columns), so the intermediate depthwise
  output at a pad position is its bias, exactly as the released model computes it.
- qk-mean skips: q += (q0 + k0_rep) / 2 and k += mean over the G query heads of that, per KV group.
- L2 QK-norm times sqrt(d) with a learned LINEAR per-KV-head key temperature (ZAYA scales by T, not exp(T)).
- Partial NeoX RoPE on the first R dims of every head.
- Values: half the value channels see the current token, half the previous token (one-token time delay);
  the delayed state is W_v2 x_{t-1} (zero before the first token, and zero at pad positions since x is masked).
- Attention runs in the latent with GQA through SDPA (flash / memory-efficient kernels where available), or through
  the Triton kernels of `zaya_kernels` when `config.attn_impl == "triton"`. CPU training at short context takes
  `block_causal_attention` instead: batched GEMMs over query blocks that skip the masked tiles (faster than SDPA's
  CPU flash kernel at head width 32).
- Document masking of packed training windows (`doc`, see `documents.py`): attention within documents (the block
  path skips the tiles no query/key pair of which shares a document; SDPA gets the block-diagonal causal mask; the
  Triton kernels take per-token document starts/positions), and the conv history and delayed value restart at every
  document start.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import ZayaCache
from .documents import DocMask, doc_attn_mask
from .fused_ops import needs_autograd

__all__ = ["CCAProjection", "QKNorm", "CCAttention", "rope_cos_sin", "apply_partial_rope", "qk_norm_rope",
           "block_causal_attention", "use_block_attention", "doc_block_attention", "block_key_starts"]


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype=torch.float32):
    """cos/sin [B, T, R] for NeoX-style RoPE (HF layout: the R//2 frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float64) / rotary_dim))
    freqs = position_ids.to(torch.float64)[..., None] * inv_freq  # [B, T, R/2]; fp64 keeps long positions exact
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of x [B, T, H, d] with cos/sin [B, T, R] (rotate_half convention); pass the rest."""
    R = cos.shape[-1]
    x_rot, x_pass = x[..., :R], x[..., R:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x_rot[..., : R // 2], x_rot[..., R // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * c + rotated * s, x_pass], dim=-1)


def _skip_terms(qk0: torch.Tensor, Hk: int, G: int, d: int):
    """Twice the qk-mean skip terms of the raw packed q|k [B, T, (Hk*G + Hk) * d]: (q0 + k0 per query head
    [B, T, Hk, G, d], its mean over the G query heads of each KV group [B, T, Hk, d]); the callers halve them as they
    add them (one pass fewer than scaling first)."""
    B, T, _ = qk0.shape
    q0 = qk0[..., : Hk * G * d].view(B, T, Hk, G, d)
    k0 = qk0[..., Hk * G * d:].view(B, T, Hk, 1, d)
    qm2 = q0 + k0
    return qm2, qm2.mean(dim=3)


class _ConvPlusSkip(torch.autograd.Function):
    """[B, T, H, d] = conv output [B, C, T] transposed + the qk-mean skips of the raw q|k, as one node.

    The transpose-copy, the skip terms and the sum happen in one output buffer; autograd's version records ~8 nodes
    (copy, add, scale, mean, cat, add) whose backward materialises each intermediate gradient. Backward, with dy split
    into query heads dyq [.., Hk, G, d] and key heads dyk [.., Hk, d]:
      d conv = dy (transposed back);  dq0 = (dyq + dyk / G) / 2;  dk0 = (sum_G dyq + dyk) / 2."""

    @staticmethod
    def forward(ctx, qk_conv_BCT, qk0, Hk: int, G: int, d: int):
        B, C, T = qk_conv_BCT.shape
        H = C // d
        y = qk_conv_BCT.transpose(1, 2).contiguous().view(B, T, H, d)
        qm2, km2 = _skip_terms(qk0, Hk, G, d)
        y[:, :, : Hk * G].view(B, T, Hk, G, d).add_(qm2, alpha=0.5)
        y[:, :, Hk * G:].add_(km2, alpha=0.5)
        ctx.shape = (Hk, G, d)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        Hk, G, d = ctx.shape
        B, T, H, _ = dy.shape
        dy = dy.contiguous()
        dyq = dy[:, :, : Hk * G].view(B, T, Hk, G, d)
        dyk = dy[:, :, Hk * G:]
        dqk0 = dy.new_empty(B, T, H * d)
        dq0 = dqk0[..., : Hk * G * d].view(B, T, Hk, G, d)
        torch.add(dyq, dyk[:, :, :, None], alpha=1.0 / G, out=dq0).mul_(0.5)
        dk0 = dqk0[..., Hk * G * d:].view(B, T, Hk, d)
        torch.add(dyq.sum(dim=3), dyk, out=dk0).mul_(0.5)
        return dy.view(B, T, H * d).transpose(1, 2), dqk0, None, None, None


def conv_plus_skip(qk_conv_BCT: torch.Tensor, qk0: torch.Tensor, Hk: int, G: int, d: int) -> torch.Tensor:
    """Conv output [B, C, T] plus the qk-mean skips of the raw packed q|k [B, T, C] -> [B, T, Hk*G + Hk, d]."""
    if needs_autograd(qk_conv_BCT, qk0):
        return _ConvPlusSkip.apply(qk_conv_BCT, qk0, Hk, G, d)
    B, C, T = qk_conv_BCT.shape
    qm2, km2 = _skip_terms(qk0, Hk, G, d)
    skip2 = torch.cat([qm2.reshape(B, T, Hk * G, d), km2], dim=2)
    return torch.add(qk_conv_BCT.transpose(1, 2).reshape(B, T, C // d, d), skip2, alpha=0.5)


@torch.compiler.disable
def _restart_conv_history(proj: "CCAProjection", out_BCT: torch.Tensor, u_pad: torch.Tensor, pos_BT: torch.Tensor):
    """Document masking of the causal convs, in place on the plain conv output out [B, C, T] (u_pad: the raw
    columns left-padded by P = t0 + t1 - 2). Composed, the two convs are affine in the raw columns, and output t reads
    u[t - P .. t]; it differs from the document alone only where a column lies in an earlier document, i.e. at the
    first P tokens of every document after the first. Those few outputs (~P per document) are recomputed from their
    own window with the earlier documents' columns zeroed, as the zero pad does at t = 0 (`_decode_convolve`, the
    decode step's arithmetic), and written over the plain ones: autograd routes their gradient through the recomputed
    values only. Excluded from torch.compile: how many outputs change depends on the data."""
    P = proj.conv_pad
    start = torch.arange(pos_BT.shape[1], device=pos_BT.device) - pos_BT
    b, t = torch.nonzero((pos_BT < P) & (start > 0), as_tuple=True)
    if b.numel() == 0:
        return
    cols = t[:, None] + torch.arange(P + 1, device=t.device)  # padded index of u[t - P .. t]
    win = u_pad.transpose(1, 2)[b[:, None], cols]  # [n, P + 1, C]
    keep = torch.arange(P + 1, device=t.device) >= (P - pos_BT[b, t])[:, None]  # column lag P - c <= pos
    win = (win * keep[..., None].to(win.dtype)).transpose(1, 2)  # [n, C, P + 1]
    _OverwriteColumns.apply(out_BCT, proj._decode_convolve(win)[..., 0], b, t)


class _OverwriteColumns(torch.autograd.Function):
    """out[b, :, t] = vals in place ([B, C, T] <- [n, C]); backward: vals get those columns of the gradient and out
    the gradient with them zeroed (one copy; autograd's in-place indexing through a transposed view made ~9)."""

    @staticmethod
    def forward(ctx, out, vals, b, t):
        out.transpose(1, 2).index_put_((b, t), vals)
        ctx.mark_dirty(out)
        ctx.save_for_backward(b, t)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        b, t = ctx.saved_tensors
        gv = g.transpose(1, 2)[b, t]
        g = g.clone()
        g.transpose(1, 2)[b, t] = 0
        return g, gv, None, None


class CCAProjection(nn.Module):
    """q/k/v for CCA: fused projection, packed causal convs, qk-mean skips and the delayed value path."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.Hq, self.Hk, self.d = config.num_attention_heads, config.num_key_value_heads, d
        self.G = self.Hq // self.Hk
        self.q_dim, self.k_dim = self.Hq * d, self.Hk * d
        self.v_half = self.k_dim // 2
        self.t0, self.t1 = config.cca_time0, config.cca_time1
        self.conv_pad = (self.t0 - 1) + (self.t1 - 1)  # total causal left-pad, applied once to the raw input
        C = self.q_dim + self.k_dim
        self.q_proj = nn.Linear(D, self.q_dim, bias=False)
        self.k_proj = nn.Linear(D, self.k_dim, bias=False)
        self.v_proj_current = nn.Linear(D, self.v_half, bias=False)
        self.v_proj_delayed = nn.Linear(D, self.v_half, bias=False)
        self.conv_qk_depthwise = nn.Conv1d(C, C, kernel_size=self.t0, groups=C)
        self.conv_qk_grouped = nn.Conv1d(C, C, kernel_size=self.t1, groups=self.Hq + self.Hk)

    def fused_weight(self) -> torch.Tensor:
        """[q_dim + k_dim + 2 * v_half, D]: one GEMM instead of four (autograd splits the gradient back).

        Without autograd (decoding) the concatenation is cached until any of the four weights changes in place. A
        copy made under `torch.inference_mode` is an inference tensor, which autograd may not save: it is reused only
        in inference mode (frozen weights, e.g. under LoRA, are decoded by the engine and then trained)."""
        ws = (self.q_proj.weight, self.k_proj.weight, self.v_proj_current.weight, self.v_proj_delayed.weight)
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
            return torch.cat(ws, 0)
        key = (*((w.data_ptr(), w._version) for w in ws), torch.is_inference_mode_enabled())
        if getattr(self, "_fused_key", None) != key:
            self._fused = torch.cat([w.detach() for w in ws], 0)
            self._fused_key = key
        return self._fused

    def project(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """[B, T, q_dim + k_dim + 2 * v_half]: the four input projections, as one GEMM when all four are plain
        `nn.Linear` layers, else through each module (peft's LoRA wrappers add their adapters in their forward)."""
        mods = (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
        if all(type(m) is nn.Linear for m in mods):
            return F.linear(x_BTD, self.fused_weight())
        return torch.cat([m(x_BTD) for m in mods], dim=-1)

    def convolve(self, qk_BCT: torch.Tensor, conv_state: torch.Tensor | None,
                 doc_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise then head-wise conv over packed [q0|k0] channels. Returns ([B, C, T], new raw state).
        doc_pos: positions within documents [B, T] (document masking, `documents.DocMask`): the history restarts
        at every document start."""
        if doc_pos is not None and conv_state is not None:
            raise ValueError("document masking (doc_ids) cannot continue from a conv state (cache or context "
                             "parallelism)")
        if conv_state is not None:
            u = torch.cat([conv_state.to(qk_BCT.dtype), qk_BCT], dim=-1)
        else:
            u = F.pad(qk_BCT, (self.conv_pad, 0))
        new_state = u[..., u.shape[-1] - self.conv_pad:] if self.conv_pad > 0 else u[..., :0]
        if qk_BCT.shape[-1] == 1 and conv_state is not None and not torch.is_grad_enabled():
            return self._decode_convolve(u), new_state
        out = self.conv_qk_grouped(self.conv_qk_depthwise(u))  # length T + t1 - 1, then T
        if doc_pos is not None:
            _restart_conv_history(self, out, u, doc_pos)
        return out, new_state

    def _decode_convolve(self, u_BCL: torch.Tensor) -> torch.Tensor:
        """The same two convs for ONE new token as a few small tensor ops (a oneDNN conv call on 3 columns costs more
        than the arithmetic). u: [B, C, t0 + t1 - 1] = raw state + the new column -> [B, C, 1]."""
        B, C, _ = u_BCL.shape
        dw, g = self.conv_qk_depthwise, self.conv_qk_grouped
        # depthwise: t1 output columns, each a t0-tap window
        win = u_BCL.unfold(-1, self.t0, 1)  # [B, C, t1, t0]
        mid = (win * dw.weight[:, 0, None, :]).sum(-1) + dw.bias[:, None]  # [B, C, t1]
        # head-wise: per head, a [d_out, d_in * t1] matrix applied to the head's window
        H = self.Hq + self.Hk
        Wg = g.weight.view(H, self.d, self.d * self.t1)  # [H, d_out, d_in * t1] (d_in major, tap minor)
        out = torch.einsum("hoi,bhi->bho", Wg, mid.reshape(B, H, self.d * self.t1)) + g.bias.view(H, self.d)
        return out.reshape(B, C, 1)

    def forward(self, x_BTD: torch.Tensor, cache: ZayaCache | None = None, cp=None, doc: DocMask | None = None):
        """cp: an optional context-parallel exchanger (`zaya_lib.train.context_parallel`): this rank holds a chunk of the
        sequence and receives the previous rank's last raw q|k columns (conv halo) and last delayed value.
        doc: document masking (`documents.DocMask`): conv history and delayed value restart at each document."""
        B, T, _ = x_BTD.shape
        proj = self.project(x_BTD)
        qk0, v_cur, v_del = proj.split([self.q_dim + self.k_dim, self.v_half, self.v_half], dim=-1)

        # (1) causal convs on the packed raw q|k, continued from the cache's last raw columns when decoding
        qk_BCT = qk0.transpose(1, 2)
        if cp is not None:
            conv_state = cp.exchange_conv(self.layer_idx, qk_BCT[..., qk_BCT.shape[-1] - self.conv_pad:])
        else:
            conv_state = cache.get_conv(self.layer_idx) if cache is not None else None
        qk_conv, new_state = self.convolve(qk_BCT, conv_state, doc.position_ids if doc is not None else None)
        if cache is not None:
            cache.set_conv(self.layer_idx, new_state)

        # (2) qk-mean skips: each query head averages with its KV head; keys take the group mean of that.
        # q and k stay packed as heads [Hq | Hk] of one tensor [B, T, Hq + Hk, d] so norm and RoPE run once over both.
        qk = conv_plus_skip(qk_conv, qk0, self.Hk, self.G, self.d)

        # (4) values: current half and one-token-delayed half (state W_v2 x_{t-1}; zero before the first token)
        if cp is not None:
            prev = cp.exchange_vdel(self.layer_idx, v_del[:, -1])
        else:
            prev = cache.get_vdel(self.layer_idx) if cache is not None else None
        if prev is None:
            prev = v_del.new_zeros(B, 1, self.v_half)
        else:
            prev = prev.to(v_del.dtype)[:, None, :]
        v_delayed = torch.cat([prev, v_del[:, :-1]], dim=1)
        if doc is not None:  # zero at every document start, as at t = 0
            v_delayed = v_delayed * doc.cont[..., None].to(v_delayed.dtype)
        if cache is not None:
            cache.set_vdel(self.layer_idx, v_del[:, -1])
        v = torch.cat([v_cur, v_delayed], dim=-1).view(B, T, self.Hk, self.d)
        return qk, v


class QKNorm(nn.Module):
    """q <- sqrt(d) q/||q||, k <- sqrt(d) k/||k|| * temp[g]: logits bounded by sqrt(d)|temp| [TR App. C]."""

    def __init__(self, config):
        super().__init__()
        self.scale = math.sqrt(config.head_dim)
        self.temp = nn.Parameter(torch.full((config.num_key_value_heads,), float(config.temp_init)))

    def forward(self, qk: torch.Tensor, num_q_heads: int) -> torch.Tensor:
        """qk [B, T, Hq + Hk, d] packed (queries first) -> normalised and temperature-scaled, same shape."""
        eps = torch.finfo(qk.dtype).eps
        head_scale = torch.cat([qk.new_full((num_q_heads,), self.scale), self.scale * self.temp.to(qk.dtype)])
        return F.normalize(qk, p=2.0, dim=-1, eps=eps) * head_scale[:, None]


def _swap_rotary_halves(x: torch.Tensor, R: int) -> torch.Tensor:
    """[x2, x1, x_pass] for x = [x1, x2, x_pass] along the last dim (x1, x2 of R/2 each); an involution."""
    h = R // 2
    return torch.cat([x[..., h:R], x[..., :h], x[..., R:]], dim=-1)


class _QKNormRope(torch.autograd.Function):
    """QK-norm, head scale (sqrt(d), times the key temperature on key heads) and partial NeoX RoPE as one autograd
    node with a hand-written backward: the same math as `apply_partial_rope(QKNorm(qk))`, but autograd's version
    records ~15 nodes whose backward allocates zero-filled full-size gradients for every slice of the rotation.

    With yhat = y / max(|y|, eps), z = yhat * c_h and out = z * C + swap(z) * S (C = [cos, 1], S = [-sin, sin, 0]
    over [first half, second half, pass dims]; swap exchanges the two rotary halves and is its own transpose):
      dz = g * C + swap(g * S);  s = <dz, yhat> per row;  dc_h = sum(s);
      dy = c_h (dz - yhat s) / max(|y|, eps)   (the projection term only where |y| > eps)."""

    @staticmethod
    def forward(ctx, qk, temp, scale: float, num_q: int, cos, sin):
        R, d = cos.shape[-1], qk.shape[-1]
        eps = torch.finfo(qk.dtype).eps
        norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True)  # [B, T, H, 1]
        inv = norm.clamp_min(eps).reciprocal()
        yhat = qk * inv
        c_h = torch.cat([qk.new_full((num_q,), scale), scale * temp.to(qk.dtype)])[:, None]  # [H, 1]
        cos, sin = cos.to(qk.dtype), sin.to(qk.dtype)
        pad = qk.new_zeros(*cos.shape[:-1], d - R)
        C = torch.cat([cos, pad + 1], dim=-1)[:, :, None]  # [B, T, 1, d]
        S = torch.cat([-sin[..., : R // 2], sin[..., R // 2:], pad], dim=-1)[:, :, None]
        z = yhat * c_h
        ctx.save_for_backward(yhat, inv, norm > eps, c_h, C, S)
        ctx.R, ctx.num_q, ctx.scale = R, num_q, scale
        return torch.addcmul(z * C, _swap_rotary_halves(z, R), S)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        yhat, inv, live, c_h, C, S = ctx.saved_tensors
        dz = torch.addcmul(_swap_rotary_halves(g * S, ctx.R), g, C)
        # <dyhat, yhat> = c_h <dz, yhat>: one row sum serves both the projection term and the temperature gradient
        s = (dz * yhat).sum(-1, keepdim=True)  # [B, T, H, 1]
        dtemp = None
        if ctx.needs_input_grad[1]:
            dtemp = ctx.scale * s[:, :, ctx.num_q:, 0].sum(dim=(0, 1))
        dqk = torch.addcmul(dz, yhat, s.mul_(live), value=-1.0).mul_(inv * c_h)
        return dqk, dtemp, None, None, None, None


def qk_norm_rope(qk: torch.Tensor, qk_norm: QKNorm, num_q_heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """`apply_partial_rope(qk_norm(qk, num_q_heads), cos, sin)` for packed qk [B, T, Hq + Hk, d], as one node."""
    return _QKNormRope.apply(qk, qk_norm.temp, qk_norm.scale, num_q_heads, cos, sin)


# Query rows per block of `block_causal_attention` (32 beat 16, 48, 64 and 128 at T = 256 here), and the most bytes
# of attention probabilities one layer may keep for its backward on that path (above it, SDPA's flash kernel, which
# keeps none).
BLOCK_ROWS = 32
BLOCK_ATTN_MAX_BYTES = 64 << 20


class _BlockCausalAttention(torch.autograd.Function):
    """Causal GQA attention as batched GEMMs over blocks of query rows, for CPU training at short context.

    Query block i (rows [s, e)) scores against keys [0, e) only, with the causal mask applied to its diagonal tile:
    with nb blocks of 32 rows, (nb + 1) / (2 nb) of the full T x T scores are computed and stored, and the G query
    heads of a KV head run as one GEMM of G * (e - s) rows. On a 2-core CPU at T = 256, d = 32 this is ~15% faster
    than SDPA's CPU flash kernel forward + backward (~13 vs ~16 ms per layer in `benchmarks/bench_model.py`'s
    shape); the price is keeping the probabilities for the backward, which `use_block_attention` bounds.

    Backward per block, with P the probabilities, dO the block's output gradient and delta = rowsum(dO * O):
      dV[:e] += P^T dO;  dS = P * (dO V[:e]^T - delta);  dQ = scale * dS K[:e];  dK[:e] += dS^T (scale * Q).

    Document masking (`doc_start` [B, T], the first position of each query's document; `key_lo` per block): block i
    scores against keys [key_lo[i], e) only, where key_lo[i] <= every row's document start (the smallest over the
    batch of its first row's), so the tiles where no query/key pair shares a document are skipped; inside, keys
    before the query's document start are masked too. The formulas are unchanged (masked entries have P = 0)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, doc_start=None, key_lo=None):
        B, Hq, T, d = q.shape
        Hk = k.shape[1]
        G = Hq // Hk
        qt = q.transpose(1, 2)  # [B, T, Hq, d]: a view of the packed q|k in the model
        k, v = k.contiguous(), v.contiguous()  # else every block's matmul would copy its key/value prefix
        out = q.new_empty(B, T, Hk, G, d)  # [B, T, Hq, d] memory: o_proj's input layout, no copy after
        bounds = list(range(0, T, BLOCK_ROWS)) + [T]
        lows = key_lo if doc_start is not None else [0] * (len(bounds) - 1)
        saved = []
        for s, e, lo in zip(bounds[:-1], bounds[1:], lows):
            n = e - s
            qb = q.new_empty(B, Hk, G, n, d)  # the block's queries, GQA-grouped and pre-scaled (in cache)
            qb.copy_(qt[:, s:e].unflatten(2, (Hk, G)).permute(0, 2, 3, 1, 4)).mul_(scale)
            qb = qb.view(B, Hk, G * n, d)
            S = torch.matmul(qb, k[:, :, lo:e].transpose(-1, -2))  # [B, Hk, G*n, e - lo]
            if doc_start is None:
                diag = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
                S.view(B, Hk, G, n, e - lo)[..., s:].masked_fill_(diag, float("-inf"))
            else:  # causal and within the query's document: start(i) <= j <= i
                kj = torch.arange(lo, e, device=q.device)
                qi = torch.arange(s, e, device=q.device)[:, None]
                hide = (kj > qi) | (kj < doc_start[:, s:e, None])  # [B, n, e - lo]
                S.view(B, Hk, G, n, e - lo).masked_fill_(hide[:, None, None], float("-inf"))
            P = torch.softmax(S, dim=-1)
            Ob = torch.matmul(P, v[:, :, lo:e])  # [B, Hk, G*n, d]
            out[:, s:e] = Ob.view(B, Hk, G, n, d).permute(0, 3, 1, 2, 4)
            saved += [qb, P, Ob]
        ctx.save_for_backward(k, v, *saved)
        ctx.scale, ctx.bounds, ctx.lows = scale, bounds, lows
        return out.view(B, T, Hq, d).transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gO):
        k, v, *saved = ctx.saved_tensors
        B, Hk, T, d = k.shape
        Hq = gO.shape[1]
        G = Hq // Hk
        g5 = gO.transpose(1, 2).reshape(B, T, Hk, G, d)  # a view when gO comes from o_proj ([B, T, Hq, d] memory)
        dq = k.new_empty(B, T, Hk, G, d)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        bounds = ctx.bounds
        for i, (s, e, lo) in enumerate(zip(bounds[:-1], bounds[1:], ctx.lows)):
            n = e - s
            qb, P, Ob = saved[3 * i: 3 * i + 3]
            gb = g5[:, s:e].permute(0, 2, 3, 1, 4).reshape(B, Hk, G * n, d)
            delta = (gb * Ob).sum(-1, keepdim=True)
            dv[:, :, lo:e] += torch.matmul(P.transpose(-1, -2), gb)
            dS = torch.matmul(gb, v[:, :, lo:e].transpose(-1, -2)).sub_(delta).mul_(P)  # masked entries: P = 0
            dq[:, s:e] = torch.matmul(dS, k[:, :, lo:e]).view(B, Hk, G, n, d).permute(0, 3, 1, 2, 4)
            dk[:, :, lo:e] += torch.matmul(dS.transpose(-1, -2), qb)
        return dq.view(B, T, Hq, d).transpose(1, 2).mul_(ctx.scale), dk, dv, None, None, None


def _block_path_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and needs_autograd(q, k)


def use_block_attention(q: torch.Tensor, k: torch.Tensor, key_lo: list[int] | None = None) -> bool:
    """The block path pays on CPU, in fp32/fp64, when training (autograd on; compiled or not), and when the kept
    probabilities fit BLOCK_ATTN_MAX_BYTES; SDPA otherwise. key_lo: the first key of each query block (document
    masking), else 0."""
    if not _block_path_applies(q, k):
        return False
    B, Hq, T, _ = q.shape
    if key_lo is None:
        nb = -(-T // BLOCK_ROWS)
        rows = min(T, BLOCK_ROWS)
        keys = rows * nb * (nb + 1) // 2  # sum over blocks of keys so far
    else:
        keys = sum(min(s + BLOCK_ROWS, T) - lo for s, lo in zip(range(0, T, BLOCK_ROWS), key_lo))
    kept = B * Hq * min(T, BLOCK_ROWS) * keys * q.element_size()
    return kept <= BLOCK_ATTN_MAX_BYTES


def block_causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal) v for q [B, Hq, T, d] and k, v [B, Hk, T, d] (GQA); see _BlockCausalAttention."""
    return _BlockCausalAttention.apply(q, k, v, scale)


def block_key_starts(doc_start: torch.Tensor) -> list[int]:
    """First key each `BLOCK_ROWS` query block needs under document masking: the smallest document start of the
    block's first row over the batch (starts never decrease along a row). One host sync."""
    return doc_start[:, ::BLOCK_ROWS].amin(dim=0).tolist()


@torch.compiler.disable
def doc_block_attention(q, k, v, scale: float, doc_start: torch.Tensor) -> torch.Tensor:
    """Causal attention kept within documents (q [B, Hq, T, d], k, v [B, Hk, T, d]; doc_start [B, T], see
    `documents.DocMask`) for CPU training: the block path skipping the cross-document tiles when its kept
    probabilities fit BLOCK_ATTN_MAX_BYTES, else SDPA with the block-diagonal causal mask. Excluded from
    torch.compile: which tiles run depends on the data (compiled, the graph breaks around it)."""
    lo = block_key_starts(doc_start)
    if use_block_attention(q, k, lo):
        return _BlockCausalAttention.apply(q, k, v, scale, doc_start, lo)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=doc_attn_mask(doc_start), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class CCAttention(nn.Module):
    """The full CCA layer: projection, QK-norm, partial RoPE, latent GQA attention, output projection."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.Hq, self.Hk, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scaling = config.head_dim ** -0.5
        self.qkv_proj = CCAProjection(config, layer_idx)
        self.qk_norm = QKNorm(config)
        self.o_proj = nn.Linear(self.Hq * self.d, config.hidden_size, bias=False)

    def forward(self, x_BTD, cos, sin, attn_mask=None, cache: ZayaCache | None = None, cp=None,
                doc: DocMask | None = None):
        """attn_mask: None (plain causal over the new tokens, no cache) or a bool [B, 1, T, S] (True = attend).
        cp: context parallelism; K/V are all-gathered in compressed form and the causal mask is offset by cp.
        doc: document masking of packed windows (`documents.DocMask`; no attn_mask, cache or cp with it)."""
        B, T, _ = x_BTD.shape
        use_triton = self.config.attn_impl == "triton" and cp is None
        if doc is not None:
            if attn_mask is not None or cache is not None or cp is not None:
                raise ValueError("document masking (doc_ids) excludes attention_mask padding, a cache and context "
                                 "parallelism")
            if use_triton:
                from zaya_kernels import latent_attention

                q, k, v = self._triton_qkv(x_BTD, cos, sin, doc)
                out = latent_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scaling,
                                       doc_start=doc.start)
            else:
                q, k, v = self._qkv(x_BTD, cos, sin, None, None, doc)
                if _block_path_applies(q, k):
                    out = doc_block_attention(q, k, v, self.scaling, doc.start)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=doc.attn_mask(), scale=self.scaling,
                                                         enable_gqa=self.Hq != self.Hk)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.Hq * self.d))
        if cp is not None:
            q, k, v = self._qkv(x_BTD, cos, sin, None, cp)
            k, v = cp.gather_kv(self.layer_idx, k, v)  # [B, Hk, S_total, d]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cp.attn_mask(T, k.shape[2], q.device),
                                                 scale=self.scaling, enable_gqa=self.Hq != self.Hk)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, self.Hq * self.d))
        if use_triton and cache is None:
            q, k, v = self._triton_qkv(x_BTD, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = self._qkv(x_BTD, cos, sin, cache, None)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        if use_triton and attn_mask is None and cache is None:
            from zaya_kernels import latent_attention

            out = latent_attention(q, k, v, self.scaling)
        elif attn_mask is None and cache is None and use_block_attention(q, k):
            out = block_causal_attention(q, k, v, self.scaling)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and k.shape[2] == T,
                scale=self.scaling, enable_gqa=self.Hq != self.Hk,
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.Hq * self.d))

    def _qkv(self, x_BTD, cos, sin, cache, cp, doc=None):
        """Eager path: q [B, Hq, T, d], k and v [B, Hk, T, d] (post norm, temperature and RoPE)."""
        qk, v = self.qkv_proj(x_BTD, cache, cp, doc)
        qk = qk_norm_rope(qk, self.qk_norm, self.Hq, cos, sin).transpose(1, 2)
        q, k = qk.split([self.Hq, self.Hk], dim=1)
        return q, k, v.transpose(1, 2)

    def _triton_qkv(self, x_BTD, cos, sin, doc: DocMask | None = None):
        """The fused Triton path: one kernel for convs + qk-mean + QK-norm + temperature + RoPE."""
        from zaya_kernels import cca_qk_prep

        p = self.qkv_proj
        proj = p.project(x_BTD)
        qk, v_cur, v_del = proj.split([p.q_dim + p.k_dim, p.v_half, p.v_half], dim=-1)
        q, k = cca_qk_prep(qk, p.conv_qk_depthwise.weight, p.conv_qk_depthwise.bias, p.conv_qk_grouped.weight,
                           p.conv_qk_grouped.bias, self.qk_norm.temp, cos, sin, self.Hq, self.Hk, self.d,
                           **({"doc_pos": doc.position_ids} if doc is not None else {}))
        v_delayed = F.pad(v_del, (0, 0, 1, 0))[:, :-1]
        if doc is not None:
            v_delayed = v_delayed * doc.cont[..., None].to(v_delayed.dtype)
        v = torch.cat([v_cur, v_delayed], dim=-1).view(*x_BTD.shape[:2], self.Hk, self.d)
        return q, k, v

"""The engine's single-token decode step for `ZayaForCausalLM`: the same math as `model(input_ids=tok[:, None], ...)`
with a `ZayaCache`, in far fewer tensor ops (issue 7, engine speed).

Shape legend: B rows in flight, D hidden, C = (Hq + Hk) * d packed q|k channels, H = Hq + Hk heads, P = conv state
columns ((cca_time0 - 1) + (cca_time1 - 1)), S cache capacity, R rotary dims, E experts, F expert width.

At decode sizes the step is bound by per-op overhead, not arithmetic (~50 small ops per layer here against
several hundred through the modules), so constants are folded into small weights ONCE per set of weights:
- input RMSNorm weight into the fused q|k|v projection;
- the two causal convs for the NEWEST column, plus the qk-mean skips (both linear in the raw q0|k0 of this token),
  into extra rows of that projection, so `qk = proj_new + conv over the P cached raw columns` (one batched matmul
  over heads); the convs' biases into the projection's bias;
- the post-attention residual scale into o_proj, and the residual bias terms into one per-channel constant;
- the attention scale d^-1/2 into the query heads' QK-norm scale.
Expert weights (the bulk of the model) and the tied head are used as they are: nothing large is copied.
Per generate call: RoPE cos/sin for every position and the additive pad mask for the whole run, sliced per step.
Experts: one host read of the B choices, tokens grouped by expert in Python, one product pair per chosen expert
(`_expert_matmul`), the gate and the post-MoE residual scale applied on the way back with one `index_add_` into
the residual. With `compile=True` (the `Engine` default) the whole MoE block runs through torch.compile as
`moe_gathered`: each row's expert weights indexed inside one generated loop, no sort and no host sync; this is what pays most here,
because the step is dominated by streaming the chosen experts' weights (MKL's GEMV reads a cold 512 KB expert at
~8 GB/s, the generated loop ~2x faster). Compiled once per process (dynamic row count), ~5-15 s.

The cache stays in `ZayaCache`'s own layout (raw conv columns, delayed value, K/V written in place, lengths
advanced), so decode steps here and plain model forwards can be mixed; `tests/test_engine.py` checks logits against
the model's cached forward (1e-5) and greedy tokens against uncached full forwards. Forward hooks on `lm_head` still
run (the head is called as a module); a model with hooks anywhere else, non-fp32 weights, the Triton backends, or
a subclass is not handled here (`FastDecoder.supports`), and the engine then uses the plain forward.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from zaya_lib.model.attention import rope_cos_sin
from zaya_lib.model.cache import ZayaCache

__all__ = ["FastDecoder", "DecodeRun", "route", "moe_gathered"]


def _conv_taps(p) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise (t0 taps) then head-wise (t1 taps) causal convs of `CCAProjection` as ONE linear map of the raw
    window u [C, L] (L = t0 + t1 - 1 columns, oldest first) per head: out[h, o] = sum_{i, c} M[h, o, i, c] u[h, i, c]
    + b[h, o]. Returns M [H, d, d, L] and b [C]."""
    dw = p.conv_qk_depthwise.weight[:, 0].double()  # [C, t0]
    db = p.conv_qk_depthwise.bias.double()  # [C]
    H, d, t0, t1 = p.Hq + p.Hk, p.d, p.t0, p.t1
    gw = p.conv_qk_grouped.weight.double().view(H, d, d, t1)  # [H, d_out, d_in, t1]
    gb = p.conv_qk_grouped.bias.double()
    L = t0 + t1 - 1
    M = gw.new_zeros(H, d, d, L)
    dwh = dw.view(H, d, t0)  # per input channel i of head h
    for j in range(t1):
        for k in range(t0):  # mid[i, j] = sum_k dw[i, k] u[i, j + k] + db[i]
            M[..., j + k] += gw[..., j] * dwh[:, None, :, k]
    b = (gw.sum(-1) * db.view(H, 1, d)).sum(-1).reshape(-1) + gb
    return M, b


class _Layer:
    """Folded decode weights of one decoder layer (fp32). Large tensors are views of the model's own weights."""

    def __init__(self, layer, cfg):
        attn, p = layer.self_attn, layer.self_attn.qkv_proj
        Hq, Hk, d, G = p.Hq, p.Hk, p.d, p.G
        H, C, vh, P = Hq + Hk, p.q_dim + p.k_dim, p.v_half, p.conv_pad
        self.Hq, self.Hk, self.H, self.d, self.G, self.C, self.vh, self.P = Hq, Hk, H, d, G, C, vh, P
        self.idx = p.layer_idx
        f64 = torch.float64
        ln1 = layer.input_layernorm.weight.double()
        Wf = torch.cat([w.detach().double() for w in (p.q_proj.weight, p.k_proj.weight, p.v_proj_current.weight,
                                                      p.v_proj_delayed.weight)]) * ln1  # [C + 2 vh, D]: q0|k0|v_cur|v_del
        M, bconv = _conv_taps(p)  # [H, d, d, L], [C]
        # qk-mean skips as a [C, C] map of the raw q0|k0 column: q_(j,g) += (q0_(j,g) + k0_j) / 2, k_j += mean_g of that
        dev = Wf.device
        skip = torch.zeros(C, C, dtype=f64, device=dev)
        eye = torch.eye(d, dtype=f64, device=dev)
        for j in range(Hk):
            kc = slice(p.q_dim + j * d, p.q_dim + (j + 1) * d)
            for g in range(G):
                qc = slice((j * G + g) * d, (j * G + g + 1) * d)
                skip[qc, qc] += 0.5 * eye
                skip[qc, kc] += 0.5 * eye
                skip[kc, qc] += 0.5 / G * eye
            skip[kc, kc] += 0.5 * eye
        newest = torch.block_diag(*M[..., -1].unbind(0)) + skip  # [C, C] on this token's raw column
        W_new = newest @ Wf[:C]  # [C, D]: the new token's whole contribution to pre-norm q|k
        # projection rows: raw q0|k0 (the conv state) | v_cur | v_del | pre-norm q|k minus the older columns' conv
        self.W_projT = torch.cat([Wf, W_new], 0).float().t().contiguous()  # [D, 2C + 2vh]
        self.b_proj = torch.cat([bconv.new_zeros(C + 2 * vh), bconv]).float()
        # older columns: [H, d_in * P, d_out] with d_in major, column minor (the state's [B, H, d, P] memory order)
        self.M_old = M[..., :P].permute(0, 2, 3, 1).reshape(H, d * P, d).float().contiguous()
        # QK-norm: q, k <- x / ||x|| * scale; queries also carry the attention scale d^-1/2
        temp = attn.qk_norm.temp.double()
        s = attn.qk_norm.scale
        self.head_scale = torch.cat([temp.new_full((Hq,), s * attn.scaling), s * temp]).float().view(1, H, 1)
        self.eps = torch.finfo(torch.float32).eps
        rs = layer.post_attention_residual_scale
        self.Wo_T = (attn.o_proj.weight.double() * rs.hidden_states_scale.double()[:, None]).float().t().contiguous()
        self.rs1 = rs.residual_scale.detach()
        self.c1 = (rs.hidden_states_bias.double() * rs.hidden_states_scale.double()
                   + rs.residual_bias.double() * rs.residual_scale.double()).float()
        self.ln2 = layer.post_attention_layernorm.weight.detach()
        self.eps_rms = layer.input_layernorm.eps
        router = layer.mlp.gate
        self.use_eda = router.use_eda
        self.Wd_T = router.down_proj.weight.detach().t()
        self.bd = router.down_proj.bias.detach()
        self.gamma = router.router_states_scale.detach() if router.use_eda else None
        mlp = router.router_mlp
        self.rn_w, self.rn_eps = mlp.norm.weight.detach(), mlp.norm.eps
        self.W1_T, self.b1 = mlp.fc1.weight.detach().t(), mlp.fc1.bias.detach()
        self.W2_T, self.b2 = mlp.fc2.weight.detach().t(), mlp.fc2.bias.detach()
        self.Wr_T = mlp.out_proj.weight.detach().t()
        self.bias_bal = router.balancing_biases
        ex = layer.mlp.experts
        self.E, self.Fw = ex.E, ex.down_proj.shape[-1]
        self.gate_up, self.down = ex.gate_up_proj.detach(), ex.down_proj.detach()  # [E, 2F, D], [E, D, F]
        self.gate_up_T = [w.t() for w in ex.gate_up_proj.detach().unbind(0)]  # views: [D, 2F] each
        self.down_T = [w.t() for w in ex.down_proj.detach().unbind(0)]  # views: [F, D] each
        rs2 = layer.post_mlp_residual_scale
        self.rs2, self.hs2 = rs2.residual_scale.detach(), rs2.hidden_states_scale.detach()
        self.c2 = (rs2.hidden_states_bias.double() * rs2.hidden_states_scale.double()
                   + rs2.residual_bias.double() * rs2.residual_scale.double()).float()


_COMPILED_MOE = None
_SCRATCH_BYTES = 3 << 19  # 1.5 MiB: per-core L2 sized (3 bench experts' gate|up); larger products use the GEMM


def _compiled_moe():
    """`moe_gathered` through torch.compile (inductor), once per process; dynamic in the number of rows."""
    global _COMPILED_MOE
    if _COMPILED_MOE is None:
        _COMPILED_MOE = torch.compile(moe_gathered, dynamic=True)
    return _COMPILED_MOE


class FastDecoder:
    """Folded weights of a `ZayaForCausalLM` for single-token decoding; `start()` one per batch of rows."""

    def __init__(self, model, compile: bool = False):
        self.compiled_moe = _compiled_moe() if compile else None
        with torch.no_grad():
            self.model = model
            cfg = model.config
            self.cfg = cfg
            self.key = self._key(model)
            self.layers = [_Layer(layer, cfg) for layer in model.model.layers]
            m = model.model
            self.embed = m.embed_tokens.weight.detach()
            self.in_scale = m.input_hidden_states_scale.detach()
            self.in_bias_scaled = (m.input_hidden_states_bias * m.input_hidden_states_scale).detach()
            self.norm_w, self.norm_eps = m.norm.weight.detach(), m.norm.eps
            self.R, self.theta = cfg.rotary_dim, cfg.rope_theta

    @staticmethod
    def _key(model) -> tuple:
        """Changes when any weight is replaced or modified in place (or the RoPE base changes)."""
        return (float(model.config.rope_theta),) + tuple((p.data_ptr(), p._version) for p in model.parameters()) + \
            tuple((b.data_ptr(), b._version) for b in model.buffers())

    def stale(self) -> bool:
        return self._key(self.model) != self.key

    @staticmethod
    def supports(model) -> bool:
        """Plain fp32 `ZayaForCausalLM` with eager attention/MoE and no hooks other than on `lm_head`."""
        from zaya_lib.model.modeling import ZayaForCausalLM

        if type(model) is not ZayaForCausalLM:
            return False
        cfg = model.config
        if getattr(cfg, "attn_impl", "eager") != "eager" or getattr(cfg, "moe_impl", "eager") != "eager":
            return False
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return False
        for mod in model.model.modules():
            if mod._forward_hooks or mod._forward_pre_hooks:
                return False
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return False
        return True

    def start(self, cache: ZayaCache, mask_BS: torch.Tensor, pos_B: torch.Tensor) -> "DecodeRun":
        """A run over `cache` (already holding the prefill). mask_BS [B, S] (1 = real token) covers the cache's whole
        capacity; pos_B [B] is each row's position of its first generated token (its real prompt length)."""
        return DecodeRun(self, cache, mask_BS, pos_B)


class DecodeRun:
    """Per-batch state: the additive key mask for the whole run, RoPE tables, and positions; `reorder` with the
    cache when rows leave."""

    def __init__(self, dec: FastDecoder, cache: ZayaCache, mask_BS: torch.Tensor, pos_B: torch.Tensor):
        self.dec, self.cache = dec, cache
        B, S = mask_BS.shape
        dev = mask_BS.device
        self.add_mask = torch.zeros(B, 1, 1, S, device=dev).masked_fill_((mask_BS == 0)[:, None, None, :],
                                                                         float("-inf"))
        n_pos = int(pos_B.max()) + S  # enough for every step of every row
        cos, sin = rope_cos_sin(torch.arange(n_pos, device=dev)[None], dec.R, dec.theta, dtype=torch.float32)
        cos, sin = cos[0], sin[0]
        half = dec.R // 2
        sign = torch.cat([-torch.ones(half, device=dev), torch.ones(half, device=dev)])
        self.rope = torch.cat([cos, sin * sign], -1).contiguous()  # [n_pos, 2R]: cos | sign * sin
        self.pos_B = pos_B.clone()
        self.scratch = torch.empty(_SCRATCH_BYTES // 4, device=dev)  # see `_expert_matmul`

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep rows `keep` of the run's own state (the caller reorders the cache)."""
        self.add_mask = self.add_mask.index_select(0, keep)
        self.pos_B = self.pos_B.index_select(0, keep)

    @torch.inference_mode()
    def step(self, tok_B: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (at position pos_B, then advance it); returns next-token logits [B, V]."""
        dec, cache = self.dec, self.cache
        B = tok_B.shape[0]
        n = cache.lengths[0] + 1  # keys after this token (padding included)
        R = dec.R
        cs = self.rope.index_select(0, self.pos_B)[:, None, :]  # [B, 1, 2R]
        cos, sin = cs[..., :R], cs[..., R:]
        self.pos_B += 1
        mask = self.add_mask[..., :n]
        x = torch.addcmul(dec.in_bias_scaled, F.embedding(tok_B, dec.embed), dec.in_scale)  # [B, D] fp32
        r = None
        moe = dec.compiled_moe
        for L in dec.layers:
            x = self._attn(L, x, cos, sin, mask, n, B)
            if moe is not None:
                try:
                    x, r = moe(x, r if L.use_eda else None, L.ln2, L.Wd_T, L.bd, L.gamma, L.rn_w, L.W1_T, L.b1,
                               L.W2_T, L.b2, L.Wr_T, L.bias_bal, L.gate_up, L.down, L.rs2, L.hs2, L.c2, L.eps_rms,
                               L.rn_eps)
                    continue
                except Exception as e:  # no C++ toolchain, an inductor bug: stay correct on the eager path
                    warnings.warn(f"compiled decode MoE failed ({type(e).__name__}: {e}); using the eager path")
                    dec.compiled_moe = moe = None
            x, r = self._moe(L, x, r)
        h = F.rms_norm(x, (x.shape[-1],), weight=dec.norm_w, eps=dec.norm_eps)
        return dec.model.lm_head(h)

    def _attn(self, L: _Layer, x, cos, sin, mask, n, B):
        cache, i = self.cache, L.idx
        H, d, C, vh = L.H, L.d, L.C, L.vh
        # --- CCA: one projection for raw q0|k0, values and the newest column's conv + skips ------------------------
        hn = F.rms_norm(x, (x.shape[-1],), eps=L.eps_rms)
        proj = torch.addmm(L.b_proj, hn, L.W_projT)  # [B, 2C + 2vh]
        raw, v_cur, v_del, qk_new = proj.split([C, vh, vh, C], dim=-1)
        state = cache.conv[i]  # [B, C, P] raw columns of the previous tokens (fp32)
        qk = torch.baddbmm(qk_new.view(B, H, d).transpose(0, 1), state.reshape(B, H, d * L.P).transpose(0, 1),
                           L.M_old)  # [H, B, d]
        cache.conv[i] = torch.cat([state[..., 1:], raw[..., None]], dim=-1)
        # QK-norm (x / max(||x||, eps) * scale) into [B, H, d], then partial NeoX RoPE in place on the first R dims
        scale = L.head_scale.transpose(0, 1) / torch.linalg.vector_norm(qk, dim=-1, keepdim=True).clamp_min_(L.eps)
        qkn = torch.empty(B, H, d, device=x.device)
        torch.mul(qk, scale, out=qkn.transpose(0, 1))
        rot = qkn[..., :cos.shape[-1]]
        torch.addcmul(rot * cos, rot.roll(cos.shape[-1] // 2, -1), sin, out=rot)
        # values: current half | previous token's delayed half; K/V written in place at column n - 1
        prev = cache.vdel[i]
        v = torch.cat([v_cur, prev], dim=-1).view(B, L.Hk, d)
        cache.vdel[i] = v_del
        K, V = cache.k[i], cache.v[i]
        K[:, :, n - 1].copy_(qkn[:, L.Hq:])
        V[:, :, n - 1].copy_(v)
        cache.lengths[i] = n
        # --- latent GQA attention of one query per row over n keys -----------------------------------------------
        q = qkn[:, :L.Hq].view(B, L.Hk, L.G, d)
        s = torch.matmul(q, K[:, :, :n].transpose(-1, -2)).add_(mask)  # [B, Hk, G, n]
        o = torch.matmul(s.softmax(dim=-1), V[:, :, :n]).view(B, L.Hq * d)
        x = torch.addmm(torch.addcmul(L.c1, x, L.rs1), o, L.Wo_T)
        return x

    def _expert_matmul(self, W, W_T, x, out):
        """out [c, N] = x [c, K] @ W [N, K]^T for the c rows routed to one expert. MKL's GEMM/GEMV for c of 1-3 rows
        streams a cold weight at ~8 GB/s here (a bench expert: ~65 us per 512 KB); a product into a reused
        cache-sized buffer plus a row sum reads it ~1.6x faster (~40 us), so that is used while the c copies fit."""
        c = x.shape[0]
        if c * W.numel() <= self.scratch.numel():
            tmp = self.scratch[:c * W.numel()].view(c, *W.shape)
            torch.sum(torch.mul(W, x[:, None, :], out=tmp), dim=-1, out=out)
        else:
            torch.mm(x, W_T, out=out)

    def _moe(self, L: _Layer, x, r_prev):
        """Router MLP, top-1, experts grouped by choice (one GEMM pair per chosen expert)."""
        hm, r, probs, choice = route(x, r_prev if L.use_eda else None, L.ln2, L.Wd_T, L.bd, L.gamma, L.rn_w, L.W1_T,
                                     L.b1, L.W2_T, L.b2, L.Wr_T, L.bias_bal, L.eps_rms, L.rn_eps)
        out = torch.addcmul(L.c2, x, L.rs2)  # residual part of the post-MoE residual scaling
        ch = choice.tolist()  # the one host read of the step's routing
        groups: dict[int, list[int]] = {}
        for t, e in enumerate(ch):
            if e < L.E:
                groups.setdefault(e, []).append(t)
        if groups:
            experts = sorted(groups)
            order = [t for e in experts for t in groups[e]]
            counts = [len(groups[e]) for e in experts]
            idx = torch.tensor(order, device=x.device)
            xs = hm.index_select(0, idx)
            Fw = L.Fw
            hbuf = xs.new_empty(len(order), 2 * Fw)
            for e, xe, he in zip(experts, xs.split(counts), hbuf.split(counts)):
                self._expert_matmul(L.gate_up[e], L.gate_up_T[e], xe, he)
            zz = F.silu(hbuf[:, :Fw]).mul_(hbuf[:, Fw:])
            ys = xs.new_empty(len(order), x.shape[-1])
            for e, ze, ye in zip(experts, zz.split(counts), ys.split(counts)):
                self._expert_matmul(L.down[e], L.down_T[e], ze, ye)
            g = probs.gather(1, choice[:, None]).index_select(0, idx)  # [n, 1] unnormalised gate
            out.index_add_(0, idx, ys.mul_(g).mul_(L.hs2))
        return out, r


def route(x, r_prev, ln2, Wd_T, bd, gamma, rn_w, W1_T, b1, W2_T, b2, Wr_T, bias_bal, eps: float, rn_eps: float):
    """The decode router, shared by the eager MoE and `moe_gathered` (traced by torch.compile there): post-attention
    RMSNorm, down-projection with EDA (r_prev None: no EDA), router MLP, softmax over E + 1, top-1 on the
    bias-adjusted probabilities. Returns (normed input hm, router state r, probs [B, E + 1], choice [B])."""
    hm = F.rms_norm(x, (x.shape[-1],), weight=ln2, eps=eps)
    if r_prev is not None:
        r = torch.addmm(torch.addcmul(bd, r_prev, gamma), hm, Wd_T)
    else:
        r = torch.addmm(bd, hm, Wd_T)
    z = F.rms_norm(r, (r.shape[-1],), weight=rn_w, eps=rn_eps)
    z = F.gelu(torch.addmm(b1, z, W1_T))
    z = F.gelu(torch.addmm(b2, z, W2_T))
    probs = torch.softmax(z @ Wr_T, dim=-1)  # [B, E + 1]
    choice = (probs + bias_bal).argmax(dim=-1)
    return hm, r, probs, choice


def moe_gathered(x, r_prev, ln2, Wd_T, bd, gamma, rn_w, W1_T, b1, W2_T, b2, Wr_T, bias_bal, gate_up, down, rs2, hs2,
                 c2, eps: float, rn_eps: float):
    """The decode MoE block (router, top-1 expert, post-MoE residual scaling) with each row's expert weights indexed
    directly (`gate_up[e_b] . x_b` as a reduction): no sort, no host sync. Eager, the indexing would copy every
    row's expert; compiled (`FastDecoder(compile=True)`), inductor fuses gather, product and sum into one loop that
    streams each row's weights once. Returns (x_new, post-EDA router state)."""
    hm, r, probs, choice = route(x, r_prev, ln2, Wd_T, bd, gamma, rn_w, W1_T, b1, W2_T, b2, Wr_T, bias_bal, eps,
                                 rn_eps)
    E, Fw = gate_up.shape[0], down.shape[-1]
    routed = choice < E
    e = choice.clamp(max=E - 1)
    gate = probs.gather(1, choice[:, None])  # [B, 1], unnormalised
    h = (gate_up[e] * hm[:, None, :]).sum(-1)  # [B, 2F]
    zz = F.silu(h[:, :Fw]) * h[:, Fw:]
    y = (down[e] * zz[:, None, :]).sum(-1)  # [B, D]
    y = torch.where(routed[:, None], y * gate, 0.0)  # the skip slot outputs exactly zero
    return x * rs2 + c2 + y * hs2, r

"""The ZAYA1 router (MLP + Exponential Depth Averaging), aux-loss-free balancing, and SwiGLU experts [TR §II-B; spec §4].

Shape legend: N tokens (B * T flattened), D hidden, R router latent, E experts, K = E + 1 router classes (the last is
the skip slot), F expert width.

Notable features:
- Router: r = W_down x + b; EDA r += gamma * r_prev (layers >= 1; the post-EDA r is threaded to the next layer, so it is
  an exponential average over depth); RMSNorm; GELU MLP 3 layers; softmax over 16 + 1 classes in fp32.
- Top-1 chosen on probabilities plus balancing biases (the biases change the choice only, never the gate weight),
  and the gate weight is the chosen probability, NOT renormalised. The skip slot outputs zero ([HF] semantics).
- Balancing: each training-mode forward accumulates token counts per expert; `BalancingBiasOptimizer` feeds
  grad(b_e) = load_e - 1/E to its own AdamW [TR eq. 5]: overloaded experts lose bias, idle ones gain it. No aux loss.
- Experts stored stacked ([E, 2F, D] gate|up and [E, D, F]) and computed on tokens sorted by expert with grouped
  GEMMs (one GEMM per non-empty expert over its contiguous block; torch's CPU `_grouped_mm` was no faster here and
  its backward fails on empty groups): never a dense per-expert mask over all tokens. `config.moe_impl == "triton"` routes through `zaya_kernels.moe_experts`.
- Routing statistics (load per expert, max/mean load, router entropy) are kept for logging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused_ops import rms_norm

__all__ = ["RMSNorm", "Router", "Experts", "MoEBlock", "BalancingBiasOptimizer", "experts_forward_eager"]


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 (weight init 1; not the 1 + w variant)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # one hand-differentiated node when training (fused_ops)


class RouterMLP(nn.Module):
    def __init__(self, R: int, K: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(R, eps)
        self.fc1 = nn.Linear(R, R, bias=True)
        self.fc2 = nn.Linear(R, R, bias=True)
        self.out_proj = nn.Linear(R, K, bias=False)
        for lin in (self.fc1, self.fc2, self.out_proj):
            lin.fan_in_init = True  # see ZayaPreTrainedModel._init_weights

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        z = F.gelu(self.fc1(self.norm(r)))  # exact-erf GELU (nn.GELU default)
        z = F.gelu(self.fc2(z))
        return self.out_proj(z)


class Router(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        D, R, K = config.hidden_size, config.router_hidden_size, config.num_router_classes
        self.E, self.K = config.num_experts, K
        self.use_eda = layer_idx != 0  # the first MoE layer has no previous router state
        self.down_proj = nn.Linear(D, R, bias=True)
        if self.use_eda:
            self.router_states_scale = nn.Parameter(torch.ones(R))  # gamma [TR eq. 2], init 1
        self.router_mlp = RouterMLP(R, K, config.rms_norm_eps)
        bias = torch.zeros(K)
        bias[-1] = -1.0  # the skip slot: p <= 1, so with bias -1 it never wins
        self.register_buffer("balancing_biases", bias)
        # Statistics since the last balancing step. Plain tensors, not buffers: they are not weights, and transformers'
        # loader re-initialises any module holding an unloaded buffer (which would reset the loaded biases).
        self.load_counts = torch.zeros(K)
        self.prob_sum = torch.zeros(K)
        self.entropy_sum = torch.zeros(())
        self.track_stats = True

    def forward(self, x_ND: torch.Tensor, r_prev: torch.Tensor | None):
        r = self.down_proj(x_ND)
        if self.use_eda and r_prev is not None:
            r = r + r_prev * self.router_states_scale
        logits = self.router_mlp(r)
        probs = torch.softmax(logits.float(), dim=-1)  # [N, K] fp32
        choice = (probs.detach() + self.balancing_biases).argmax(dim=-1)  # [N]
        gate = probs.gather(1, choice[:, None]).squeeze(1)  # [N], unnormalised
        if self.training and self.track_stats:
            with torch.no_grad():
                if self.load_counts.device != probs.device:  # first use on this device (or created on meta)
                    self.reset_stats(probs.device)
                # index_add_ rather than bincount: a static output shape, so torch.compile keeps one graph
                self.load_counts.index_add_(0, choice, torch.ones_like(choice, dtype=self.load_counts.dtype))
                p = probs.detach()
                self.prob_sum += p.sum(0)
                self.entropy_sum += -(p * p.clamp_min(1e-12).log()).sum()
        return choice, gate, r, logits

    def reset_stats(self, device=None) -> None:
        device = device if device is not None else self.down_proj.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.load_counts = torch.zeros(self.K, device=device)
        self.prob_sum = torch.zeros(self.K, device=device)
        self.entropy_sum = torch.zeros((), device=device)

    def stats(self) -> dict:
        if self.load_counts.is_meta:  # built on the meta device by from_pretrained and never used since
            self.reset_stats()
        n = float(self.load_counts.sum())
        load = (self.load_counts[: self.E] / max(n, 1.0)).tolist()
        mean = 1.0 / self.E
        return {
            "tokens": n,
            "load": load,  # fraction of tokens per expert
            "skip_fraction": float(self.load_counts[-1]) / max(n, 1.0),
            "max_over_mean": max(load) / mean if n > 0 else 0.0,
            "active_experts": int(sum(1 for x in load if x > 0)),
            "router_entropy": float(self.entropy_sum) / max(n, 1.0),  # mean per-token entropy (nats)
        }


def _empty_grad_like(W: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """A gradient buffer for stacked expert weights: uninitialised, with only the slices of experts that received no
    tokens (whose GEMMs never write) zeroed."""
    gW = torch.empty_like(W)
    for e, c in enumerate(counts):
        if c == 0:
            gW[e].zero_()
    return gW


class _RoutedSwiGLU(torch.autograd.Function):
    """y_n = gate_n * W2_e (silu(W1g_e x_n) * W1u_e x_n) for the routed tokens n (sorted by expert e), 0 elsewhere.

    One autograd node from the routed tokens' indices to the output rows: the gather of the tokens, one GEMM pair per
    non-empty expert block, the gate (folded into the down-projection's input) and the scatter back. The backward
    writes each expert's weight gradient straight into its slice of [E, 2F, D] / [E, D, F]: indexing a stacked
    parameter per expert (`W[e]`) under autograd would instead materialise and accumulate a full-size zero gradient
    per expert, which costs more than the GEMMs at small widths. Element-wise work (SiLU, gating) runs once over all
    routed tokens, not per expert.

    With h = [g | u] = x W1^T, a = silu(g), z = a * u, zg = z * gate and y = zg W2^T, the backward is
      dzg = dy W2;  dW2 = dy^T zg;  dgate = <dzg, z>;  dz = dzg * gate;  dg = silu'(g) u dz;  du = a dz;
      dW1 = [dg | du]^T x;  dx = [dg | du] W1.
    """

    @staticmethod
    def forward(ctx, x_ND, gate_N, W1, W2, idx, pos, counts):
        # idx: [n] token indices sorted by expert; counts: list[int] of length E (tokens per expert, in that order);
        # pos: [N] each token's row in that order (n for skip-slot tokens: a zero row appended to the sorted rows).
        # Scattering back is a gather by `pos` (index_select is several times faster than index_copy_ here).
        N, D = x_ND.shape
        n = idx.numel()
        xs = x_ND.index_select(0, idx)
        gs = gate_N.index_select(0, idx).to(x_ND.dtype)[:, None]  # [n, 1]
        h = xs.new_empty(n, W1.shape[1])
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(xs[start:start + c], W1[e].t(), out=h[start:start + c])
                start += c
        g, u = h.chunk(2, dim=-1)
        a = F.silu(g)
        z = a * u  # [n, F]
        zg = z * gs
        ys = xs.new_empty(n + (n < N), D)
        ys[n:].zero_()
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(zg[start:start + c], W2[e].t(), out=ys[start:start + c])
                start += c
        y = ys.index_select(0, pos)  # skip-slot tokens read the zero row
        ctx.save_for_backward(xs, gs, W1, W2, h, a, z, zg, idx, pos)
        ctx.counts, ctx.N, ctx.gate_dtype = counts, N, gate_N.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xs, gs, W1, W2, h, a, z, zg, idx, pos = ctx.saved_tensors
        counts, N = ctx.counts, ctx.N
        n, D = xs.shape
        gys = gy.index_select(0, idx)  # [n, D]
        gzg = z.new_empty(z.shape)
        gW2 = _empty_grad_like(W2, counts)
        start = 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                torch.mm(gys[sl], W2[e], out=gzg[sl])  # [c, F]
                torch.mm(gys[sl].t(), zg[sl], out=gW2[e])  # [D, F]
                start += c
        dgate = None
        if ctx.needs_input_grad[1]:
            dgate = gys.new_zeros(n + (n < N), dtype=ctx.gate_dtype)
            torch.sum(gzg * z, dim=-1, out=dgate[:n])
            dgate = dgate.index_select(0, pos)
        gz = gzg.mul_(gs)
        g, u = h.chunk(2, dim=-1)
        Fw = g.shape[1]
        gh = torch.empty_like(h)  # [n, 2F]: gate half then up half, each written in place (no cat)
        # d/dg [silu(g) u] = u silu'(g): one fused aten op instead of the sigmoid-expression chain
        torch.ops.aten.silu_backward.grad_input(gz * u, g, grad_input=gh[:, :Fw])
        torch.mul(gz, a, out=gh[:, Fw:])  # d/du = silu(g)
        gW1 = _empty_grad_like(W1, counts)
        gxs = xs.new_empty(n + (n < N), D)
        gxs[n:].zero_()
        start = 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                torch.mm(gh[sl].t(), xs[sl], out=gW1[e])  # [2F, D]
                torch.mm(gh[sl], W1[e], out=gxs[sl])  # [c, D]
                start += c
        return gxs.index_select(0, pos), dgate, gW1, gW2, None, None, None


@torch.compiler.disable
def experts_forward_eager(x_ND, choice, gate, gate_up_proj, down_proj, num_experts: int):
    """y_n = gate_n * W2_e (silu(W1g_e x_n) * W1u_e x_n) for e = choice_n (< E); 0 for the skip slot.

    Tokens are sorted by expert once (stable); each expert's contiguous block goes through its own GEMMs.
    Excluded from torch.compile (TrainConfig.compile): the per-expert token counts change every step and would
    recompile the graph each time; everything around it compiles once per shape.
    """
    N, D = x_ND.shape
    E = num_experts
    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=E + 1).tolist()  # one host sync for all experts
    n_routed = N - counts[E]  # skip-slot tokens sort to the end and are dropped (they output 0)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N, device=order.device).clamp_max_(n_routed)  # inverse permutation; skip -> row n
    return _RoutedSwiGLU.apply(x_ND, gate, gate_up_proj, down_proj, order[:n_routed], pos, counts[:E])


class Experts(nn.Module):
    """16 SwiGLU experts stored stacked: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""

    def __init__(self, config):
        super().__init__()
        E, D, Fw = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.E = E
        self.impl = config.moe_impl
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fw, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fw))

    def forward(self, x_ND, choice, gate):
        if self.impl == "triton":
            from zaya_kernels import moe_experts

            idx = torch.where(choice < self.E, choice, torch.full_like(choice, -1))
            return moe_experts(x_ND, idx, gate.to(x_ND.dtype), self.gate_up_proj, self.down_proj)
        return experts_forward_eager(x_ND, choice, gate, self.gate_up_proj, self.down_proj, self.E)


class MoEBlock(nn.Module):
    """Router + experts; returns (y [B, T, D], router state r [B*T, R] for the next layer's EDA)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.gate = Router(config, layer_idx)
        self.experts = Experts(config)

    def forward(self, x_BTD: torch.Tensor, r_prev: torch.Tensor | None):
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(B * T, D)
        choice, gate, r, _ = self.gate(x, r_prev)
        y = self.experts(x, choice, gate)
        return y.view(B, T, D), r


class BalancingBiasOptimizer:
    """The aux-loss-free balancing update [TR eq. 5]: grad(b_{l,e}) = load_{l,e} - 1/E, fed to its own AdamW.

    Adam normalises the step, so each update moves a bias by about `lr` towards balance (close to DeepSeek's
    sign rule). The skip slot's bias is never changed. `state_dict()` makes resumes exact.
    """

    def __init__(self, routers: list[Router], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.routers = routers
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t = 0
        self.m = [torch.zeros(r.E) for r in routers]
        self.v = [torch.zeros(r.E) for r in routers]

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        for i, r in enumerate(self.routers):
            if r.load_counts.is_meta:
                continue
            counts = r.load_counts[: r.E].detach().float().cpu()
            total = float(counts.sum())
            if total == 0:
                continue
            g = counts / total - 1.0 / r.E
            self.m[i].mul_(b1).add_(g, alpha=1 - b1)
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = self.m[i] / (1 - b1 ** self.t)
            v_hat = self.v[i] / (1 - b2 ** self.t)
            upd = self.lr * m_hat / (v_hat.sqrt() + self.eps)
            r.balancing_biases[: r.E] -= upd.to(r.balancing_biases.device)

    def state_dict(self) -> dict:
        return {"t": self.t, "m": [x.clone() for x in self.m], "v": [x.clone() for x in self.v], "lr": self.lr}

    def load_state_dict(self, sd: dict) -> None:
        self.t = int(sd["t"])
        self.m = [x.clone() for x in sd["m"]]
        self.v = [x.clone() for x in sd["v"]]
        self.lr = float(sd.get("lr", self.lr))

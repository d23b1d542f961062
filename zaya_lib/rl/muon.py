"""Momentum-free Muon for RL (cascade optimizer), with AdamW for the non-matrix parameters, as one optimizer for TRL.

"Momentum-free Muon" (spec test_time_compute_and_rl.md §6, [GUESS] reading of the ZAYA1 report): each step applies the
orthogonalised *raw* minibatch gradient, O_t = NS5(g_t), with no momentum buffer. RL gradients are noisy and (with
one-step-stale rollouts) slightly off-policy, so carrying a momentum of old policy gradients is what it avoids.

Notable features:
- 2-D hidden weights (attention, router, projections) -> `torch.optim.Muon(momentum=0, nesterov=False)`: torch's
  buffer update `buf.lerp_(grad, 1 - 0)` makes the buffer equal to the gradient, so the step is exactly NS(grad).
- 3-D stacked experts ([E, 2F, D], [E, D, F]) -> `ExpertNS`: the same update per expert slice (torch.optim.Muon
  rejects 3-D tensors). An expert that received no token has a zero gradient slice and gets no update.
- Everything else -> AdamW: embeddings / tied LM head (lookup tables, not hidden maps), norms, biases, residual
  scales, key temperatures, the 3-D depthwise convs (which are not expert stacks).
- `adjust_lr_fn="match_rms_adamw"` on both Muon parts (update RMS 0.2 * sqrt(max(A, B)) scaling), so one learning rate
  and one schedule serve all three optimizers.
- `MuonAdamW.param_groups` is a *live* property over the sub-optimizers' groups (environment.md appendix §4 gotcha):
  the transformers/TRL LR scheduler writes `group["lr"]` into the very dicts the sub-optimizers read, also after
  accelerate's `load_state_dict`. Pass it to TRL as `GRPOTrainer(..., optimizers=(opt, None))`.
- `muon=False` builds the AdamW-everywhere baseline with the same class, for the notebook's comparison.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["split_muon_params", "newton_schulz", "ExpertNS", "MuonAdamW"]

_NS_COEFFS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic coefficients (torch.optim.Muon's defaults)
_NOT_MUON = ("embed_tokens", "lm_head")  # 2-D, but lookup tables: AdamW


def split_muon_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by optimizer: {"muon": 2-D hidden weights, "experts": 3-D expert stacks, "adamw": rest}."""
    out: dict[str, list] = {"muon": [], "experts": [], "adamw": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = not any(k in name for k in _NOT_MUON)
        if p.ndim == 2 and hidden:
            out["muon"].append((name, p))
        elif p.ndim == 3 and hidden and ".experts." in name:
            out["experts"].append((name, p))
        else:
            out["adamw"].append((name, p))
    return out


def newton_schulz(G_EAB: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate polar factor U V^T of every slice of [E, A, B] (quintic Newton-Schulz, each slice normalised by its
    own Frobenius norm so its spectral norm is <= 1). fp32 here: CPU bf16 batched matmuls are slower, not faster.
    The iteration drives singular values into roughly [0.7, 1.2], not exactly 1 (Muon's design trade-off)."""
    a, b, c = _NS_COEFFS
    X = G_EAB.float()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    X = X / X.flatten(1).norm(dim=1).clamp_min(eps)[:, None, None]
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.transpose(-2, -1) if tall else X


class ExpertNS(torch.optim.Optimizer):
    """Momentum-free Muon on stacked expert weights [E, A, B]: p[e] -= lr * 0.2 sqrt(max(A, B)) * NS(grad[e])."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, ns_steps=ns_steps))
        for g in self.param_groups:
            for p in g["params"]:
                if p.ndim != 3:
                    raise ValueError(f"ExpertNS takes stacked [E, A, B] expert weights, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                A, B = p.shape[1:]
                upd = newton_schulz(p.grad, g["ns_steps"])  # zero slices stay zero (0 / eps = 0)
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(upd.to(p.dtype), alpha=-g["lr"] * 0.2 * max(A, B) ** 0.5)  # RMS matched to AdamW


class MuonAdamW(torch.optim.Optimizer):
    """Momentum-free Muon (2-D) + ExpertNS (3-D experts) + AdamW (rest), stepped as one optimizer.

    Deliberately does not call `Optimizer.__init__`: the groups live in the sub-optimizers and `param_groups` is a
    property over them, so nothing can hold a stale copy.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.99), eps: float = 1e-8,
                 muon: bool = True):
        parts = split_muon_params(model)
        if not muon:
            parts = {"muon": [], "experts": [], "adamw": parts["muon"] + parts["experts"] + parts["adamw"]}
        self.names = {k: [n for n, _ in v] for k, v in parts.items()}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        if parts["muon"]:
            self.opts["muon"] = torch.optim.Muon([p for _, p in parts["muon"]], lr=lr, weight_decay=weight_decay,
                                                 momentum=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw")
        if parts["experts"]:
            self.opts["experts"] = ExpertNS([p for _, p in parts["experts"]], lr=lr, weight_decay=weight_decay)
        if not parts["adamw"] and not self.opts:
            raise ValueError("MuonAdamW: the model has no trainable parameters")
        if parts["adamw"]:
            self.opts["adamw"] = torch.optim.AdamW([p for _, p in parts["adamw"]], lr=lr, betas=betas, eps=eps,
                                                   weight_decay=0.0)
        self.defaults = {"lr": lr}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}  # what torch's hooks expect
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.opts.values() for g in o.param_groups]

    @property
    def state(self):  # read-only merged view (accelerate/transformers only inspect it)
        return {p: s for o in self.opts.values() for p, s in o.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.opts.values():
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: o.state_dict() for k, o in self.opts.items()}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd) != set(self.opts):
            raise ValueError(f"MuonAdamW.load_state_dict: saved parts {sorted(sd)} != this optimizer's {sorted(self.opts)}")
        for k, o in self.opts.items():
            o.load_state_dict(sd[k])

    def __repr__(self) -> str:
        return "MuonAdamW(" + ", ".join(f"{k}: {len(v)} tensors" for k, v in self.names.items()) + ")"

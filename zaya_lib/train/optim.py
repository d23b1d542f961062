"""Optimizers and the learning-rate schedule of the pretraining phases.

Notable features:
- Muon (PyTorch's `torch.optim.Muon`) for the 2-D hidden weight matrices and AdamW for everything else (embeddings /
  tied head, norms, biases, residual scales, key temperatures, convs), as the paper's recipe [TR Tab. II: "Muon with
  AdamW RMS matching"]: `adjust_lr_fn="match_rms_adamw"` scales each Muon update to AdamW's RMS, so both share one
  learning rate and one schedule.
- Which parameters go to Muon is decided by shape AND name (`split_params`): `ndim == 2` and not the embedding / LM
  head (those are lookup tables, not linear maps between hidden states; Muon's authors keep them on AdamW).
- The stacked experts (`[E, 2F, D]`, `[E, D, F]`) are 3-D, which `torch.optim.Muon` rejects. `ExpertMuon` applies the
  same update to each expert's own matrix: momentum, Newton-Schulz orthogonalisation of every slice at once (a batched
  form of torch's quintic iteration, same coefficients; bf16 on GPUs, fp32 on the CPU), per-slice RMS matching. An expert that
  received no token has a zero gradient slice and orthogonalises to zero (only momentum and decay move it).
- `Optimizers` groups the two or three optimizers behind one `torch.optim.Optimizer` (live `param_groups`, one
  `state_dict`), so the trainer, a checkpoint and TRL see a single optimizer (environment.md appendix §4 gotcha: the
  groups must be live). The RL cascade's momentum-free variant is the same object (`zaya_lib.rl.muon`).
- `wsd_lr` is the warmup-stable-decay schedule (linear warmup, flat, linear decay to `min_ratio` over the last
  `decay_frac` of the steps); a pure function of the step, so a resumed run needs only the step number.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["split_params", "ExpertMuon", "Optimizers", "build_optimizers", "wsd_lr", "newton_schulz_batched"]

# Names of parameters that are never Muon even when 2-D: token embedding and the (tied) LM head.
_NOT_MUON = ("embed_tokens", "lm_head")


def split_params(model: nn.Module, muon_experts: bool = True) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{"muon": 2-D hidden weights, "expert_muon": stacked 3-D expert weights (if `muon_experts`), "adamw": the rest}.

    Tied weights appear once (`named_parameters` de-duplicates them)."""
    groups: dict[str, list] = {"muon": [], "expert_muon": [], "adamw": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = not any(k in name for k in _NOT_MUON)
        if p.ndim == 2 and hidden:
            groups["muon"].append((name, p))
        elif p.ndim == 3 and hidden and muon_experts and ".experts." in name:
            groups["expert_muon"].append((name, p))
        else:
            groups["adamw"].append((name, p))
    return groups


def newton_schulz_batched(G_EAB: torch.Tensor, coeffs=(3.4445, -4.775, 2.0315), steps: int = 5,
                          eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthogonalise every matrix of a batch [E, A, B]: torch's `_zeropower_via_newtonschulz` applied per slice
    (quintic iteration, each slice normalised by its own Frobenius norm), done with batched matmuls.

    `dtype`: torch's iteration runs in bf16 (fast on GPUs); on the CPU batched bf16 matmuls are many times slower
    than fp32 here, so the default is bf16 on CUDA and fp32 elsewhere (more accurate, same fixed point)."""
    a, b, c = coeffs
    if dtype is None:
        dtype = torch.bfloat16 if G_EAB.is_cuda else torch.float32
    X = G_EAB.to(dtype)
    tall = G_EAB.shape[-2] > G_EAB.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    X = X / X.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        Bm = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, Bm, X, beta=a)
    return X.transpose(-2, -1) if tall else X


class ExpertMuon(torch.optim.Optimizer):
    """Muon for stacked expert weights [E, A, B]: each expert's [A, B] matrix is updated as `torch.optim.Muon`
    would update it alone (same momentum, Nesterov, NS iteration, decoupled weight decay and lr adjustment)."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn="match_rms_adamw"):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for g in self.param_groups:
            for p in g["params"]:
                if p.ndim != 3:
                    raise ValueError(f"ExpertMuon takes stacked [E, A, B] weights, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if g["momentum"] == 0.0:  # momentum-free (the RL cascade): the raw gradient, no buffer kept
                    upd = p.grad
                else:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    buf = state["momentum_buffer"]
                    buf.lerp_(p.grad, 1 - g["momentum"])
                    upd = p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf
                upd = newton_schulz_batched(upd, g["ns_coefficients"], g["ns_steps"], g["eps"])
                A, B = p.shape[1:]
                if g["adjust_lr_fn"] == "match_rms_adamw":
                    ratio = 0.2 * math.sqrt(max(A, B))
                elif g["adjust_lr_fn"] in (None, "original"):
                    ratio = math.sqrt(max(1.0, A / B))
                else:
                    raise ValueError(f"unknown adjust_lr_fn {g['adjust_lr_fn']!r}")
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(upd.to(p.dtype), alpha=-g["lr"] * ratio)


class Optimizers(torch.optim.Optimizer):
    """Several optimizers stepped as one: the trainer's, a checkpoint's and TRL's single optimizer.

    `param_groups` is a live property over the sub-optimizers' groups (environment.md appendix §4 gotcha): an LR
    schedule (ours, or the transformers/TRL scheduler after accelerate's `load_state_dict`) writes `group["lr"]` into
    the very dicts the sub-optimizers read. Deliberately does not call `Optimizer.__init__`, so nothing can hold a
    stale copy of the groups; the hook tables are what torch's `Optimizer` machinery (schedulers, accelerate) expects.
    """

    def __init__(self, opts: dict[str, torch.optim.Optimizer], names: dict[str, list[str]] | None = None):
        self.opts = opts
        self.names = names or {}
        self.defaults = {"lr": next(iter(self.param_groups))["lr"]} if self.param_groups else {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
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
            raise ValueError(f"optimizer state has parts {sorted(sd)}, this run has {sorted(self.opts)}")
        for k, o in self.opts.items():
            o.load_state_dict(sd[k])

    def __repr__(self) -> str:
        return "Optimizers(" + ", ".join(f"{k}: {len(self.names.get(k, []))} tensors" for k in self.opts) + ")"


def build_optimizers(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                     muon_momentum: float = 0.95, muon_experts: bool = True, use_muon: bool = True,
                     nesterov: bool = True) -> Optimizers:
    """Muon (+ ExpertMuon) and AdamW over the model's parameters with one base learning rate.

    Weight decay applies to the matrices (Muon groups and the embedding); norms, biases, scales and temperatures get
    none (decaying a scale of 1 towards 0 is not regularisation). `use_muon=False` gives AdamW everywhere (baseline)."""
    groups = split_params(model, muon_experts=muon_experts and use_muon)
    if not use_muon:
        groups = {"muon": [], "expert_muon": [], "adamw": groups["muon"] + groups["expert_muon"] + groups["adamw"]}
    if not any(groups.values()):
        raise ValueError("build_optimizers: the model has no trainable parameters")
    decay = [p for n, p in groups["adamw"] if p.ndim >= 2]
    no_decay = [p for n, p in groups["adamw"] if p.ndim < 2]
    opts: dict[str, torch.optim.Optimizer] = {}
    if groups["muon"]:
        opts["muon"] = torch.optim.Muon([p for _, p in groups["muon"]], lr=lr, weight_decay=weight_decay,
                                        momentum=muon_momentum, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    if groups["expert_muon"]:
        opts["expert_muon"] = ExpertMuon([p for _, p in groups["expert_muon"]], lr=lr, weight_decay=weight_decay,
                                         momentum=muon_momentum, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    if groups["adamw"]:  # (LoRA: only 2-D adapters train, all on Muon)
        opts["adamw"] = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                           {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=1e-8)
    for g in [g for o in opts.values() for g in o.param_groups]:
        g["base_lr"] = lr
    return Optimizers(opts, {k: [n for n, _ in v] for k, v in groups.items()})


def wsd_lr(step: int, total_steps: int, warmup_steps: int, decay_frac: float = 0.2, min_ratio: float = 0.0) -> float:
    """Warmup-stable-decay multiplier for `step` (0-based, the step about to be taken): linear warmup to 1 over
    `warmup_steps`, flat, then linear decay to `min_ratio` over the last `decay_frac * total_steps` steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"decay_frac must be in [0, 1], got {decay_frac}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_frac * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return 1.0
    frac = (step - decay_start + 1) / decay_steps
    return max(min_ratio, 1.0 - (1.0 - min_ratio) * min(frac, 1.0))

"""Momentum-free Muon for RL (the cascade's optimizer), with AdamW for the non-matrix parameters, as one optimizer for
TRL.

"Momentum-free Muon" (spec test_time_compute_and_rl.md §6, [GUESS] reading of the ZAYA1 report): each step applies the
orthogonalised *raw* minibatch gradient, O_t = NS5(g_t), with no momentum buffer. RL gradients are noisy and (with
one-step-stale rollouts) slightly off-policy, so carrying a momentum of old policy gradients is what it avoids.

It is the pretraining optimizer (`zaya_lib.train.optim.build_optimizers`) with momentum 0, so the parameter split, the
Newton-Schulz iteration, the RMS matching and the live param groups are the same code:
- 2-D hidden weights (attention, router, projections) -> `torch.optim.Muon(momentum=0, nesterov=False)`: torch's
  buffer update `buf.lerp_(grad, 1 - 0)` makes the buffer equal to the gradient, so the step is exactly NS(grad).
- 3-D stacked experts ([E, 2F, D], [E, D, F]) -> `ExpertMuon` with momentum 0: the same update per expert slice, no
  buffer kept. An expert that received no token has a zero gradient slice and gets no update.
- Everything else -> AdamW: embeddings / tied LM head, norms, biases, residual scales, key temperatures, the 3-D
  depthwise convs (which are not expert stacks).
- `adjust_lr_fn="match_rms_adamw"` (update RMS 0.2 * sqrt(max(A, B))), so one learning rate serves all three.
- The result is one `torch.optim.Optimizer` whose `param_groups` are live: pass it to TRL as
  `GRPOTrainer(..., optimizers=(opt, None))`; TRL's scheduler reaches every sub-optimizer.
- `muon=False` builds the AdamW-everywhere baseline for the notebook's comparison.
"""
from __future__ import annotations

from torch import nn

from zaya_lib.train.optim import Optimizers, build_optimizers

__all__ = ["muon_adamw"]


def muon_adamw(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.99),
               muon: bool = True) -> Optimizers:
    """Momentum-free Muon (2-D) + per-expert momentum-free Muon (3-D experts) + AdamW (rest), or AdamW everywhere."""
    return build_optimizers(model, lr=lr, weight_decay=weight_decay, betas=betas, muon_momentum=0.0,
                            muon_experts=True, use_muon=muon, nesterov=False)

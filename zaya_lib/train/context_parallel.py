"""All-gather-KV context parallelism (CP) for ZAYA1 over `torch.distributed` ranks [TR §III; spec architecture.md §6].

Each of the W ranks of a CP group holds ONE contiguous chunk of every sequence: rank r gets tokens
[r * T, (r + 1) * T) of a context of S = W * T tokens, and runs the whole model on it with `cp=ContextParallel(...)`.
Per CCA layer the ranks exchange:
- the conv halo: the previous rank's last (t0 - 1) + (t1 - 1) = 2 raw [q0 | k0] columns [B, C, 2], point to point
  (rank 0 gets zeros, which is exactly the single-process causal zero pad);
- the value delay: the previous rank's last delayed-value projection W_v2 x [B, Hk * d / 2], point to point;
- K/V in compressed form (post-norm, temperature and RoPE; Hk * d numbers each per token), all-gathered along the
  sequence, so every rank attends its T queries over all S keys with a causal mask offset by r * T.

Backward mirrors forward (custom autograd Functions): the halo's and delayed value's gradients travel back to the
previous rank point to point, and the gathered K/V gradient is reduce-scattered (summed over ranks, each keeping its
own slice). Parameter gradients are then summed over the group (`sync_gradients`), and so are the router's load counts
(`sync_routing_stats`) so every rank takes the same balancing-bias step.

Notable features:
- Chunks are contiguous, not load-balanced (zig-zag): the conv halo and the value delay only work across a
  contiguous split (the model continues its convolutions from the halo), so rank r does (r + 1)/W of the causal
  attention work. Attention is a small share of the FLOPs at CCA's compressed width; balancing is future work.
- Exact: forward, loss and every parameter gradient equal the single-process result to fp32 rounding
  (tests/test_context_parallel.py, 2 and 4 gloo processes).
- Works with gloo (CPU) and NCCL (GPU): p2p through `batch_isend_irecv` (matching on tags with gloo; NCCL ignores
  tags and relies on the identical, deterministic call order on every rank, which autograd gives since every rank
  builds the same graph), all-gather and reduce-scatter through `all_gather_single` / `reduce_scatter_single`.
  NCCL is untested here (no GPU on the development machines).
- The loss is the global token mean: each rank's next-token targets are shifted over the whole sequence BEFORE
  chunking (the last token of chunk r predicts the first token of chunk r + 1), and the local sum is divided by the
  global count of targets, so the per-rank gradients sum to the single-process gradient.
- A context that the CP world size does not divide fails at once (`check_divisible`), before any communication.

Shapes: B batch, S full context, W world size, T = S / W tokens per rank, Hk KV heads, d head width,
C = (Hq + Hk) * d packed q|k channels, P = conv halo width (2).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ContextParallel", "check_divisible", "shift_labels", "split_chunk", "cp_loss", "sync_gradients",
           "sync_routing_stats", "cp_train_step", "check_against_single_process"]

# p2p tags: one per (layer, kind, direction) so gloo can never match a message to the wrong receive
_KINDS = {"conv": 0, "vdel": 1}


def check_divisible(seq_len: int, world_size: int) -> int:
    """T = seq_len / world_size; a context the CP world size does not divide is an error (issue 5)."""
    if world_size <= 0:
        raise ValueError(f"context parallelism: world size must be positive, got {world_size}")
    if seq_len % world_size != 0:
        raise ValueError(f"context parallelism: context length {seq_len} is not divisible by the CP world size "
                         f"{world_size}; pad or choose a window that is a multiple of {world_size}")
    if seq_len // world_size < 2:
        raise ValueError(f"context parallelism: {seq_len} tokens over {world_size} ranks leaves fewer than 2 tokens "
                         "per rank (the conv halo needs 2)")
    return seq_len // world_size


class _ShiftFromPrevious(torch.autograd.Function):
    """y_r = x_{r-1} (y_0 = 0): forward sends x to the next rank and receives from the previous one;
    backward sends the gradient of y back to the previous rank and receives the gradient of x from the next."""

    @staticmethod
    def forward(ctx, x, cp: "ContextParallel", tag: int):
        ctx.cp, ctx.tag = cp, tag
        x = x.contiguous()
        y = x.new_zeros(x.shape)
        cp._p2p(send=x if cp.rank < cp.world - 1 else None, to=cp.rank + 1,
                recv=y if cp.rank > 0 else None, frm=cp.rank - 1, tag=2 * tag)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        cp = ctx.cp
        grad_x = grad_y.new_zeros(grad_y.shape)  # contiguous whatever the layout grad_y arrives in
        cp._p2p(send=grad_y.contiguous() if cp.rank > 0 else None, to=cp.rank - 1,
                recv=grad_x if cp.rank < cp.world - 1 else None, frm=cp.rank + 1, tag=2 * ctx.tag + 1)
        return grad_x, None, None


class _GatherSequence(torch.autograd.Function):
    """x [T, ...] (sequence first) -> all ranks' chunks concatenated [W * T, ...]; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, cp: "ContextParallel"):
        ctx.cp = cp
        x = x.contiguous()
        out = x.new_empty((cp.world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_single(out, x, group=cp.group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        cp = ctx.cp
        grad_out = grad_out.contiguous()
        grad_x = grad_out.new_empty((grad_out.shape[0] // cp.world,) + tuple(grad_out.shape[1:]))
        dist.reduce_scatter_single(grad_x, grad_out, op=dist.ReduceOp.SUM, group=cp.group)
        return grad_x, None


class ContextParallel:
    """The exchanger the model calls (`model(ids_chunk, position_ids=..., cp=cp)`); see the module docstring.

    `group`: the CP process group (default: the whole world). Ranks are ordered by their rank in the group.
    """

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    def offset(self, T: int) -> int:
        """Global position of this rank's first token (chunks are contiguous and equal)."""
        return self.rank * T

    def attn_mask(self, T: int, S: int, device) -> torch.Tensor:
        """Causal mask of this rank's T queries over all S gathered keys: bool [1, 1, T, S], True = attend."""
        q_pos = torch.arange(self.offset(T), self.offset(T) + T, device=device)
        return (torch.arange(S, device=device)[None, :] <= q_pos[:, None])[None, None]

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _p2p(self, send, to: int, recv, frm: int, tag: int) -> None:
        # One batch (ncclGroupStart/End on NCCL; posted together on gloo), then wait: no rank blocks in a send while
        # its neighbour blocks in one too.
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self._global(to), group=self.group, tag=tag))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self._global(frm), group=self.group, tag=tag))
        for r in dist.batch_isend_irecv(ops):
            r.wait()

    # --- the model's hooks ---------------------------------------------------------------------------------------
    def exchange_conv(self, layer_idx: int, last_raw_BCP: torch.Tensor) -> torch.Tensor:
        """Previous rank's last P raw q|k columns [B, C, P] (zeros on rank 0); differentiable."""
        if self.world == 1:
            return torch.zeros_like(last_raw_BCP)
        return _ShiftFromPrevious.apply(last_raw_BCP, self, 2 * layer_idx + _KINDS["conv"])

    def exchange_vdel(self, layer_idx: int, last_vdel_BH: torch.Tensor) -> torch.Tensor:
        """Previous rank's last delayed-value projection [B, Hk * d / 2] (zeros on rank 0); differentiable."""
        if self.world == 1:
            return torch.zeros_like(last_vdel_BH)
        return _ShiftFromPrevious.apply(last_vdel_BH, self, 2 * layer_idx + _KINDS["vdel"])

    def gather_kv(self, layer_idx: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        """All ranks' compressed K and V concatenated along the sequence: [B, Hk, W * T, d] each; differentiable."""
        if self.world == 1:
            return k_BHTd, v_BHTd
        kv = torch.stack([k_BHTd, v_BHTd]).permute(3, 0, 1, 2, 4)  # [T, 2, B, Hk, d]: one message for both
        kv_all = _GatherSequence.apply(kv, self).permute(1, 2, 3, 0, 4)  # [2, B, Hk, S, d]
        return kv_all[0], kv_all[1]


# --- data and loss ---------------------------------------------------------------------------------------------------

def shift_labels(labels_BS: torch.Tensor) -> torch.Tensor:
    """Next-token targets over the WHOLE sequence: target[t] = labels[t + 1], -100 at the end. Chunk these, never the
    unshifted labels, so the last token of each chunk keeps its target in the next chunk."""
    return F.pad(labels_BS[:, 1:], (0, 1), value=-100)


def split_chunk(x_BS: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """This rank's contiguous chunk [B, T] of a [B, S] tensor (validated: W must divide S)."""
    T = check_divisible(x_BS.shape[1], cp.world)
    return x_BS[:, cp.rank * T:(cp.rank + 1) * T]


def cp_loss(model, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor, cp: ContextParallel):
    """Forward this rank's chunk of full [B, S] inputs/labels (HF convention: unshifted, -100 ignored).

    Returns (local loss, global loss, logits [B, T, V]). The local loss is this rank's target sum divided by the global
    number of targets, so `local.backward()` on every rank plus `sync_gradients` gives the single-process gradient
    of the global mean; the global loss (detached) is the value a single process would report.
    """
    check_divisible(input_ids_BS.shape[1], cp.world)
    if labels_BS.shape != input_ids_BS.shape:
        raise ValueError(f"labels {tuple(labels_BS.shape)} and input_ids {tuple(input_ids_BS.shape)} differ in shape")
    ids = split_chunk(input_ids_BS, cp)
    targets = split_chunk(shift_labels(labels_BS), cp)
    B, T = ids.shape
    positions = torch.arange(cp.offset(T), cp.offset(T) + T, device=ids.device)[None].expand(B, T)
    logits = model(ids, position_ids=positions, cp=cp).logits
    n = (targets != -100).sum().to(torch.float32)
    n_sum = torch.stack([n, torch.zeros((), device=n.device)])
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
    n_sum[1] = loss_sum.detach()
    dist.all_reduce(n_sum, group=cp.group)
    n_global = n_sum[0].clamp_min(1.0)
    return loss_sum / n_global, n_sum[1] / n_global, logits


@torch.no_grad()
def sync_gradients(model, group=None) -> None:
    """Sum every parameter's gradient over the CP group in one flat all-reduce (a missing grad counts as zero)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    seen: set[int] = set()
    uniq = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # tied weights appear once
    flat = torch.cat([p.grad.reshape(-1) for p in uniq])
    dist.all_reduce(flat, group=group)
    i = 0
    for p in uniq:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


@torch.no_grad()
def sync_routing_stats(model, group=None) -> None:
    """Sum the routers' load counts (and entropy/probability sums) over the group: every rank then takes the same
    balancing-bias step, and the statistics describe the whole sequence."""
    bufs = [b for r in model.routers() for b in (r.load_counts, r.prob_sum, r.entropy_sum.view(1))]
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat, group=group)
    i = 0
    for b in bufs:
        b.copy_(flat[i:i + b.numel()].view_as(b))
        i += b.numel()


def cp_train_step(model, optimizers, input_ids_BS, labels_BS, cp: ContextParallel, max_grad_norm: float | None = 1.0,
                  update_balancing: bool = True) -> dict:
    """One optimizer step on a [B, S] batch split over the CP group: forward/backward per chunk, gradient all-reduce,
    clipping, the optimizers' steps, and the balancing-bias update from the group-wide routing counts.

    `optimizers`: one optimizer or a list (e.g. Muon + AdamW). Every rank ends with identical weights.
    """
    opts = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    for o in opts:
        o.zero_grad(set_to_none=True)
    local, global_loss, _ = cp_loss(model, input_ids_BS, labels_BS, cp)
    local.backward()
    sync_gradients(model, cp.group)
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    for o in opts:
        o.step()
    if update_balancing:
        sync_routing_stats(model, cp.group)
        model.update_balancing_biases()
    return {"loss": float(global_loss), "grad_norm": grad_norm}


# --- a self-check on real processes (notebooks; tests/test_context_parallel.py has its own workers) -------------------

def _equivalence_worker(rank: int, world: int, port: int, model, input_ids, labels, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cp = ContextParallel()
        model.zero_grad(set_to_none=True)
        local, global_loss, logits = cp_loss(model, input_ids, labels, cp)
        local.backward()
        sync_gradients(model)
        if rank == 0:
            torch.save({"loss": float(global_loss), "grads": {n: p.grad for n, p in model.named_parameters()}},
                       os.path.join(out_dir, "cp.pt"))
        torch.save(logits.detach(), os.path.join(out_dir, f"logits{rank}.pt"))
    finally:
        dist.destroy_process_group()


def check_against_single_process(model, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor, world_size: int) -> dict:
    """Run one forward/backward of `model` (CPU, fp32) on [B, S] over `world_size` real gloo processes (forked, on
    loopback) and once in this process; return the loss, the largest logit difference, the largest gradient
    difference relative to each tensor's largest entry, and the wall times. Routing statistics are left untouched."""
    import socket
    import tempfile
    import time

    import torch.multiprocessing as mp

    check_divisible(input_ids_BS.shape[1], world_size)
    was_training = model.training
    model.train()
    for r in model.routers():
        r.track_stats = False  # a check must not feed the balancing statistics
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            mp.start_processes(_equivalence_worker, args=(world_size, port, model, input_ids_BS, labels_BS, d),
                               nprocs=world_size, start_method="fork")
            t_cp = time.perf_counter() - t0
            res = torch.load(os.path.join(d, "cp.pt"))
            logits_cp = torch.cat([torch.load(os.path.join(d, f"logits{r}.pt")) for r in range(world_size)], dim=1)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(input_ids_BS, labels=labels_BS)
        out.loss.backward()
        t_single = time.perf_counter() - t0
        rel = {n: float((res["grads"][n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
               for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    finally:
        for r in model.routers():
            r.track_stats = True
        model.train(was_training)
    worst = max(rel, key=rel.get)
    return {"world_size": world_size, "seq_len": int(input_ids_BS.shape[1]), "loss_cp": res["loss"],
            "loss_single": float(out.loss.detach()),
            "max_abs_logit_diff": float((logits_cp - out.logits.detach()).abs().max()),
            "max_rel_grad_diff": rel[worst], "worst_param": worst, "wall_s_cp": t_cp, "wall_s_single": t_single}

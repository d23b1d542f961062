"""torchrun / DDP / FSDP2 helpers for the trainer (context parallelism itself lives in `context_parallel.py`).

Notable features:
- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and starts the
  process group: gloo on the CPU, NCCL on CUDA (one GPU per local rank). Without those variables it is a no-op and
  everything below degrades to single-process behaviour, so the trainer has one code path.
- `wrap_model`: DDP (`find_unused_parameters=False`: every parameter gets a gradient each step; the stacked experts
  are single tensors, so an idle expert only contributes a zero slice), or FSDP2 `fully_shard` per decoder block then
  the root. With context parallelism the DDP wrapper is skipped: gradients are summed over ALL ranks after the
  backward (`context_parallel.sync_gradients`), since a sequence's chunks on different ranks hold partial gradients
  of the same weights; `context_parallel_group` lays ranks out as (data, context) groups.
- `all_reduce_routing_counts` sums the routers' load counts over ranks before the balancing step, so the balancing
  biases follow the GLOBAL batch [TR eq. 5] and stay identical on every rank.
- `full_model_state` / `load_model_state` gather a plain (unsharded) state dict on every rank for checkpoints.

Launch: `torchrun --nproc_per_node=2 script.py` where the script calls `init_distributed()` then `train(...)`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "current", "wrap_model", "no_sync_unless", "all_reduce_sum",
           "context_parallel_group", "all_reduce_routing_counts", "full_model_state", "load_model_state", "barrier",
           "cleanup", "fsdp_available"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """Rank and world size of the running process group (0/1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def init_distributed(backend: str | None = None) -> DistInfo:
    """Start the process group from torchrun's environment; single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_initialized()):
        return current()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return current()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap_model(model: torch.nn.Module, parallel: str = "ddp", cp_world_size: int = 1) -> torch.nn.Module:
    """The module the training forward goes through: DDP, FSDP2 (sharded in place), or the model itself under
    context parallelism (gradients are then summed by `context_parallel.sync_gradients`)."""
    if cp_world_size > 1:
        for p in model.parameters():  # start from identical weights on every rank
            dist.broadcast(p.data, src=0)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=False)
    if parallel == "fsdp":
        if not fsdp_available():
            raise RuntimeError("parallel='fsdp' needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6)")
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def no_sync_unless(model: torch.nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on every micro-batch but the last (gradient accumulation)."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    if not last and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    if last and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(True)
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def context_parallel_group(cp_world_size: int):
    """The process group of this rank's context-parallel peers: ranks are laid out as (data, context), so ranks
    d * W .. d * W + W - 1 share sequences. Every rank creates every group (torch.distributed requires it)."""
    info = current()
    if info.world_size % cp_world_size:
        raise ValueError(f"world size {info.world_size} is not a multiple of cp_world_size {cp_world_size}")
    if cp_world_size == info.world_size:
        return None  # the whole world
    mine = None
    for d in range(info.world_size // cp_world_size):
        ranks = list(range(d * cp_world_size, (d + 1) * cp_world_size))
        g = dist.new_group(ranks)
        if info.rank in ranks:
            mine = g
    return mine


@torch.no_grad()
def all_reduce_routing_counts(model: torch.nn.Module) -> None:
    """Sum every router's accumulated load statistics over all ranks (global-batch balancing)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    routers = model.routers()
    flat = torch.cat([torch.cat([r.load_counts, r.prob_sum, r.entropy_sum.view(1)]) for r in routers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for r in routers:
        for buf in (r.load_counts, r.prob_sum, r.entropy_sum.view(1)):
            buf.copy_(flat[off:off + buf.numel()].view_as(buf))
            off += buf.numel()


def full_model_state(model: torch.nn.Module) -> dict:
    """An unsharded CPU state dict (gathers FSDP2 DTensor shards; every rank must call it)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load an unsharded state dict (into a plain or FSDP2-sharded model)."""
    own = model.state_dict()
    if any(hasattr(v, "full_tensor") for v in own.values()):
        from torch.distributed.tensor import distribute_tensor

        state = {k: distribute_tensor(state[k].to(own[k].device), own[k].device_mesh, own[k].placements)
                 if hasattr(own[k], "full_tensor") else state[k] for k in own}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("lm_head.")]  # tied head
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")

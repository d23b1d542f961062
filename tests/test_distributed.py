"""The same trainer on 2 real gloo processes (DDP, FSDP2, context parallelism) equals one process on the same global
batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from zaya_lib.config import get_config
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.train import distributed as dist_utils
from zaya_lib.train.trainer import TrainConfig, TrainData, train


def _data():
    g = torch.Generator().manual_seed(0)
    docs = [[1] + torch.randint(5, 120, (int(n),), generator=g).tolist() + [2]
            for n in torch.randint(10, 40, (40,), generator=g)]
    return TrainData.from_documents(docs, ["a" if i % 3 else "b" for i in range(40)], 16)


def _cfg(**kw):
    # AdamW-only keeps the comparison at fp32 rounding; Muon's bf16 Newton-Schulz would amplify the last-bit
    # differences of a different reduction order into ~1e-3 changes (checked separately below with its own tolerance).
    base = dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg_kw, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist_utils.init_distributed("gloo")
    try:
        torch.manual_seed(0)
        model = ZayaForCausalLM(get_config("debug"))
        hist = train(model, _data(), _cfg(**cfg_kw))
        state = dist_utils.full_model_state(model)
        if rank == 0:
            torch.save({"hist": hist, "state": state}, out)
    finally:
        dist_utils.cleanup()


def _run_world(tmp_path, world, **cfg_kw):
    out = str(tmp_path / "dist.pt")
    mp.start_processes(_worker, args=(world, _free_port(), cfg_kw, out), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=False)


def _single(**cfg_kw):
    torch.manual_seed(0)
    model = ZayaForCausalLM(get_config("debug"))
    hist = train(model, _data(), _cfg(**cfg_kw))
    return {"hist": hist, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _compare(ref, got, loss_rtol, param_atol, load_atol=1e-6):
    for a, b in zip(ref["hist"], got["hist"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=loss_rtol), (a["step"], a["loss"], b["loss"])
        # routing counts summed over ranks = the global batch's (a rounding-level logit change could flip a choice)
        assert torch.allclose(torch.tensor(b["route_load"]), torch.tensor(a["route_load"]), atol=load_atol)
    worst = max(float((ref["state"][k] - got["state"][k]).abs().max()) for k in ref["state"])
    assert worst < param_atol, worst


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=[pytest.mark.slow, pytest.mark.skipif(
    not dist_utils.fsdp_available(), reason="torch without FSDP2 fully_shard")])])
def test_two_processes_equal_one(tmp_path, parallel):
    kw = dict(use_muon=False, parallel=parallel)
    ref, got = _single(**kw), _run_world(tmp_path, 2, **kw)
    # fp32, same math in a different summation order (each rank sums its 2 rows, then the all-reduce): losses agree
    # to ~1e-8 relative. Adam divides by sqrt(v), which magnifies rounding-level gradient differences of entries with
    # tiny gradients; measured worst weight difference after 4 steps 1.1e-5, bound 5e-5 = 1/60 of one lr=3e-3 step
    # (a missing or wrong gradient all-reduce moves weights by O(lr) and the losses by far more than 1e-5).
    _compare(ref, got, loss_rtol=1e-5, param_atol=5e-5)


@pytest.mark.slow
def test_two_processes_equal_one_with_muon(tmp_path):
    ref, got = _single(), _run_world(tmp_path, 2)
    # Muon orthogonalises in bf16 (torch's choice): a last-bit gradient difference can flip bf16 roundings inside the
    # Newton-Schulz iteration; one Muon step moves an entry by up to lr * 0.2 * sqrt(64) ~ 5e-3. Measured worst weight
    # difference after 4 steps 3.5e-4; bound 1e-3 (1/5 of one step), losses to 1e-4 relative.
    # Muon orthogonalises in bf16, which turns the reduction-order rounding of DDP into ~1e-4 weight changes; that can
    # move a token whose top-2 router probabilities are within ~1e-4 to the other expert. Allow 2 of the 64 tokens
    # per layer (load fractions move in steps of 1/64) to switch. A switched token hands its gradient to another expert,
    # whose normalised Muon update then differs by O(lr) = 3e-3 per step: 4 steps bound that by ~1e-2. The loss
    # trajectory (1e-4 relative) stays the sharp check.
    _compare(ref, got, loss_rtol=1e-4, param_atol=1.2e-2, load_atol=2 / 64 + 1e-6)


@pytest.mark.slow
def test_context_parallel_through_the_trainer(tmp_path):
    kw = dict(use_muon=False)
    ref, got = _single(**kw), _run_world(tmp_path, 2, cp_world_size=2, **kw)
    # two ranks each hold half of every 16-token window (context_parallel.py exchanges the halo/KV): same tolerance
    _compare(ref, got, loss_rtol=1e-5, param_atol=5e-5)

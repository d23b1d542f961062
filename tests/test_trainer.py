"""The trainer: loss falls, metrics are logged, checkpoints are atomic, a SIGKILLed run resumes exactly, params fail fast."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from zaya_lib.config import get_config
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.train.trainer import (TrainConfig, TrainData, batch_indices, check_context_budget, check_phase_params,
                                    latest_checkpoint, train)

ROOT = Path(__file__).resolve().parents[1]

def toy_data(seq_len=16, n_docs=60):
    """Documents with easily learnt structure: counting up by 1 ("even" docs) or by 2 ("odd" docs)."""
    docs = [[1] + list(range(5 + i % 9, 5 + i % 9 + (20 + i % 5) * (1 + i % 2), 1 + i % 2)) + [2]
            for i in range(n_docs)]
    cats = ["even" if i % 2 == 0 else "odd" for i in range(n_docs)]
    return TrainData.from_documents(docs, cats, seq_len)


def test_batches_are_a_pure_function_of_the_step():
    a = [batch_indices(s, 6, 10, seed=3) for s in range(5)]
    b = [batch_indices(s, 6, 10, seed=3) for s in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.cat(a)[:30]
    # epochs 0, 1, 2 are each a permutation of all 10 windows (no window repeats within an epoch)
    assert all(sorted(flat[e * 10:(e + 1) * 10].tolist()) == list(range(10)) for e in range(3))


def test_few_steps_reduce_loss_and_log_metrics(tmp_path):
    torch.manual_seed(0)
    model = ZayaForCausalLM(get_config("debug"))
    data = toy_data()
    hist = train(model, data, TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, log_every=4),
                 metrics_path=tmp_path / "m.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12, 16, 20] and lines == hist
    # from ~ln(128) = 4.85 at init; counting sequences are learnt fast: a fall of 1.5 nats is far outside noise
    assert lines[-1]["loss"] < lines[0]["loss"] - 1.5, [r["loss"] for r in lines]
    for r in lines:
        assert set(r["loss_per_category"]) == {"even", "odd"}
        assert r["tokens_per_s"] > 0 and 1.0 <= r["route_max_over_mean"] <= 16.0
        assert len(r["route_load"]) == 2 and len(r["route_load"][0]) == 16
        assert abs(sum(r["route_load"][0]) - 1.0) < 1e-3  # no skip-slot tokens: loads sum to one
    assert lines[-1]["loss_per_category"]["even"] < lines[0]["loss_per_category"]["even"]
    assert lines[-1]["loss_per_category"]["odd"] < lines[0]["loss_per_category"]["odd"]


def test_balancing_flag_controls_the_bias_update():
    data = toy_data()
    biases = {}
    for balance in (True, False):
        torch.manual_seed(0)
        model = ZayaForCausalLM(get_config("debug"))
        train(model, data, TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, balance=balance))
        biases[balance] = torch.stack([r.balancing_biases[:16] for r in model.routers()])
    assert biases[True].abs().max() > 0  # the balancer moved the biases
    assert biases[False].abs().max() == 0  # off: they stay at their init


def test_checkpoint_is_atomic_and_partial_saves_are_ignored(tmp_path):
    torch.manual_seed(0)
    model = ZayaForCausalLM(get_config("debug"))
    ck = tmp_path / "ck"
    train(model, toy_data(), TrainConfig(steps=4, batch_size=4, ckpt_every=2, keep_ckpts=2), ckpt_dir=ck)
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002", "step-00000004"]
    # what a kill in the middle of a save leaves behind: a hidden temp dir with a truncated file
    (ck / ".tmp-step-00000006-x").mkdir()
    (ck / ".tmp-step-00000006-x" / "state.pt").write_bytes(b"\x80\x02trunc")
    assert latest_checkpoint(ck).name == "step-00000004"
    st = torch.load(latest_checkpoint(ck) / "state.pt", weights_only=False)
    assert {"model", "optimizer", "balancer", "rng", "step", "history"} <= set(st)
    assert set(st["optimizer"]) == {"muon", "adamw"} and st["step"] == 4


WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from zaya_lib.config import get_config
    from zaya_lib.model import ZayaForCausalLM
    from tests.test_trainer import toy_data
    from zaya_lib.train.trainer import TrainConfig, train
    out = sys.argv[1]
    torch.manual_seed(0)
    model = ZayaForCausalLM(get_config("debug"))
    cfg = TrainConfig(steps=14, batch_size=4, lr=5e-3, warmup_steps=2, decay_frac=0.3, log_every=1, ckpt_every=1,
                      keep_ckpts=2, seed=1)
    train(model, toy_data(), cfg, ckpt_dir=out + "/ck", metrics_path=out + "/m.jsonl", resume=True)
    torch.save(model.state_dict(), out + "/final.pt")
""")


def _run(script, out, **kw):
    env = {**os.environ, "ZAYA_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, str(out)], env=env, cwd=ROOT, **kw)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    script = WORKER.format(root=str(ROOT))
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), cut.mkdir()
    p_ref = _run(script, ref)
    p_cut = _run(script, cut, stderr=subprocess.PIPE)
    # kill the second run with SIGKILL a few checkpoints in (ckpt_every=1: the kill likely lands inside a save)
    deadline = time.time() + 120
    while time.time() < deadline and p_cut.poll() is None:
        if (cut / "ck" / "step-00000005").exists():
            time.sleep(0.05)
            break
        time.sleep(0.01)
    assert p_cut.poll() is None, f"worker ended before it could be killed: {p_cut.stderr.read().decode()[-2000:]}"
    p_cut.send_signal(signal.SIGKILL)
    p_cut.wait()
    killed_at = latest_checkpoint(cut / "ck")
    assert killed_at is not None and not (cut / "final.pt").exists()
    assert p_ref.wait(timeout=180) == 0
    p_res = _run(script, cut)  # same command: resumes from the newest complete checkpoint
    assert p_res.wait(timeout=180) == 0
    ref_log = (ref / "m.jsonl").read_text().splitlines()
    cut_log = (cut / "m.jsonl").read_text().splitlines()
    drop = ("tokens_per_s",)  # wall-clock; everything else must match bit for bit
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]
    assert len(ref_log) == 14 and strip(cut_log) == strip(ref_log)
    a, b = torch.load(ref / "final.pt"), torch.load(cut / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ after resume"


def test_params_fail_fast_naming_the_key():
    with pytest.raises(ValueError, match="pretrain_context.*positive"):
        check_phase_params("pretrain", "pretrain_phase1", 0, 16, 10)
    with pytest.raises(ValueError, match="midtrain_context=64 is impossible.*100 tokens"):
        check_phase_params("midtrain", "midtrain", 64, 4, 10, longest_answer=100)
    with pytest.raises(ValueError, match="pretrain_mixture.*unknown mixture 'nope'"):
        check_phase_params("pretrain", "nope", 256, 16, 10)
    with pytest.raises(ValueError, match="pretrain_mixture.*negative"):
        check_phase_params("pretrain", {"web": -1.0, "code": 1.0}, 256, 16, 10)
    with pytest.raises(ValueError, match="pretrain_batch_size"):
        check_phase_params("pretrain", "pretrain_phase1", 256, 0, 10)
    with pytest.raises(ValueError, match="context 33 is not divisible by cp_world_size 2"):
        TrainConfig(steps=1, batch_size=4, cp_world_size=2).validate(seq_len=33, world_size=2)
    with pytest.raises(ValueError, match="batch_size 5 is not divisible by 2"):
        TrainConfig(steps=1, batch_size=5).validate(seq_len=32, world_size=2)
    assert check_context_budget("x", 128, longest_answer=128) == 128

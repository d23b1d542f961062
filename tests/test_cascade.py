"""The RL cascade: one real TRL GRPO step of every stage on the `debug` preset (with and without LoRA), the
momentum-free Muon wrapper, fail-fast validation, resume, one-step-stale rollouts with importance correction, and the
absence of any router aux loss."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from zaya_lib.data.aggregation import fixed_overhead
from zaya_lib.data.tasks import make_problems
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.rl import cascade as C
from zaya_lib.rl.muon import muon_adamw
from zaya_lib.rl.sandbox import isolation_mode
from zaya_lib.train.optim import newton_schulz_batched, split_params

from _helpers import problem_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    probs = [p for t in ("add", "sub", "linear_eq") for p in make_problems(t, 60)]
    rules = "Describe a walk through a forest. Follow these rules exactly: words answer json bullet"
    return problem_tokenizer(probs, [rules] * 5, vocab_size=300)


def _tiny(stage: C.RLStage, **kw) -> C.RLStage:
    """A stage shrunk to one optimizer step of 2 prompts x 2 completions of 8 tokens."""
    base = dict(steps=1, num_generations=2, prompts_per_step=2, max_completion_length=8, agg_tau=6,
                steps_per_generation=1, code_tests=2)
    return replace(stage, **(base | kw))


STAGES = C.default_cascade()


# ---------------------------------------------------------------------------------------------------- each stage
@pytest.mark.parametrize("index", range(4), ids=[s.name for s in STAGES])
def test_one_grpo_step_of_each_stage(tok, index):
    stage = _tiny(STAGES[index], prompts_per_step=3)
    if stage.agg_ratio > 0:
        stage = replace(stage, agg_ratio=1.0)  # every math prompt of this one step becomes an aggregation prompt
    model = tiny_model(tok)
    gym = C.Gym(stage.gym_envs, seed=0, samples_per_prompt=stage.num_generations) if stage.gym_envs else None
    res = C.run_stage(model, tok, stage, gym=gym, seed=0)
    train_logs = [l for l in res["log"] if "reward" in l]
    assert len(train_logs) == 1 and train_logs[0]["step"] == 1  # exactly one optimizer step ran
    for r in stage.rewards:  # every reward of the stage was logged (None = no row of its kind in this batch)
        assert f"rewards/{r}/mean" in train_logs[0]
    assert 0.0 <= train_logs[0]["reward"] <= sum(stage.reward_weights or [1.0] * len(stage.rewards))
    assert len(res["routing"]) == 1 and res["routing"][0]["max_over_mean"] >= 1.0  # max load >= mean load
    if stage.agg_ratio > 0:
        assert res["aggregation_prompts"] == sum(n for src, n in res["sources"].items() if src.startswith("tasks/"))
        assert res["aggregation_prompts"] >= 1
    if gym is not None:  # the adaptive gym's reward recorded every completion for its controllers
        assert gym.n_recorded == stage.batch_size
    runs_code = "code" in stage.rewards  # the stage records how its model-written code was contained
    assert res["sandbox_isolation"] == (isolation_mode() if runs_code else None)
    if runs_code:
        assert res["sandbox_isolation"] in ("namespaces+uid", "userns")


def test_code_stage_refuses_before_it_starts_without_a_sandbox(tok, monkeypatch):
    """No namespace and no opt-in: a stage with code rewards fails at once, saying why, before any data or step."""
    import os

    from zaya_lib.rl import sandbox

    monkeypatch.setitem(sandbox._PROBE, os.geteuid(), (None, "userns: unshare(...): Operation not permitted"))
    monkeypatch.delenv(sandbox.ALLOW_WEAK_ENV, raising=False)
    stage = _tiny(STAGES[2])
    built = []
    monkeypatch.setattr(C, "build_stage_dataset", lambda *a, **k: built.append(1))
    with pytest.raises(sandbox.SandboxUnavailable, match=f"RL stage 'math_code_ttc' runs model-written code.*"
                       f"{sandbox.ALLOW_WEAK_ENV}=1"):
        C.run_stage(tiny_model(tok), tok, stage, seed=0)
    assert not built


def test_behavioural_step_changes_weights_full_and_lora(tok):
    """A random model earns partial instruction credit (e.g. 'no commas'), so the group has reward variance and one
    step must move the weights: all parameter kinds without LoRA; only merged LoRA deltas with it."""
    stage = _tiny(C.RLStage("if", {"instruct": 1.0}, ["instruction"], learning_rate=1e-2), prompts_per_step=4,
                  num_generations=4, max_completion_length=12)
    full = tiny_model(tok, seed=1)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    res = C.run_stage(full, tok, stage, seed=1)  # a draw whose groups differ (not all do: seed 3's 4 groups are flat)
    assert res["log"][0]["frac_reward_zero_std"] < 1, "no reward variance in any group: nothing to learn from"
    changed = {k for k, v in full.state_dict().items() if not torch.equal(v, before[k])}
    assert any("experts" in k for k in changed) and any("q_proj" in k for k in changed)
    assert any("embed_tokens" in k for k in changed)  # AdamW part moved too

    lora = tiny_model(tok, seed=1)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    res_l = C.run_stage(lora, tok, replace(stage, lora=True), seed=1)
    n_total = sum(p.numel() for p in lora.parameters())
    assert 0 < res_l["trainable_params"] < n_total / 2  # adapters only
    assert type(lora) is ZayaForCausalLM and not any("lora" in k for k in lora.state_dict())  # merged back
    changed = {k for k, v in lora.state_dict().items() if not torch.equal(v, before[k])}
    # lora_B starts at 0, so after one step the merged delta B @ A is non-zero only through B's first update
    assert changed and all(any(t in k for t in ("proj", "experts", "balancing")) for k in changed)
    assert any("q_proj" in k for k in changed)  # the adapters on the fused q|k|v projections are in the forward
    assert not any("embed_tokens" in k or "norm" in k for k in changed)  # frozen under LoRA


# ---------------------------------------------------------------------------------------------------- rollouts
def test_engine_rollout_returns_what_trl_would_sample(tok):
    """The engine rollout tokenises prompts as TRL does, returns one completion per (repeated) prompt that either ends
    at its first <|end|> or fills max_completion_length, draws the same tokens as the Engine with that seed, and
    draws fresh ones on the next call."""
    from types import SimpleNamespace

    from zaya_lib.data.tokenizer import render_chat
    from zaya_lib.ttc.engine import Engine

    stage = _tiny(STAGES[0], max_completion_length=10, temperature=1.0)
    model = tiny_model(tok, seed=2)
    prompts = [render_chat(p.question) for p in make_problems("add", 3)] * 2
    trainer = SimpleNamespace(model=model, processing_class=tok, eos_token_ids=[tok.eos_token_id])
    roll = C.engine_rollout(stage, seed=5)
    out = roll(prompts, trainer)
    assert out["prompt_ids"] == [list(x) for x in tok(text=prompts)["input_ids"]]
    assert out["logprobs"] is None and len(out["completion_ids"]) == len(prompts)
    eos = tok.eos_token_id
    for c in out["completion_ids"]:
        assert (c and c[-1] == eos and eos not in c[:-1]) or (len(c) == 10 and eos not in c)
    ref = Engine(model, tok, batch_size=128).generate(out["prompt_ids"], 10, temperature=1.0, seed=5 * 1_000_003)
    assert [c[:len(r)] for c, r in zip(out["completion_ids"], ref.token_ids)] == ref.token_ids
    assert roll(prompts, trainer)["completion_ids"] != out["completion_ids"]  # the next call draws anew
    assert C.engine_rollout(stage, seed=5)(prompts, trainer)["completion_ids"] == out["completion_ids"]


def test_unknown_rollout_backend_fails_at_once():
    with pytest.raises(ValueError, match="rollout='vllm'"):
        C.validate_stages([replace(STAGES[0], rollout="vllm")])


# ---------------------------------------------------------------------------------------------------- async / IS
def _first_of_two_steps(stage: C.RLStage, model, tok):
    """A real GRPOTrainer that generated rollouts for two steps (steps_per_generation=2) and took the first one."""
    from trl import GRPOTrainer

    ds = C.build_stage_dataset(stage, tok, seed=0)
    args = C.make_grpo_config(stage, "/tmp/zaya-test-trl", seed=0, max_steps=1)
    tr = GRPOTrainer(model=model, reward_funcs=C.make_reward_funcs(stage, tok), args=args,
                     train_dataset=ds.as_iterable(), processing_class=tok,
                     optimizers=(muon_adamw(model, lr=stage.learning_rate), None))
    tr.train()
    return tr


def test_steps_per_generation_gives_one_step_stale_rollouts_with_importance_ratio(tok):
    """With steps_per_generation=2 TRL generates two steps of rollouts at once and, since grad accumulation (1) is not a
    multiple of 2, stores the sampling policy's log-probs: the second half is trained one step later against them."""
    stage = _tiny(C.RLStage("if", {"instruct": 1.0}, ["instruction"]), steps=2, steps_per_generation=2)
    tr = _first_of_two_steps(stage, tiny_model(tok), tok)
    assert len(tr._buffered_inputs) == 2  # one generation served two optimizer steps
    stale = tr._buffered_inputs[1]
    assert "old_per_token_logps" in stale  # behaviour-policy log-probs kept for the importance ratio
    assert stale["old_per_token_logps"].shape == stale["completion_ids"].shape


def test_trl_scores_each_completion_as_it_would_alone(tok):
    """The log-probs TRL's loss starts from (left-padded prompts, right-padded completions, `logits_to_keep`, logits
    over the sampling temperature) equal each prompt + completion scored alone, unpadded, by the same weights. A
    mismatch here (padding leaking into the convs or the value delay, positions, an off-by-one in the kept logits)
    would train the policy on log-probs of tokens it did not sample. fp32; measured max |diff| ~1e-5 on the tiny SFT
    checkpoint, 1e-4 allowed (the batched and single GEMMs reduce in different orders)."""
    import copy

    stage = _tiny(C.RLStage("mix", {"tasks/add": 1.0, "tasks/linear_eq": 1.0}, ["math"]), steps=2,
                  steps_per_generation=2, prompts_per_step=3, temperature=0.7)
    model = tiny_model(tok)
    before = copy.deepcopy(model).eval()  # the weights that sampled (and scored) the stale half
    b = _first_of_two_steps(stage, model, tok)._buffered_inputs[1]
    pm, cm = b["prompt_mask"].bool(), b["completion_mask"].bool()
    assert len({int(n) for n in pm.sum(1)}) > 1, "the test needs prompts of different lengths (padding)"
    worst = 0.0
    with torch.no_grad():
        for i in range(b["completion_ids"].shape[0]):
            p, c = b["prompt_ids"][i][pm[i]], b["completion_ids"][i][cm[i]]
            logits = before(input_ids=torch.cat([p, c])[None]).logits[0, len(p) - 1:-1].float() / stage.temperature
            ref = torch.log_softmax(logits, -1).gather(-1, c[:, None])[:, 0]
            worst = max(worst, (ref - b["old_per_token_logps"][i][cm[i]]).abs().max().item())
    assert worst < 1e-4, worst


# ---------------------------------------------------------------------------------------------------- router aux loss
def test_no_router_aux_loss(tok):
    stage = _tiny(STAGES[0])
    args = C.make_grpo_config(stage, "/tmp/zaya-test-trl")
    assert args.router_aux_loss_coef == 0.0
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        C.make_grpo_config(stage, "/tmp/zaya-test-trl", router_aux_loss_coef=0.01)
    from trl import GRPOTrainer

    model = tiny_model(tok)
    tr = GRPOTrainer(model=model, reward_funcs=C.make_reward_funcs(stage, tok), args=args,
                     train_dataset=C.build_stage_dataset(replace(stage, sources={"tasks/add": 1.0}), tok).as_iterable(),
                     processing_class=tok)
    assert tr.aux_loss_enabled is False and tr.router_aux_loss_coef == 0.0
    C.assert_no_router_aux_loss(tr)
    tr.router_aux_loss_coef, tr.aux_loss_enabled = 0.01, True  # what TRL does with a non-zero coefficient
    with pytest.raises(RuntimeError, match="aux loss"):
        C.assert_no_router_aux_loss(tr)


# ---------------------------------------------------------------------------------------------------- Muon
def test_muon_groups_only_2d_hidden_weights(tok):
    model = tiny_model(tok)
    parts = split_params(model)
    assert parts["muon"] and all(p.ndim == 2 for _, p in parts["muon"])
    assert not any("embed_tokens" in n or "lm_head" in n for n, _ in parts["muon"])
    assert {n.rsplit(".", 1)[-1] for n, _ in parts["expert_muon"]} == {"gate_up_proj", "down_proj"}
    adam = dict(parts["adamw"])
    assert "model.embed_tokens.weight" in adam and all(p.ndim != 2 or "embed" in n for n, p in adam.items())
    assert any(p.ndim == 3 for p in adam.values())  # the depthwise convs are 3-D but not experts: AdamW
    n_all = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(v) for v in parts.values()) == n_all


def test_per_expert_update_is_near_orthogonal_and_momentum_free(tok):
    model = tiny_model(tok)
    opt = muon_adamw(model, lr=0.1)
    W = model.model.layers[0].mlp.experts.gate_up_proj  # [E, 2F, D]: rectangular, so well conditioned
    g = torch.randn_like(W)
    g[3] = 0.0  # an expert that received no token
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    W.grad = g.clone()
    w0 = W.detach().clone()
    opt.step()
    A, B = W.shape[1:]
    upd = (w0 - W.detach()) / (0.1 * 0.2 * max(A, B) ** 0.5)
    assert torch.equal(W[3], w0[3])  # zero gradient slice: no update
    for e in (0, 5, 15):
        s = torch.linalg.svdvals(upd[e])
        # quintic NS maps singular values into ~[0.7, 1.2] (not exactly 1, by design); 0.5..1.5 leaves margin
        assert 0.5 < float(s.min()) and float(s.max()) < 1.5, s
        U, _, Vh = torch.linalg.svd(g[e], full_matrices=False)
        cos = float((upd[e] * (U @ Vh)).sum() / (upd[e].norm() * (U @ Vh).norm()))
        assert cos > 0.95  # aligned with the exact polar factor U V^T of the gradient
    # no momentum: the same gradient again gives the same step (a momentum buffer would change it)
    w1 = W.detach().clone()
    W.grad = g.clone()
    opt.step()
    torch.testing.assert_close(w1 - W.detach(), w0 - w1, atol=1e-6, rtol=1e-4)
    # the torch.optim.Muon part is momentum-free too
    assert all(grp["momentum"] == 0.0 and grp["nesterov"] is False for grp in opt.opts["muon"].param_groups)
    assert not opt.opts["expert_muon"].state  # no momentum buffer is even kept for the experts
    assert torch.allclose(newton_schulz_batched(torch.zeros(2, 4, 3)), torch.zeros(2, 4, 3))


def test_param_groups_are_live_for_the_lr_schedule(tok):
    model = tiny_model(tok)
    opt = muon_adamw(model, lr=1e-3)
    assert set(opt.opts) == {"muon", "expert_muon", "adamw"}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s + 1))
    for o in opt.opts.values():
        assert all(g["lr"] == pytest.approx(5e-4) for g in o.param_groups)
    opt.load_state_dict(opt.state_dict())  # accelerate does this on prepare: groups must stay the sub-optimizers'
    sched.step()
    for o in opt.opts.values():
        assert all(g["lr"] == pytest.approx(2.5e-4) for g in o.param_groups)
    base = muon_adamw(model, lr=1e-3, muon=False)
    assert set(base.opts) == {"adamw"}  # the AdamW baseline of the notebook's comparison


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, match", [
    (dict(sources={"env/no_such_env": 1.0}, rewards=["gym"]), "no_such_env"),
    (dict(sources={"gym": 1.0}, rewards=["gym"], gym_envs=("add", "nope_env")), "nope_env"),
    (dict(sources={"tasks/add": 1.0}, rewards=["math", "no_such_reward"]), "no_such_reward"),
    (dict(sources={"tasks/not_a_task": 1.0}, rewards=["math"]), "not_a_task"),
    (dict(sources={"code/sum_list": 1.0}, rewards=["math"]), "code/sum_list"),  # no reward judges code rows
    (dict(sources={"webpages": 1.0}, rewards=["math"]), "webpages"),
])
def test_unknown_env_or_reward_fails_at_once(tok, tmp_path, bad, match):
    stages = [_tiny(STAGES[0]), _tiny(C.RLStage("bad", **bad))]
    with pytest.raises(ValueError, match=match):
        C.validate_stages(stages)
    model = tiny_model(tok)
    w = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=match):  # the valid first stage never runs
        C.run_cascade(model, tok, stages, tmp_path / "ckpt")
    assert torch.equal(w, model.model.embed_tokens.weight) and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_skips_finished_stages(tok, tmp_path, monkeypatch):
    stages = [_tiny(C.RLStage("if", {"instruct": 1.0}, ["instruction"], learning_rate=1e-2), prompts_per_step=4,
                    num_generations=4, max_completion_length=12),
              _tiny(STAGES[1], gym_envs=("add", "compare"))]
    model = tiny_model(tok)
    first = C.run_cascade(model, tok, stages, tmp_path / "rl", seed=0)
    assert [r["skipped"] for r in first] == [False, False]
    for i, s in enumerate(stages):
        d = C.stage_dir(tmp_path / "rl", i, s)
        assert (d / "stage_done.json").is_file() and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    gym_state = json.loads((C.stage_dir(tmp_path / "rl", 1, stages[1]) / "gym_state.json").read_text())
    assert gym_state["n_recorded"] == stages[1].batch_size  # the gym's record travels with the checkpoint
    assert not list((tmp_path / "rl").glob(".*tmp*"))  # no temp folders left behind

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(C, "run_stage", boom)
    fresh = tiny_model(tok, seed=7)
    again = C.run_cascade(fresh, tok, stages, tmp_path / "rl", seed=0)
    assert [r["skipped"] for r in again] == [True, True]
    sd_saved = ZayaForCausalLM.from_pretrained(C.stage_dir(tmp_path / "rl", 1, stages[1])).state_dict()
    for k, v in fresh.state_dict().items():  # the last finished stage's weights (and biases) were loaded
        torch.testing.assert_close(v, sd_saved[k])
    # resume from the middle: stage 1 done, stage 2's folder gone -> only stage 2 runs
    import shutil

    shutil.rmtree(C.stage_dir(tmp_path / "rl", 1, stages[1]))
    ran = []
    monkeypatch.setattr(C, "run_stage", lambda m, t, s, *a, **k: ran.append(s.name) or {"stage": s.name})
    C.run_cascade(tiny_model(tok), tok, stages, tmp_path / "rl", seed=0)
    assert ran == [stages[1].name]
    with pytest.raises(ValueError, match="different config"):
        C.run_cascade(tiny_model(tok), tok, [replace(stages[0], learning_rate=0.5), stages[1]], tmp_path / "rl")


# ---------------------------------------------------------------------------------------------------- helpers
def test_aggregation_rows(tok):
    stage = _tiny(STAGES[2], prompts_per_step=4, agg_ratio=1.0, sources={"tasks/add": 1.0}, agg_k=2, agg_tau=5)
    model = tiny_model(tok)
    ds = C.build_stage_dataset(stage, tok, model=model, seed=0)
    rows = [ds[i] for i in range(len(ds))]
    assert all(r["aggregation"] == 1 and "[Attempt 2]" in r["prompt"] for r in rows)
    for r in rows:  # the Markovian bound, exactly: problem + K tails of <= tau tokens + fixed wording
        n_q = len(tok(r["question"], add_special_tokens=False)["input_ids"])
        meta = json.loads(r["metadata"])
        assert len(meta["tail_ids"]) == stage.agg_k and max(meta["tail_ids"]) <= stage.agg_tau
        assert meta["prompt_ids"] == n_q + sum(meta["tail_ids"]) + fixed_overhead(tok, stage.agg_k)
        assert len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= stage.max_prompt_length

"""The four-stage RL cascade [ZAYA1 report, post-training; spec test_time_compute_and_rl.md §3-§5], as data run by one
loop over TRL's `GRPOTrainer`.

A cascade is a list of `RLStage` records (data sources and weights, reward functions by name, lengths, learning rate,
steps, group size, temperature, optimizer, ...). `run_cascade` validates the whole list first (an unknown source,
environment, task or reward fails at once, naming it), then runs each stage with the same code path, and checkpoints
after each one. `default_cascade()` is the paper's shape at CPU scale:
  (1) reasoning warmup on math and puzzles (tasks.py problems + reasoning-gym puzzles);
  (2) the adaptive RLVE-style gym curriculum (`zaya_lib.rl.gym`: per-environment difficulty rises with accuracy);
  (3) math and code with test-time-compute prompts: a fraction `agg_ratio` of the math prompts become Markovian RSA
      aggregation prompts (`zaya_lib.data.aggregation.build_aggregation_prompt_ids`, the one builder shared with SFT
      and inference) whose K tails are the last tau tokens of the policy's own samples, drawn at the start of the stage
      (self-aggregation with a policy at most one stage old), plus synthetic code environments (`code_envs.py`);
  (4) behavioural RL for chat and instruction following (verifiable format constraints from `verifiers.py`), with a
      share of math prompts kept in the mix so reasoning is not forgotten.

Notable features:
- Sources: `tasks/<task>` (tasks.py, train split only, difficulty drawn from `difficulties`), `env/<name>` (a gym
  environment at a fixed level), `gym` (the adaptive `Gym` over `gym_envs`, sampled lazily so a row's difficulty is
  the controller's level when the row is consumed), `rg/<dataset>` (a raw reasoning-gym dataset), `code/<template>`,
  `instruct`. Each row carries a `kind`; every reward is applied only to the kinds it can judge (None elsewhere, TRL's
  "not applicable"), and a stage whose source kind no reward judges is rejected up front.
- Rewards see the completion decoded WITH its `<think>`/`</think>` tokens (TRL decodes with skip_special_tokens=True,
  which would delete the thinking delimiters, so the verifiers' "judge the text after `</think>`" rule and the format
  reward would silently judge the reasoning too).
- Prompts are plain chat text (`<bos><|user|>...<|end|><|assistant|>`), identical to what SFT trained on. TRL 1.16
  has no `max_prompt_length`; each stage checks every prompt's token length against its own `max_prompt_length` when
  the data is built, and an aggregation prompt's length is bounded by construction (problem + K * tau + wording).
- Checkpoints between stages: `ckpt_root/stageN_<name>/` holds `save_pretrained` weights (LoRA merged), the tokenizer,
  the gym state, the balancing optimizer's state, the stage's logs and a `stage_done.json` marker; the folder is
  written under a temporary name and renamed in one `os.replace`, so it exists complete or not at all. A rerun skips
  every finished stage (loading the last one's weights, gym and balancer) and continues with the next; a finished
  stage whose recorded config differs from the current one is an error, not a silent skip.

Routing during RL (ZAYA1 balances experts with per-expert biases, never an auxiliary loss):
- TRL 1.16 adds a Mixtral-style load-balancing loss only when `router_aux_loss_coef` (GRPOConfig, else the model
  config's) is non-zero; our config has no such field, and we pass `router_aux_loss_coef=0.0` explicitly and assert
  `trainer.aux_loss_enabled is False` before training (`assert_no_router_aux_loss`). With a non-zero coefficient TRL
  would also crash on our 17 router classes (environment.md appendix §2).
- DECISION: the balancing biases are FROZEN during RL (`RLStage.balance=False`; `BalancingCallback` then only
  records the step's routing load and resets the counts; `balance=True` steps them with
  `model.update_balancing_biases()` after every optimizer step). Measured on the tiny profile (same SFT weights, same
  prompts and seed, held-out pass@1 on 150 problems, paired): 8 steps of stage 1 changed held-out accuracy by -0.027
  with frozen biases against -0.060 with updating ones (SE 0.023-0.025; at lr 5e-5: -0.013 against -0.033), and a
  24-step stage 1 by -0.007 against -0.020. Over the whole cascade of that time (lr 2e-4, levels 2-4, which lost
  accuracy in every stage) both ended at -0.067: freezing is not what fixes RL, it only stops one source of loss.
  Expert load stayed within the same range either way
  (max/mean 4.4 updating vs 5.0 frozen), because RL is short next to SFT and a few dozen bias steps at balance_lr 1e-2
  move a bias by < 0.3. Why updating hurts: RL prompts and answers are short and narrow, so re-balancing toward
  their token distribution re-routes tokens the experts were trained on during SFT, a policy change that the
  reward never asked for. Notebook 06 repeats the measurement in every run (`metrics["balancing"]`). Pretraining and
  SFT keep the update on: there it is what stops the experts collapsing (calibration.md).
  The bias step would also change routing between generation and training; the importance ratio below measures
  that too (old log-probs are computed with the biases of generation time).

Rollouts (asynchronous generation, one step off-policy):
- On a GPU the production setting is TRL's vLLM mode: `GRPOConfig(use_vllm=True, vllm_mode="server")` with a
  `trl vllm-serve` process on other GPUs (or `vllm_mode="colocate"` sharing the training GPU), weights synced every
  step, and `vllm_importance_sampling_correction=True` (`vllm_importance_sampling_mode` token/sequence, truncate or
  mask, clip `vllm_importance_sampling_clip_max`) to correct the sampler/trainer mismatch; TRL's
  `trl.experimental.async_grpo.AsyncGRPOTrainer` runs generation fully asynchronously against a vLLM server with
  `max_staleness` bounding how many policy versions old a sample may be.
- Here (CPU, no vLLM) we use TRL's own mechanism: `steps_per_generation=2`. Every second optimizer step TRL generates
  rollouts for the next TWO steps with the current weights theta_t; step t trains on the first half (on-policy) and
  step t+1 on the second half, which was generated by theta_t while the weights are now theta_{t+1}: off-policy by
  exactly one step, as an asynchronous generator running one step ahead would be. Because gradient_accumulation_steps
  (1) is not a multiple of steps_per_generation * num_iterations (2), TRL computes `old_per_token_logps` (log-probs
  of the sampled tokens under theta_t, no grad, at generation time) and the loss uses the clipped importance ratio
  pi_theta / pi_old per token (epsilon 0.2, `loss_type="dapo"`) — the correction TRL provides. `num_iterations=1`
  (each rollout is used once). On 2 CPU cores a background generation thread would only compete with training for
  the same cores, so the overlap itself is not emulated, only its staleness and its correction.
- Who samples (`RLStage.rollout`): "engine" (default) hands TRL a `rollout_func` (`engine_rollout`) that samples the
  groups with our batched engine, the vLLM of this repo: one prefill, the in-place KV cache, the folded decode step,
  the policy in eval mode (as it is evaluated). TRL's own `model.generate` ("transformers") kept the policy in
  training mode and took 65% of stage 1's time; with the engine, stage 1 of the tiny profile runs in 270 s instead
  of 379 s, and the forward/backward passes of the loss are what remains. LoRA stages decode through the model's
  forward (the folded step does not see adapters).

LoRA: `RLStage(lora=True)` wraps the policy with peft (`LORA_TARGETS`: the CCA projections; `target_parameters` for
the stacked experts, environment.md appendix §3), trains only the adapters, and merges them before the checkpoint.

Optimizer: momentum-free Muon + AdamW (`zaya_lib.rl.muon.muon_adamw`, `RLStage.optimizer="muon"`) or AdamW everywhere
(`"adamw"`), passed to TRL as `optimizers=(opt, None)`; TRL's scheduler reaches both through the live param_groups.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from zaya_lib.data.aggregation import build_aggregation_prompt_ids, candidate_tail
from zaya_lib.data.answers import completion_to_text
from zaya_lib.data.tasks import DEFAULT_REASONING_SUITE, MAX_DIFFICULTY, TASKS, make_problems
from zaya_lib.data.tokenizer import encode_chat, render_chat
from zaya_lib.model.checkpoint import save_hf_checkpoint
from zaya_lib.rl import verifiers
from zaya_lib.rl.gym import BOXED_HINT, ENVIRONMENTS, Gym, get_environment
from zaya_lib.rl.muon import muon_adamw
from zaya_lib.ttc.backends import generate_ids
from zaya_lib.utils import atomic_dir, progress_enabled

__all__ = [
    "RLStage", "SOURCE_KINDS", "REWARD_KINDS", "LORA_TARGETS", "default_cascade", "validate_stages", "source_kind",
    "StageDataset", "build_stage_dataset", "make_reward_funcs", "make_grpo_config", "BalancingCallback",
    "assert_no_router_aux_loss", "run_stage", "run_cascade", "finished_stages", "stage_dir", "load_stage",
    "save_policy", "engine_rollout", "ROLLOUTS",
]

SOURCE_KINDS = ("tasks", "env", "gym", "rg", "code", "instruct")
ROLLOUTS = ("engine", "transformers")  # who samples the GRPO groups (RLStage.rollout, `engine_rollout`)
# Which row kinds each reward can judge; elsewhere it returns None (TRL: not applicable to this row).
REWARD_KINDS: dict[str, frozenset[str]] = {
    "math": frozenset({"tasks"}),
    "format": frozenset({"tasks", "env", "gym", "rg"}),
    "gym": frozenset({"env", "gym"}),
    "reasoning_gym": frozenset({"rg"}),
    "code": frozenset({"code"}),
    "instruction": frozenset({"instruct"}),
    "instruction_strict": frozenset({"instruct"}),
    "arithmetic_steps": frozenset({"tasks", "env", "gym"}),
}
# Every row has every column (one schema per dataset); unused ones are "" / 0.
COLUMNS = ("prompt", "kind", "source", "answer", "task", "question", "env", "difficulty", "problem", "tests",
           "constraints", "metadata", "aggregation")
LORA_TARGETS = dict(target_modules=["q_proj", "k_proj", "v_proj_current", "v_proj_delayed", "o_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
DONE_MARKER = "stage_done.json"


@dataclass
class RLStage:
    """One stage of the cascade. Batch per optimizer step = prompts_per_step * num_generations completions."""

    name: str
    sources: dict[str, float]                      # source -> sampling weight (see module docstring)
    rewards: list[str]                             # names in verifiers.REWARD_FUNCTIONS
    reward_weights: list[float] | None = None      # None: all 1
    steps: int = 20                                # optimizer steps
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    num_generations: int = 8                       # G, completions per prompt (the GRPO group)
    prompts_per_step: int = 4
    max_prompt_length: int = 256                   # checked on every prompt when the data is built
    max_completion_length: int = 96
    temperature: float = 1.0
    difficulties: tuple[int, ...] = (1, 2, 3)      # tasks.py levels for `tasks/*` sources (uniform)
    env_difficulty: int = 0                        # fixed level for `env/*` sources
    gym_envs: tuple[str, ...] = ()                 # environments of the adaptive gym (`gym` source)
    agg_ratio: float = 0.0                         # fraction of `tasks/*` prompts turned into aggregation prompts
    agg_k: int = 2                                 # tails per aggregation prompt
    agg_tau: int = 32                              # tokens per tail
    code_tests: int = 3                            # generated tests per code problem
    instruct_constraints: int = 2                  # constraints per instruction prompt
    optimizer: str = "muon"                        # "muon" (momentum-free Muon + AdamW) | "adamw"
    loss_type: str = "dapo"
    beta: float = 0.0                              # KL to a reference model (0: none loaded)
    epsilon: float = 0.2                           # PPO clip of the importance ratio
    steps_per_generation: int = 2                  # 2: half of every rollout batch is one step stale (docstring)
    balance: bool = False                          # balancing biases frozen during RL (the documented decision)
    lora: bool = False
    lora_rank: int = 8
    rollout: str = "engine"                        # "engine": our batched sampler; "transformers": TRL's generate

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations


def source_kind(source: str) -> str:
    return source.split("/", 1)[0]


def default_cascade(steps: Sequence[int] = (40, 20, 40, 16), lr: float = 5e-5, num_generations: int = 16,
                    prompts_per_step: int = 8, max_completion_length: int = 96, temperature: float = 0.8,
                    difficulties: Sequence[int] = (1, 2), agg_ratio: float = 0.5, agg_k: int = 2,
                    agg_tau: int = 32, optimizer: str = "muon", gym_envs: Sequence[str] | None = None,
                    lora: bool = False, balance: bool = False) -> list[RLStage]:
    """The paper's four stages at CPU scale. Stage 1 and 3 train on the held-out suite's task families (tasks.py,
    train split), so they are what moves held-out pass@1; stage 2 runs the adaptive gym over the same families
    (`tasks/<task>` environments) plus two others, and stage 4 adds the behavioural signal.

    The defaults are the tiny profile's calibration (notebook 06 and the README's RL notes): groups of 16 at
    temperature 0.8 on levels 1-2, where a tiny SFT model has mixed groups often enough for a learning signal (at
    8 samples, temperature 1 and levels 2-4, 75-90% of the groups had all-equal rewards), and a small learning rate
    (Muon's normalised step moves the weights by a fixed amount whatever the signal). Reasoning rows also get the
    arithmetic process reward at weight 0.5 (the fraction of right equations in the chain of thought): the tiny
    model's errors are single-step slips (`1+0=0`), and the outcome reward alone ranks a group only when one of its
    samples gets everything right (README, RL notes)."""
    if len(steps) != 4:
        raise ValueError(f"default_cascade: steps must list 4 stage lengths, got {list(steps)}")
    reasoning = {f"tasks/{t}": 1.0 for t in dict(DEFAULT_REASONING_SUITE)}  # the held-out suite's task families
    common = dict(learning_rate=lr, num_generations=num_generations, prompts_per_step=prompts_per_step,
                  max_completion_length=max_completion_length, temperature=temperature,
                  difficulties=tuple(difficulties), optimizer=optimizer, lora=lora, balance=balance)
    gym_envs = tuple(gym_envs) if gym_envs is not None else (*reasoning, "compare", "rg/chain_sum")
    steps_w = 0.5  # the arithmetic process reward (verifiers.arithmetic_steps_reward) next to the outcome rewards
    return [
        RLStage("reasoning_warmup", {**reasoning, "rg/gcd": 0.5, "env/rg/basic_arithmetic": 0.5},
                ["math", "gym", "reasoning_gym", "arithmetic_steps", "format"], [1.0, 1.0, 1.0, steps_w, 0.1],
                steps=steps[0], **common),
        RLStage("gym_curriculum", {"gym": 1.0}, ["gym", "arithmetic_steps", "format"], [1.0, steps_w, 0.1],
                steps=steps[1], gym_envs=gym_envs, **common),
        RLStage("math_code_ttc", {**reasoning, "code/sum_list": 0.3, "code/reverse_words": 0.3},
                ["math", "code", "arithmetic_steps", "format"], [1.0, 1.0, steps_w, 0.1], steps=steps[2],
                agg_ratio=agg_ratio, agg_k=agg_k, agg_tau=agg_tau, max_prompt_length=384, **common),
        RLStage("behavioural", {"instruct": 2.0, **{k: 1.0 / 3 for k in reasoning}},
                ["instruction", "math", "arithmetic_steps"], [1.0, 1.0, steps_w], steps=steps[3], **common),
    ]


# ---------------------------------------------------------------------------------------------------------- validation
def validate_stages(stages: Sequence[RLStage]) -> None:
    """Raise ValueError naming the stage and the offending entry, before any data is built or any step runs."""
    from zaya_lib.rl.code_envs import TEMPLATES

    if not stages:
        raise ValueError("RL cascade: empty stage list")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"RL cascade: duplicate stage names {names}")
    for s in stages:
        where = f"RL stage {s.name!r}"
        if not s.name or "/" in s.name:
            raise ValueError(f"{where}: the name must be non-empty and contain no '/'")
        if not s.sources:
            raise ValueError(f"{where}: no data sources")
        for src, w in s.sources.items():
            kind = source_kind(src)
            rest = src[len(kind) + 1:]
            if kind not in SOURCE_KINDS:
                raise ValueError(f"{where}: unknown source {src!r}; a source starts with one of {list(SOURCE_KINDS)}")
            if not (isinstance(w, (int, float)) and w > 0):
                raise ValueError(f"{where}: source {src!r} has weight {w!r}; weights must be positive numbers")
            if kind == "tasks" and rest not in TASKS:
                raise ValueError(f"{where}: unknown task {rest!r} in source {src!r}; known: {sorted(TASKS)}")
            if kind == "env" and rest not in ENVIRONMENTS:
                raise ValueError(f"{where}: unknown environment {rest!r} in source {src!r}; known: {sorted(ENVIRONMENTS)}")
            if kind == "code" and rest not in TEMPLATES:
                raise ValueError(f"{where}: unknown code environment {rest!r} in source {src!r}; known: {sorted(TEMPLATES)}")
            if kind == "rg":
                from reasoning_gym.factory import DATASETS

                if rest not in DATASETS:
                    raise ValueError(f"{where}: unknown reasoning-gym dataset {rest!r} in source {src!r}")
            if kind in ("gym", "instruct") and rest:
                raise ValueError(f"{where}: source {src!r} takes no name (write {kind!r})")
        if "gym" in s.sources:
            if not s.gym_envs:
                raise ValueError(f"{where}: source 'gym' needs gym_envs (the environments of the curriculum)")
            for e in s.gym_envs:
                if e not in ENVIRONMENTS:
                    raise ValueError(f"{where}: unknown environment {e!r} in gym_envs; known: {sorted(ENVIRONMENTS)}")
        if s.rollout not in ROLLOUTS:
            raise ValueError(f"{where}: rollout={s.rollout!r}; choose one of {list(ROLLOUTS)}")
        if not s.rewards:
            raise ValueError(f"{where}: no reward functions")
        for r in s.rewards:
            if r not in verifiers.REWARD_FUNCTIONS or r not in REWARD_KINDS:
                raise ValueError(f"{where}: unknown reward {r!r}; known: {sorted(REWARD_KINDS)}")
        if s.reward_weights is not None and len(s.reward_weights) != len(s.rewards):
            raise ValueError(f"{where}: {len(s.reward_weights)} reward_weights for {len(s.rewards)} rewards")
        judged = set().union(*(REWARD_KINDS[r] for r in s.rewards))
        for src in s.sources:
            if source_kind(src) not in judged:
                raise ValueError(f"{where}: no reward judges source {src!r} (kind {source_kind(src)!r}); add one of "
                                 f"{sorted(r for r, k in REWARD_KINDS.items() if source_kind(src) in k)}")
        for key in ("steps", "num_generations", "prompts_per_step", "max_prompt_length", "max_completion_length",
                    "agg_k", "agg_tau", "steps_per_generation", "code_tests", "lora_rank"):
            v = getattr(s, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{where}: {key} must be a positive int, got {v!r}")
        if s.num_generations < 2:
            raise ValueError(f"{where}: num_generations must be >= 2 (GRPO advantages are relative to the group)")
        if not s.learning_rate > 0 or not s.temperature > 0:
            raise ValueError(f"{where}: learning_rate and temperature must be positive")
        if not 0.0 <= s.agg_ratio <= 1.0:
            raise ValueError(f"{where}: agg_ratio must be in [0, 1], got {s.agg_ratio}")
        if s.agg_ratio > 0 and not any(source_kind(x) == "tasks" for x in s.sources):
            raise ValueError(f"{where}: agg_ratio > 0 needs a tasks/* source (aggregation prompts are built from them)")
        if any(source_kind(x) == "tasks" for x in s.sources):
            bad = [d for d in s.difficulties if not (isinstance(d, int) and 1 <= d <= MAX_DIFFICULTY)]
            if bad or not s.difficulties:
                raise ValueError(f"{where}: difficulties must be ints in 1..{MAX_DIFFICULTY}, got {s.difficulties}")
        if s.optimizer not in ("muon", "adamw"):
            raise ValueError(f"{where}: optimizer must be 'muon' or 'adamw', got {s.optimizer!r}")
        if not 1 <= s.instruct_constraints <= 4:
            raise ValueError(f"{where}: instruct_constraints must be in 1..4, got {s.instruct_constraints}")


# ---------------------------------------------------------------------------------------------------------- data
def _blank_row() -> dict:
    return {c: "" for c in COLUMNS} | {"difficulty": 0, "aggregation": 0}


class StageDataset(torch.utils.data.Dataset):
    """Rows of one stage; index i is a fixed row, except `gym` rows, which are drawn from the Gym the first time they are
    read (the controller's level at that moment). Reads are memoised: TRL reads each index once per completion."""

    def __init__(self, rows: list[dict | None], gym: Gym | None = None):
        self.rows, self.gym = rows, gym

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if self.rows[i] is None:
            g = self.gym.sample()
            self.rows[i] = _blank_row() | {"prompt": render_chat(g["prompt"]), "kind": "gym", "source": "gym",
                                           "answer": g["answer"], "env": g["env"], "difficulty": g["difficulty"],
                                           "problem": g["problem"], "question": g["prompt"]}
        return self.rows[i]

    def as_iterable(self):
        """A `datasets.IterableDataset` streaming these rows in order (TRL accepts only `datasets` types; streaming
        keeps the gym rows lazy). The rows are already in random source order, so no shuffle is needed."""
        from datasets import IterableDataset

        return IterableDataset.from_generator(_stream_rows, gen_kwargs={"ds": self})


def _stream_rows(ds: StageDataset):
    for i in range(len(ds)):
        yield ds[i]


def _make_row(src: str, stage: RLStage, rng: random.Random) -> dict:
    kind, rest = source_kind(src), src[len(source_kind(src)) + 1:]
    seed = rng.getrandbits(31)
    row = _blank_row() | {"kind": kind, "source": src}
    if kind == "tasks":
        p = make_problems(rest, 1, seed=seed, difficulty=rng.choice(stage.difficulties), split="train")[0]
        return row | {"prompt": render_chat(p.question), "answer": p.answer, "task": p.task, "question": p.question,
                      "difficulty": p.difficulty}
    if kind == "env":
        prob = get_environment(rest).generate(seed, stage.env_difficulty)
        return row | {"prompt": render_chat(prob["prompt"]), "answer": prob["answer"], "env": rest,
                      "difficulty": stage.env_difficulty, "problem": json.dumps(prob), "question": prob["prompt"]}
    if kind == "rg":
        import reasoning_gym

        e = reasoning_gym.create_dataset(rest, size=1, seed=seed)[0]
        q = f"{e['question']}\n{BOXED_HINT}"
        return row | {"prompt": render_chat(q), "answer": str(e["answer"]), "task": rest, "question": e["question"],
                      "metadata": json.dumps(e["metadata"], default=str)}
    if kind == "code":
        from zaya_lib.rl.code_envs import make_problem

        p = make_problem(rest, seed, n_tests=stage.code_tests)
        return row | {"prompt": render_chat(p["prompt"]), "task": rest, "question": p["prompt"],
                      "tests": json.dumps(p["tests"])}
    if kind == "instruct":
        ex = verifiers.sample_instruction_example(seed, k=stage.instruct_constraints)
        return row | {"prompt": render_chat(ex["prompt"]), "task": ex["task"], "question": ex["prompt"],
                      "constraints": ex["constraints"]}
    raise ValueError(f"unknown source kind {kind!r}")  # unreachable after validate_stages


def _aggregation_prompts(model, tokenizer, rows: list[dict], stage: RLStage, seed: int) -> None:
    """Turn `rows` (tasks rows) into Markovian RSA aggregation prompts, in place: K samples of the current policy per
    problem, their last tau tokens as tails, the shared builder for the prompt ids."""
    if not rows:
        return
    prompts = [encode_chat(tokenizer, r["question"])[0] for r in rows for _ in range(stage.agg_k)]
    comps = generate_ids(model, tokenizer, prompts, stage.max_completion_length, temperature=stage.temperature,
                         seed=seed)
    structural = {tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>", "<eos>", "<|system|>", "<|user|>",
                                                                "<|assistant|>")}
    for j, r in enumerate(rows):
        # A sampled turn marker ends the attempt (a weak policy may emit one); the tail is cut before it.
        cut = [c[:next((k for k, t in enumerate(c) if t in structural), len(c))]
               for c in comps[j * stage.agg_k:(j + 1) * stage.agg_k]]
        tails = [candidate_tail(tokenizer, c, stage.agg_tau) for c in cut]
        tails = [t for t in tails if t] or [encode_chat(tokenizer, "?")[0][-1:]]  # an empty sample still counts
        ids = build_aggregation_prompt_ids(tokenizer, r["question"], tails, tau=stage.agg_tau)
        # TRL takes text prompts and re-encodes them; a tail that is not valid UTF-8 (a weak policy's stray byte
        # tokens) can re-encode longer, so the re-encoded length is checked against max_prompt_length afterwards.
        r["prompt"] = tokenizer.decode(ids, skip_special_tokens=False)
        r["aggregation"] = 1
        r["metadata"] = json.dumps({"prompt_ids": len(ids), "tail_ids": [len(t) for t in tails]})


def build_stage_dataset(stage: RLStage, tokenizer, model=None, gym: Gym | None = None, seed: int = 0) -> StageDataset:
    """`steps * prompts_per_step` rows, rounded up to whole generation batches (one epoch of TRL's sampler), sources drawn by weight from a seeded RNG.
    Rows of `gym` are drawn lazily; a fraction `agg_ratio` of tasks rows become aggregation prompts (needs `model`).
    Every fixed prompt's token length is checked against `stage.max_prompt_length` here."""
    rng = random.Random(f"rl|{seed}|{stage.name}")
    srcs, weights = list(stage.sources), list(stage.sources.values())
    # TRL draws a generation batch of prompts_per_step * steps_per_generation prompts at a time: round the stage up to
    # whole generation batches, or a short dataset would end the epoch before `steps` optimizer steps
    S = stage.steps_per_generation
    n = -(-stage.steps // S) * S * stage.prompts_per_step
    rows: list[dict | None] = []
    for _ in range(n):
        src = rng.choices(srcs, weights)[0]
        rows.append(None if src == "gym" else _make_row(src, stage, rng))
    if "gym" in stage.sources and gym is None:
        raise ValueError(f"RL stage {stage.name!r}: source 'gym' needs a Gym instance")
    agg_rows = [r for r in rows if r is not None and r["kind"] == "tasks" and rng.random() < stage.agg_ratio]
    if agg_rows:
        if model is None:
            raise ValueError(f"RL stage {stage.name!r}: agg_ratio > 0 needs the policy model to sample tails")
        _aggregation_prompts(model, tokenizer, agg_rows, stage, seed)
    for r in rows:
        if r is not None:
            L = len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
            if L > stage.max_prompt_length:
                raise ValueError(f"RL stage {stage.name!r}: a {r['source']} prompt has {L} tokens > max_prompt_length="
                                 f"{stage.max_prompt_length} (raise it, or lower agg_k/agg_tau)")
    return StageDataset(rows, gym)


# ---------------------------------------------------------------------------------------------------------- rewards
class _KindReward:
    """A verifiers reward applied to the rows whose `kind` it judges; None for the others. Completions are re-decoded
    from `completion_ids` with special tokens kept (think delimiters matter to the verifiers)."""

    def __init__(self, name: str, fn: Callable, kinds: frozenset[str], tokenizer, per_kind: dict | None = None):
        self.__name__ = name  # TRL logs rewards/<__name__>/mean
        self.fn, self.kinds, self.tok, self.per_kind = fn, kinds, tokenizer, per_kind or {}

    def __call__(self, prompts, completions, completion_ids=None, **kw):
        n = len(completions)
        if completion_ids is not None:
            texts = self.tok.batch_decode([[t for t in c if t != self.tok.pad_token_id] for c in completion_ids],
                                          skip_special_tokens=False)
        else:
            texts = [completion_to_text(c) for c in completions]
        kinds = kw.get("kind") or [""] * n
        out: list[float | None] = [None] * n
        for kind in sorted(set(kinds) & self.kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            cols = {c: [kw[c][i] for i in idx] for c in COLUMNS if c in kw and isinstance(kw[c], list)}
            fn = self.per_kind.get(kind, self.fn)
            for i, v in zip(idx, fn([prompts[i] for i in idx], [texts[i] for i in idx], **cols)):
                out[i] = float(v)
        return out


def make_reward_funcs(stage: RLStage, tokenizer, gym: Gym | None = None) -> list[Callable]:
    """One TRL reward function per name in `stage.rewards`. `gym` on rows of the adaptive gym uses `gym.gym_reward`,
    which also records accuracy for the difficulty controllers; on `env/*` rows the stateless verifier."""
    funcs = []
    for name in stage.rewards:
        per_kind = {"gym": gym.gym_reward} if name == "gym" and gym is not None else None
        funcs.append(_KindReward(name, verifiers.get_reward(name), REWARD_KINDS[name], tokenizer, per_kind))
    return funcs


# ---------------------------------------------------------------------------------------------------------- trainer
def make_grpo_config(stage: RLStage, output_dir: str | os.PathLike, seed: int = 0, device: str = "cpu", **overrides):
    """GRPOConfig for a stage: CPU-safe flags (use_cpu, no bf16, no gradient checkpointing, no saving, no reporting),
    router aux loss explicitly 0, one-step-stale rollouts via steps_per_generation."""
    from trl import GRPOConfig

    if overrides.get("router_aux_loss_coef", 0.0) not in (0, 0.0, None):
        raise ValueError(f"router_aux_loss_coef={overrides['router_aux_loss_coef']}: ZAYA balances experts with biases, "
                         "not an auxiliary loss; the RL cascade keeps it at 0")
    kw = dict(
        output_dir=str(output_dir), use_cpu=device == "cpu", bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=seed, max_steps=stage.steps,
        per_device_train_batch_size=stage.batch_size, gradient_accumulation_steps=1,
        steps_per_generation=stage.steps_per_generation, num_iterations=1, num_generations=stage.num_generations,
        max_completion_length=stage.max_completion_length, temperature=stage.temperature,
        learning_rate=stage.learning_rate, lr_scheduler_type=stage.lr_scheduler, warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=stage.beta, loss_type=stage.loss_type, epsilon=stage.epsilon,
        reward_weights=stage.reward_weights, router_aux_loss_coef=0.0, remove_unused_columns=False,
        disable_tqdm=not progress_enabled(), dataloader_num_workers=0, top_k=0, top_p=1.0,
    )
    kw.update(overrides)
    kw["router_aux_loss_coef"] = 0.0
    return GRPOConfig(**kw)


def assert_no_router_aux_loss(trainer) -> None:
    """ZAYA has no router aux loss; fail if TRL would add one (it does when its coefficient is non-zero)."""
    if getattr(trainer, "aux_loss_enabled", False) or getattr(trainer, "router_aux_loss_coef", 0.0):
        raise RuntimeError(f"TRL would add a router aux loss (aux_loss_enabled={trainer.aux_loss_enabled}, "
                           f"router_aux_loss_coef={trainer.router_aux_loss_coef}); ZAYA balances with biases only")
    cfg = getattr(trainer.model, "config", None)
    if cfg is not None and getattr(cfg, "output_router_logits", False):
        raise RuntimeError("model.config.output_router_logits=True: TRL's fused head would compute a Mixtral aux loss")


def _base_zaya(model):
    """The ZayaForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class BalancingCallback:
    """After every optimizer step: record the step's routing load (max/mean per layer, active experts) from the
    training-mode forwards of that step, then step the balancing biases (`update=True`) or only reset the counts.
    Also records the gym's levels when there is a gym (difficulty over time)."""

    def __init__(self, model, update: bool = True, gym: Gym | None = None):
        from transformers import TrainerCallback

        self.model, self.update, self.gym = _base_zaya(model), update, gym
        self.history: list[dict] = []
        parent = self

        class _CB(TrainerCallback):  # transformers calls on_step_end with (args, state, control, **kw)
            def on_step_end(self, args, state, control, **kw):
                parent.on_step(state.global_step)

        self.callback = _CB()

    def on_step(self, step: int) -> None:
        stats = self.model.routing_stats()
        rec = {"step": step,
               "max_over_mean": sum(s["max_over_mean"] for s in stats) / len(stats),
               "max_over_mean_worst": max(s["max_over_mean"] for s in stats),
               "active_experts": sum(s["active_experts"] for s in stats) / len(stats)}
        if self.gym is not None:
            rec["levels"] = self.gym.levels()
        self.history.append(rec)
        if self.update:
            self.model.update_balancing_biases()
        else:
            self.model.reset_routing_stats()


def _wrap_lora(model, stage: RLStage):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=stage.lora_rank, lora_alpha=2 * stage.lora_rank, task_type="CAUSAL_LM", **LORA_TARGETS)
    return get_peft_model(model, cfg)


def engine_rollout(stage: RLStage, seed: int = 0, batch_size: int = 128) -> Callable:
    """TRL's `rollout_func` sampling every GRPO group with our batched engine (`zaya_lib.ttc.engine.Engine`: one
    prefill, an in-place KV cache, the folded decode step) instead of transformers' `generate`, which took 65% of a
    stage's time on the tiny profile (py-spy, stage 1). Same sampling as TRL's own path: the prompt ids TRL would
    tokenise, temperature `stage.temperature`, no top-k/top-p, at most `max_completion_length` tokens, and the
    completion keeps its `<|end|>` (TRL masks up to and including the first EOS). The policy is sampled as it is at
    each call (the engine refolds its decode weights after every optimizer step). Each call draws from its own seed
    (`seed`, call number), so a stage is reproducible.

    No sampling log-probs are returned (`logprobs: None`): with `steps_per_generation=2` TRL computes the behaviour
    policy's log-probs itself (`old_per_token_logps`) from the same weights, and without vLLM it uses nothing else."""
    from zaya_lib.ttc.engine import Engine

    state = {"engine": None, "calls": 0}

    def rollout(prompts: list, trainer) -> dict:
        policy = _base_zaya(trainer.model)
        eng = state["engine"]
        if eng is None or eng.model is not policy:
            eos = list(trainer.eos_token_ids)  # TRL's stop ids (the tokenizer's and the generation config's)
            if len(eos) != 1:
                raise ValueError(f"engine rollouts need one EOS id, the tokenizer has {eos}")
            # LoRA layers are not folded by the fast decode step: their stages decode through the model's forward
            eng = state["engine"] = Engine(policy, trainer.processing_class, eos_token_id=eos[0], batch_size=batch_size,
                                           fast_decode=not stage.lora)
        ids = [list(x) for x in trainer.processing_class(text=list(prompts))["input_ids"]]  # as TRL tokenises them
        out = eng.generate(ids, stage.max_completion_length, temperature=stage.temperature, top_p=1.0,
                           seed=seed * 1_000_003 + state["calls"], desc=f"rollouts {stage.name}")
        state["calls"] += 1
        comps = [t + eng.eos_ids if r == "stop" else t for t, r in zip(out.token_ids, out.finish_reasons)]
        return {"prompt_ids": ids, "completion_ids": comps, "logprobs": None}

    return rollout


def run_stage(model, tokenizer, stage: RLStage, gym: Gym | None = None, seed: int = 0, work_dir: str | None = None,
              device: str = "cpu", dataset: StageDataset | None = None, **config_overrides) -> dict:
    """Run one stage with TRL's GRPOTrainer on `model` (updated in place; LoRA adapters merged back). Returns
    {"log": TRL's log history, "routing": per-step routing records, "seconds", "trainable_params", ...,
    "sandbox_isolation": the code sandbox's isolation mode when the stage runs model-written code, else None}.
    Such a stage fails before it starts where the sandbox would refuse (no namespaces and no opt-in)."""
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    validate_stages([stage])
    sandbox_isolation = None  # how model-written code is contained (zaya_lib.rl.sandbox), for stages that run it
    if "code" in stage.rewards or any(source_kind(s) == "code" for s in stage.sources):
        from zaya_lib.rl.sandbox import require_isolation

        sandbox_isolation = require_isolation(what=f"RL stage {stage.name!r} runs model-written code")
    if not progress_enabled():
        hf_logging.disable_progress_bar()
    t0 = time.time()
    if dataset is None:
        dataset = build_stage_dataset(stage, tokenizer, model, gym, seed)
    data_seconds = time.time() - t0
    policy = _wrap_lora(model, stage) if stage.lora else model
    opt = muon_adamw(policy, lr=stage.learning_rate, muon=stage.optimizer == "muon")
    bal = BalancingCallback(policy, update=stage.balance, gym=gym)
    _base_zaya(policy).reset_routing_stats()
    tmp = work_dir or tempfile.mkdtemp(prefix="trl-")
    with warnings.catch_warnings():  # a transformers deprecation; rollout_func is experimental in TRL 1.16
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*rollout_func.*")
        args = make_grpo_config(stage, tmp, seed=seed, device=device, **config_overrides)
        trainer = GRPOTrainer(model=policy, reward_funcs=make_reward_funcs(stage, tokenizer, gym), args=args,
                              train_dataset=dataset.as_iterable(), processing_class=tokenizer, optimizers=(opt, None),
                              callbacks=[bal.callback],
                              rollout_func=engine_rollout(stage, seed) if stage.rollout == "engine" else None)
    assert_no_router_aux_loss(trainer)
    if not progress_enabled():  # headless: no per-step log dicts printed into notebooks
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing; TRL still sets the old name
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        trainer.train()
    if trainer.state.global_step != stage.steps:
        raise RuntimeError(f"RL stage {stage.name!r} ran {trainer.state.global_step} optimizer steps, expected "
                           f"{stage.steps} (the stage's data ran out)")
    if stage.lora:
        policy.merge_and_unload()
    if work_dir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [dataset.rows[i] for i in range(len(dataset)) if dataset.rows[i] is not None]
    return {"stage": stage.name, "log": [dict(x) for x in trainer.state.log_history], "routing": bal.history,
            "seconds": time.time() - t0, "data_seconds": data_seconds, "trainable_params": trainable,
            "optimizer": repr(opt), "aggregation_prompts": sum(r["aggregation"] for r in rows),
            "rows": len(rows), "sources": {s: sum(r["source"] == s for r in rows) for s in stage.sources},
            "sandbox_isolation": sandbox_isolation}


# ---------------------------------------------------------------------------------------------------------- checkpoints
def stage_dir(ckpt_root: str | os.PathLike, index: int, stage: RLStage) -> Path:
    return Path(ckpt_root) / f"stage{index + 1}_{stage.name}"


def _stage_record(stage: RLStage) -> dict:
    return json.loads(json.dumps(asdict(stage)))  # tuples -> lists, so saved and current records compare equal


def finished_stages(ckpt_root: str | os.PathLike, stages: Sequence[RLStage]) -> list[int]:
    """Indices of stages whose checkpoint (with its done marker) exists; a recorded config that differs from the
    current stage is an error naming the folder."""
    done = []
    for i, s in enumerate(stages):
        d = stage_dir(ckpt_root, i, s)
        marker = d / DONE_MARKER
        if not marker.is_file():
            continue
        rec = json.loads(marker.read_text())
        if rec.get("stage") != _stage_record(s):
            raise ValueError(f"{str(d)!r} finished with a different config for stage {s.name!r}; delete that folder "
                             "(and the later stages) to rerun it with the new one")
        done.append(i)
    return done


def _save_stage(model, tokenizer, gym: Gym | None, path: Path, record: dict) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gym is not None:
            (tmp / "gym_state.json").write_text(json.dumps(gym.state_dict()))
        torch.save(model.balancer.state_dict(), tmp / "balancer.pt")
        (tmp / "stage_log.json").write_text(json.dumps(record.get("result", {}), default=str))
        (tmp / DONE_MARKER).write_text(json.dumps({k: v for k, v in record.items() if k != "result"}, default=str))


def save_policy(model, tokenizer, path: str | os.PathLike) -> Path:
    """The policy (LoRA merged, peft wrapper removed) as a phase checkpoint at `path` (atomic; read it back with
    `zaya_lib.model.checkpoint.load_hf_checkpoint`)."""
    return save_hf_checkpoint(_base_zaya(model), tokenizer, path)


def load_stage(model, path: str | os.PathLike, gym: Gym | None = None) -> dict:
    """Load a finished stage's weights (in place), gym state and balancer state; returns its logged result."""
    from zaya_lib.model import ZayaForCausalLM

    path = Path(path)
    src = ZayaForCausalLM.from_pretrained(path)
    model.load_state_dict(src.state_dict())
    if gym is not None and (path / "gym_state.json").is_file():
        gym.load_state_dict(json.loads((path / "gym_state.json").read_text()))
    if (path / "balancer.pt").is_file():
        model.balancer.load_state_dict(torch.load(path / "balancer.pt"))
    return json.loads((path / "stage_log.json").read_text())


def run_cascade(model, tokenizer, stages: Sequence[RLStage], ckpt_root: str | os.PathLike, gym: Gym | None = None,
                seed: int = 0, device: str = "cpu", on_stage_end: Callable[[int, RLStage, dict], None] | None = None,
                **config_overrides) -> list[dict]:
    """Run the cascade, checkpointing after each stage and skipping finished ones. Validates everything first.

    `gym` is created from the first gym stage's `gym_envs` when not given (one gym for the whole run).
    `on_stage_end(index, stage, result)` runs after each stage (also for skipped ones, with their saved result), e.g.
    a held-out evaluation. Returns the per-stage results (`skipped=True` for resumed ones)."""
    validate_stages(stages)
    gym_stage = next((s for s in stages if "gym" in s.sources), None)
    if gym is None and gym_stage is not None:
        g = gym_stage.num_generations
        gym = Gym(gym_stage.gym_envs, seed=seed, samples_per_prompt=g)
    done = finished_stages(ckpt_root, stages)
    results = []
    last_done = max(done) if done else -1
    if last_done >= 0:
        load_stage(model, stage_dir(ckpt_root, last_done, stages[last_done]), gym)
    for i, s in enumerate(stages):
        if i <= last_done:
            res = json.loads((stage_dir(ckpt_root, i, s) / "stage_log.json").read_text()) | {"skipped": True}
        else:
            res = run_stage(model, tokenizer, s, gym, seed=seed + i, device=device, **config_overrides)
            res["skipped"] = False
            res["gym_levels"] = gym.levels() if gym is not None else {}
            _save_stage(model, tokenizer, gym, stage_dir(ckpt_root, i, s),
                        {"index": i, "name": s.name, "stage": _stage_record(s), "result": res})
        results.append(res)
        if on_stage_end is not None:
            on_stage_end(i, s, res)
    return results

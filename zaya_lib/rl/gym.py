"""An adaptive verifiable-environment gym in the manner of RLVE-Gym (spec section 4; cascade stage 2).

Notable features:
- `Environment` protocol: `name`, `max_difficulty`, `generate(seed, difficulty) -> {"prompt", "answer", "metadata"}`
  (deterministic in (seed, difficulty)), `verify(problem, completion) -> {"reward", "accuracy", "format"}`.
  Answers are read with the project's extraction rule (`zaya_lib.data.answers.extract_answer`: after `</think>`,
  last balanced `\\boxed{}`); accuracy = reward >= 1, as RLVE's verifier does.
- Environments: our own procedural arithmetic/list tasks whose difficulty is a number of digits/terms, the
  `zaya_lib.data.tasks` families SFT trained on (`tasks/<task>`, difficulty = the task's level - 1), and
  reasoning-gym datasets (`rg/<name>`) whose difficulty drives the dataset's curriculum via `set_global_level`
  (clamped at the curriculum's last level) and which are scored by the dataset's own `score_answer`.
- `DifficultyController`: RLVE's rule exactly (slime `RLVEManager`): upper bound h starts at 0; difficulties are
  sampled uniformly from max(0, h-w+1)..h (w = 4); only samples at d == h are counted; once
  `min_prompts * samples_per_prompt` (8 x G) were counted, h += 1 if their mean accuracy >= 0.9; the counters then
  reset either way. There is no demotion.
- `Gym`: samples an environment uniformly, then a difficulty from its controller, then a problem seed, from one
  seeded RNG; records verified results; `gym_reward` is a TRL reward function that verifies *and* records.
  `state_dict()`/`load_state_dict()` are JSON-serialisable (RNG state included) so a resumed run continues the
  exact same problem stream.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Protocol, Sequence, runtime_checkable

from zaya_lib.data.answers import completion_to_text, extract_answer, math_equal, score_reasoning_gym

__all__ = ["Environment", "ENVIRONMENTS", "get_environment", "DifficultyController", "Gym", "BOXED_HINT"]

BOXED_HINT = "Put the final answer in \\boxed{}."


@runtime_checkable
class Environment(Protocol):
    name: str
    max_difficulty: int | None  # None: unbounded

    def generate(self, seed: int, difficulty: int) -> dict: ...

    def verify(self, problem: dict, completion: Any) -> dict: ...


def _result(reward: float, extracted: str | None) -> dict:
    return {"reward": float(reward), "accuracy": float(reward >= 1.0), "format": float(extracted is not None)}


# ---------------------------------------------------------------------------------------------------- our environments
def _num(rng: random.Random, digits: int) -> int:
    """A uniformly random integer with exactly `digits` digits (1 digit includes 0)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


class _OwnEnv:
    """Base for our procedural environments: subclasses implement `_make(rng, d) -> (question, answer)`."""

    name = ""
    max_difficulty: int | None = None

    def _make(self, rng: random.Random, d: int) -> tuple[str, str]:
        raise NotImplementedError

    def generate(self, seed: int, difficulty: int) -> dict:
        if difficulty < 0:
            raise ValueError(f"{self.name}: difficulty must be >= 0, got {difficulty}")
        rng = random.Random(f"{self.name}/{seed}/{difficulty}")  # string seeds hash deterministically (SHA-512)
        question, answer = self._make(rng, difficulty)
        return {"prompt": f"{question} {BOXED_HINT}", "answer": answer,
                "metadata": {"env": self.name, "difficulty": difficulty, "seed": seed}}

    def _equal(self, pred: str, gold: str) -> bool:
        return math_equal(pred, gold)

    def verify(self, problem: dict, completion: Any) -> dict:
        pred = extract_answer(completion_to_text(completion))
        return _result(float(pred is not None and self._equal(pred, str(problem["answer"]))), pred)


class Addition(_OwnEnv):
    name = "add"

    def _make(self, rng, d):
        a, b = _num(rng, d + 1), _num(rng, d + 1)
        return f"What is {a} + {b}?", str(a + b)


class Subtraction(_OwnEnv):
    name = "sub"

    def _make(self, rng, d):
        a, b = _num(rng, d + 1), _num(rng, d + 1)
        return f"What is {a} - {b}?", str(a - b)


class Multiplication(_OwnEnv):
    name = "mul"

    def _make(self, rng, d):
        a, b = _num(rng, d + 1), _num(rng, 1 + d // 2)
        return f"What is {a} * {b}?", str(a * b)


class ChainSum(_OwnEnv):
    name = "chain_sum"

    def _make(self, rng, d):
        digits = 1 + d // 3
        terms = [_num(rng, digits) for _ in range(d + 2)]
        signs = [rng.choice("+-") for _ in terms[1:]]
        expr, total = str(terms[0]), terms[0]
        for s, t in zip(signs, terms[1:]):
            expr += f" {s} {t}"
            total += t if s == "+" else -t
        return f"Compute {expr}.", str(total)


class Comparison(_OwnEnv):
    name = "compare"

    def _make(self, rng, d):
        a = _num(rng, d + 1)
        b = a
        while b == a:  # harder levels: same length, often the same leading digits
            b = _num(rng, d + 1) if rng.random() < 0.5 else max(0, a + rng.randint(-9 * (d + 1), 9 * (d + 1)))
        return f"Which number is larger, {a} or {b}? Answer with the larger number.", str(max(a, b))


class DigitSum(_OwnEnv):
    name = "digit_sum"

    def _make(self, rng, d):
        n = _num(rng, d + 2)
        return f"What is the sum of the digits of {n}?", str(sum(map(int, str(n))))


class SortList(_OwnEnv):
    name = "sort"

    def _make(self, rng, d):
        xs = [rng.randint(0, 10 ** (1 + d // 3) - 1) for _ in range(d + 3)]
        q = f"Sort these numbers in ascending order: {', '.join(map(str, xs))}. Answer with the sorted list, comma-separated."
        return q, ", ".join(map(str, sorted(xs)))

    def _equal(self, pred, gold):
        import re

        return re.findall(r"-?\d+", pred) == re.findall(r"-?\d+", gold) and bool(re.search(r"\d", pred))


class Modular(_OwnEnv):
    name = "mod"

    def _make(self, rng, d):
        a = _num(rng, d + 2)
        m = rng.randint(2, 9 + 10 * d)
        return f"What is {a} mod {m} (the remainder of {a} divided by {m})?", str(a % m)


# ---------------------------------------------------------------------------------------------------- reasoning-gym
@lru_cache(maxsize=256)
def _rg_dataset(task: str, level: int):
    """One procedural dataset per (task, curriculum level): item i is generated from Random(seed + i), so a
    single dataset of (virtually) unbounded size serves every problem seed without re-creating it."""
    from reasoning_gym.factory import DATASETS, create_curriculum

    cur = create_curriculum(task)
    cur.set_global_level(level)
    cfg = cur.generate_configuration({"seed": 0, "size": 2**31})
    return DATASETS[task][0](config=cfg)


class ReasoningGymEnv:
    """A reasoning-gym dataset as an environment; difficulty = the curriculum's global level (clamped)."""

    def __init__(self, task: str):
        from reasoning_gym.factory import create_curriculum

        self.task = task
        self.name = f"rg/{task}"
        cur = create_curriculum(task)
        self.max_difficulty = max(len(a.levels) for a in cur.attributes.values()) - 1

    def generate(self, seed: int, difficulty: int) -> dict:
        if difficulty < 0:
            raise ValueError(f"{self.name}: difficulty must be >= 0, got {difficulty}")
        level = min(difficulty, self.max_difficulty)
        entry = _rg_dataset(self.task, level)[seed % 2**31]
        meta = json.loads(json.dumps(entry["metadata"], default=str))  # keep the problem JSON-serialisable
        return {"prompt": f"{entry['question']}\n{BOXED_HINT}", "answer": str(entry["answer"]),
                "metadata": {"env": self.name, "difficulty": difficulty, "level": level, "seed": seed,
                             "question": entry["question"], "rg_metadata": meta}}

    def verify(self, problem: dict, completion: Any) -> dict:
        md = problem.get("metadata", {})
        entry = {"question": md.get("question", ""), "answer": problem["answer"], "metadata": md.get("rg_metadata", {})}
        text = completion_to_text(completion)
        return _result(score_reasoning_gym(text, entry, self.task), extract_answer(text))


# ---------------------------------------------------------------------------------------------------- tasks.py families
class TaskEnv(_OwnEnv):
    """A `zaya_lib.data.tasks` family as an environment (`tasks/<task>`): the problems SFT trained on, in the same
    prompt format (the bare question, no boxed hint: SFT taught the `\\boxed{}` answer), training split only. Gym
    difficulty h is the task's level h + 1, clamped to its top level (the held-out suite's level 2 is h = 1)."""

    def __init__(self, task: str):
        from zaya_lib.data.tasks import MAX_DIFFICULTY

        self.task = task
        self.name = f"tasks/{task}"
        self.max_difficulty = MAX_DIFFICULTY - 1

    def generate(self, seed: int, difficulty: int) -> dict:
        from zaya_lib.data.tasks import make_problems

        if difficulty < 0:
            raise ValueError(f"{self.name}: difficulty must be >= 0, got {difficulty}")
        level = min(difficulty, self.max_difficulty) + 1
        p = make_problems(self.task, 1, seed=seed, difficulty=level, split="train")[0]
        return {"prompt": p.question, "answer": p.answer,
                "metadata": {"env": self.name, "difficulty": difficulty, "level": level, "seed": seed}}


# Reasoning-gym tasks a tiny model can learn: short arithmetic/string answers, curricula from trivial upwards.
RG_TASKS = ("chain_sum", "basic_arithmetic", "products", "gcd", "lcm", "count_bits", "spell_backward", "letter_counting")
_OWN = (Addition, Subtraction, Multiplication, ChainSum, Comparison, DigitSum, SortList, Modular)

ENVIRONMENTS: dict[str, Environment] = {e.name: e for e in [cls() for cls in _OWN]}
ENVIRONMENTS.update({f"rg/{t}": ReasoningGymEnv(t) for t in RG_TASKS})
ENVIRONMENTS.update({f"tasks/{t}": TaskEnv(t) for t in ("add", "sub", "chain_sum", "mul1", "div", "linear_eq",
                                                          "count_letter")})


def get_environment(name: str) -> Environment:
    if name not in ENVIRONMENTS:
        raise KeyError(f"unknown environment {name!r}; known: {sorted(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]


# ---------------------------------------------------------------------------------------------------- difficulty
@dataclass
class DifficultyController:
    """RLVE's per-environment adaptive difficulty (see module docstring). `h` is the upper bound."""

    window: int = 4  # difficulty_sliding_window_size
    min_prompts: int = 8  # min_prompts_before_difficulty_check
    samples_per_prompt: int = 1  # G: completions per prompt; the check waits for min_prompts * G samples
    threshold: float = 0.9  # min_metric_to_increase_difficulty
    h: int = 0
    acc_sum: float = 0.0
    n: int = 0

    def __post_init__(self):
        if self.window < 1 or self.min_prompts < 1 or self.samples_per_prompt < 1:
            raise ValueError("DifficultyController: window, min_prompts and samples_per_prompt must be >= 1")

    def sample(self, rng: random.Random) -> int:
        return rng.randint(max(0, self.h - self.window + 1), self.h)

    def record(self, difficulty: int, accuracy: float) -> bool:
        """Count one verified sample; returns True when this sample triggered a promotion."""
        if difficulty != self.h:
            return False
        self.acc_sum += float(accuracy)
        self.n += 1
        if self.n < self.min_prompts * self.samples_per_prompt:
            return False
        promoted = self.acc_sum / self.n >= self.threshold
        if promoted:
            self.h += 1
        self.acc_sum, self.n = 0.0, 0
        return promoted

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            if k not in self.__dataclass_fields__:
                raise KeyError(f"DifficultyController.load_state_dict: unknown key {k!r}")
            setattr(self, k, v)


# ---------------------------------------------------------------------------------------------------- gym
class Gym:
    """Uniform environment sampling with per-environment difficulty controllers; saved and resumed with the run."""

    def __init__(self, envs: Sequence[str] | None = None, seed: int = 0, window: int = 4, min_prompts: int = 8,
                 samples_per_prompt: int = 1, threshold: float = 0.9):
        names = list(envs) if envs is not None else sorted(ENVIRONMENTS)
        if not names:
            raise ValueError("Gym: empty environment list")
        for n in names:
            get_environment(n)  # fail at once on an unknown name
        if len(set(names)) != len(names):
            raise ValueError(f"Gym: duplicate environment names in {names}")
        self.names = names
        self.rng = random.Random(seed)
        self.controllers = {n: DifficultyController(window, min_prompts, samples_per_prompt, threshold) for n in names}
        self.promotions: list[dict] = []  # {"samples": total recorded so far, "env", "h"}: for level-over-time plots
        self.n_recorded = 0

    def sample(self) -> dict:
        """One training row: prompt, answer, env, difficulty and the whole problem as JSON (for `gym_reward`)."""
        name = self.rng.choice(self.names)
        d = self.controllers[name].sample(self.rng)
        seed = self.rng.getrandbits(31)
        problem = get_environment(name).generate(seed, d)
        return {"prompt": problem["prompt"], "answer": problem["answer"], "env": name, "difficulty": d,
                "problem": json.dumps(problem)}

    def sample_batch(self, n: int) -> list[dict]:
        return [self.sample() for _ in range(n)]

    def record(self, env: str, difficulty: int, accuracy: float) -> bool:
        if env not in self.controllers:
            raise KeyError(f"Gym.record: environment {env!r} is not in this gym ({self.names})")
        self.n_recorded += 1
        promoted = self.controllers[env].record(int(difficulty), accuracy)
        if promoted:
            self.promotions.append({"samples": self.n_recorded, "env": env, "h": self.controllers[env].h})
        return promoted

    def verify(self, row: dict, completion: Any) -> dict:
        problem = row["problem"]
        problem = json.loads(problem) if isinstance(problem, str) else problem
        return get_environment(row["env"]).verify(problem, completion)

    def gym_reward(self, prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        """TRL reward function: verify each completion (columns `env`, `difficulty`, `problem`) and record it."""
        for col in ("env", "difficulty", "problem"):
            if col not in kwargs:
                raise KeyError(f"Gym.gym_reward needs the dataset column {col!r}; got {sorted(kwargs)}")
        out = []
        for c, e, d, p in zip(completions, kwargs["env"], kwargs["difficulty"], kwargs["problem"]):
            res = self.verify({"env": e, "problem": p}, c)
            self.record(e, d, res["accuracy"])
            out.append(res["reward"])
        return out

    def levels(self) -> dict[str, int]:
        return {n: c.h for n, c in self.controllers.items()}

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"names": list(self.names), "rng": [version, list(internal), gauss],
                "controllers": {n: c.state_dict() for n, c in self.controllers.items()},
                "promotions": list(self.promotions), "n_recorded": self.n_recorded}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd.get("names", [])) != self.names:
            raise ValueError(f"Gym.load_state_dict: saved environments {sd.get('names')} != this gym's {self.names}")
        version, internal, gauss = sd["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        for n, csd in sd["controllers"].items():
            self.controllers[n].load_state_dict(csd)
        self.promotions = [dict(p) for p in sd["promotions"]]
        self.n_recorded = int(sd["n_recorded"])

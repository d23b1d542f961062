"""Verifiable rewards for the RL cascade (math, reasoning-gym, code, instruction following, arithmetic steps).

Every reward reads answers with the project's one answer rule (`zaya_lib.data.answers`: text after the last
`</think>`, last balanced `\\boxed{}`) and builds on its judges.

Notable features:
- Math: `answers.score_math` (math-verify behind a fast exact/numeric pre-check). reasoning-gym: the dataset's own
  `score_answer` (`answers.score_reasoning_gym`).
- Code: the last ```python fenced block runs in `zaya_lib.rl.sandbox` against stdin/stdout tests; reward = fraction
  passed.
- Instruction following (behavioural RL, cascade stage 4): small constraint dataclasses with `check(text)` and a
  `description` used in prompts, serialisable to dicts/JSON for dataset columns, and a seeded sampler of
  compatible constraint sets.
- Gym: stateless verification through the environment named in the row (`zaya_lib.rl.gym`).
- TRL-compatible reward functions `f(prompts, completions, **kwargs) -> list[float]` reading dataset columns
  (`answer`, `task`, `metadata`, `tests`, `constraints`, `env`, `problem`) from kwargs; completions may be strings
  or chat message lists. `REWARD_FUNCTIONS` / `get_reward(name)` is the registry the cascade's stage list names.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Callable, Sequence

from zaya_lib.data.answers import (cell_dict, completion_to_text, extract_answer, extract_code, final_segment,
                                   score_math, score_reasoning_gym, strip_special_tokens)

__all__ = [
    "score_code", "outputs_match", "Constraint", "MaxWords", "MinWords", "IncludeWords", "ForbidWords", "JsonOutput",
    "BulletCount", "EndsWith", "StartsWith", "AllLowercase", "NoCommas", "CONSTRAINT_TYPES", "constraint_from_dict",
    "constraints_from_json", "constraints_to_json", "sample_constraints", "make_instruction_prompt",
    "sample_instruction_example", "math_reward", "reasoning_gym_reward", "code_reward", "instruction_reward",
    "arithmetic_steps", "arithmetic_steps_reward",
    "instruction_strict_reward", "format_reward", "gym_reward", "REWARD_FUNCTIONS", "get_reward",
]


# ---------------------------------------------------------------------------------------------------- code
def outputs_match(got: str, want: str) -> bool:
    """Compare program output to the expected output, ignoring trailing whitespace on lines and at the end."""
    norm = lambda s: "\n".join(line.rstrip() for line in s.replace("\r\n", "\n").strip().split("\n"))  # noqa: E731
    return norm(got) == norm(want)


def _as_tests(tests: Any) -> list[dict]:
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
        raise ValueError("code tests must be a list of {'input': str, 'output': str} (or its JSON string)")
    return tests


def score_code(program: str | None, tests: Any, timeout_s: float = 2.0, **sandbox_kw: Any) -> float:
    """Fraction of stdin/stdout `tests` that `program` passes in the sandbox (0 if there is no program)."""
    tests = _as_tests(tests)
    if not program or not tests:
        return 0.0
    from zaya_lib.rl.sandbox import run_python

    passed = 0
    for t in tests:
        r = run_python(program, stdin=str(t["input"]), timeout_s=timeout_s, **sandbox_kw)
        passed += r.ok and outputs_match(r.stdout, str(t["output"]))
    return passed / len(tests)


# ---------------------------------------------------------------------------------------------------- instruction following
_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE) is not None


class Constraint:
    """A verifiable format constraint. Subclasses are frozen dataclasses that name their `kind` and a `template` in the
    class statement: the description shown in prompts, formatted with the fields (a tuple of words as a quoted,
    comma-separated list; lists given for tuple fields are stored as tuples)."""

    kind: str = ""
    template: str = ""

    def __init_subclass__(cls, kind: str = "", template: str = "", **kw):
        super().__init_subclass__(**kw)
        cls.kind, cls.template = kind, template

    def __post_init__(self):
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def check(self, text: str) -> bool:
        raise NotImplementedError

    @property
    def description(self) -> str:
        return self.template.format(**{k: ", ".join(f'"{w}"' for w in v) if isinstance(v, tuple) else v
                                       for k, v in asdict(self).items()})

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class MaxWords(Constraint, kind="max_words", template="Answer in at most {n} words."):
    n: int

    def check(self, text: str) -> bool:
        return 0 < len(_words(text)) <= self.n


@dataclass(frozen=True)
class MinWords(Constraint, kind="min_words", template="Answer in at least {n} words."):
    n: int

    def check(self, text: str) -> bool:
        return len(_words(text)) >= self.n


@dataclass(frozen=True)
class IncludeWords(Constraint, kind="include_words", template="Use each of these words: {words}."):
    words: tuple[str, ...]

    def check(self, text: str) -> bool:
        return all(_has_word(text, w) for w in self.words)


@dataclass(frozen=True)
class ForbidWords(Constraint, kind="forbid_words", template="Do not use these words: {words}."):
    words: tuple[str, ...]

    def check(self, text: str) -> bool:
        return bool(text.strip()) and not any(_has_word(text, w) for w in self.words)


@dataclass(frozen=True)
class JsonOutput(Constraint, kind="json", template="Reply with a JSON object only, with the keys {keys}."):
    keys: tuple[str, ...] = ()

    def check(self, text: str) -> bool:
        s = text.strip()
        m = re.fullmatch(r"```(?:json)?\s*\n(.*?)\n?```", s, flags=re.DOTALL)  # a single fenced block is fine
        if m:
            s = m.group(1)
        try:
            obj = json.loads(s)
        except (json.JSONDecodeError, RecursionError, ValueError):
            return False
        if self.keys:
            return isinstance(obj, dict) and all(k in obj for k in self.keys)
        return True

    @property
    def description(self) -> str:
        return super().description if self.keys else "Reply with valid JSON only."


@dataclass(frozen=True)
class BulletCount(Constraint, kind="bullets",
                  template='Use exactly {n} bullet points, each on its own line starting with "- ".'):
    n: int

    def check(self, text: str) -> bool:
        return sum(bool(re.match(r"^\s*[-*•]\s+\S", line)) for line in text.splitlines()) == self.n


@dataclass(frozen=True)
class EndsWith(Constraint, kind="ends_with", template='End your answer with the exact phrase "{phrase}".'):
    phrase: str

    def check(self, text: str) -> bool:
        return text.rstrip().endswith(self.phrase)


@dataclass(frozen=True)
class StartsWith(Constraint, kind="starts_with", template='Start your answer with the exact phrase "{phrase}".'):
    phrase: str

    def check(self, text: str) -> bool:
        return text.lstrip().startswith(self.phrase)


@dataclass(frozen=True)
class AllLowercase(Constraint, kind="lowercase",
                   template="Write everything in lowercase letters; no capital letters at all."):
    def check(self, text: str) -> bool:
        return any(c.isalpha() for c in text) and text == text.lower()


@dataclass(frozen=True)
class NoCommas(Constraint, kind="no_commas", template="Do not use any commas."):
    def check(self, text: str) -> bool:
        return bool(text.strip()) and "," not in text


CONSTRAINT_TYPES: dict[str, type[Constraint]] = {c.kind: c for c in (
    MaxWords, MinWords, IncludeWords, ForbidWords, JsonOutput, BulletCount, EndsWith, StartsWith, AllLowercase, NoCommas)}


def constraint_from_dict(d: dict) -> Constraint:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in CONSTRAINT_TYPES:
        raise ValueError(f"unknown constraint kind {kind!r}; known: {sorted(CONSTRAINT_TYPES)}")
    return CONSTRAINT_TYPES[kind](**d)


def constraints_to_json(cs: Sequence[Constraint]) -> str:
    return json.dumps([c.to_dict() for c in cs])


def constraints_from_json(x: Any) -> list[Constraint]:
    """Constraints from a dataset cell: a JSON string, a list of dicts, or a list of Constraint objects."""
    if isinstance(x, str):
        x = json.loads(x)
    if isinstance(x, (Constraint, dict)):
        x = [x]
    return [c if isinstance(c, Constraint) else constraint_from_dict(c) for c in x]


_IF_TASKS = (
    "Describe your favourite season.", "Explain why the sky looks blue.", "Give advice to someone learning to cook.",
    "Describe a walk through a forest.", "Explain what a prime number is.", "Write a short note to a new neighbour.",
    "Summarise the rules of tic-tac-toe.", "Describe how to make a cup of tea.", "Explain why sleep matters.",
    "Write a short product description for a water bottle.", "Describe the ocean to someone who has never seen it.",
    "Explain how a bicycle works.",
)
_VOCAB = ("river", "bright", "simple", "window", "garden", "quiet", "number", "blue", "friend", "morning", "stone",
          "light", "music", "green", "paper", "travel")
_PHRASES = ("That is all.", "Thank you.", "Any questions?", "The end.", "Hope this helps.")
_KEYS = ("title", "summary", "items", "answer", "reason", "score")
# Pairs that would contradict or make each other very unlikely
_CONFLICTS = {("json", "bullets"), ("json", "ends_with"), ("json", "starts_with"), ("json", "no_commas"),
              ("json", "lowercase"), ("max_words", "min_words"), ("include_words", "forbid_words")}


def _sample_one(kind: str, rng: random.Random) -> Constraint:
    if kind == "max_words":
        return MaxWords(rng.choice((10, 20, 30, 50)))
    if kind == "min_words":
        return MinWords(rng.choice((5, 10, 20)))
    if kind == "include_words":
        return IncludeWords(tuple(rng.sample(_VOCAB, rng.randint(1, 2))))
    if kind == "forbid_words":
        return ForbidWords(tuple(rng.sample(("the", "and", "very", "is", "a", "it"), rng.randint(1, 2))))
    if kind == "json":
        return JsonOutput(tuple(rng.sample(_KEYS, rng.randint(0, 2))))
    if kind == "bullets":
        return BulletCount(rng.randint(2, 5))
    if kind == "ends_with":
        return EndsWith(rng.choice(_PHRASES))
    if kind == "starts_with":
        return StartsWith(rng.choice(("Sure.", "Here it is:", "Answer:", "Okay.")))
    return CONSTRAINT_TYPES[kind]()


def sample_constraints(seed_or_rng: int | random.Random, k: int = 2) -> list[Constraint]:
    """`k` mutually compatible constraints of distinct kinds, drawn deterministically from the seed."""
    rng = seed_or_rng if isinstance(seed_or_rng, random.Random) else random.Random(seed_or_rng)
    if not 1 <= k <= 4:
        raise ValueError(f"sample_constraints: k must be in 1..4, got {k}")
    kinds: list[str] = []
    for kind in rng.sample(sorted(CONSTRAINT_TYPES), len(CONSTRAINT_TYPES)):
        if all((a, kind) not in _CONFLICTS and (kind, a) not in _CONFLICTS for a in kinds):
            kinds.append(kind)
        if len(kinds) == k:
            break
    cs = [_sample_one(kind, rng) for kind in kinds]
    # starts/ends phrases have capitals: keep them compatible with an all-lowercase rule
    if any(c.kind == "lowercase" for c in cs):
        cs = [type(c)(c.phrase.lower()) if c.kind in ("ends_with", "starts_with") else c for c in cs]
    return cs


def make_instruction_prompt(task: str, constraints: Sequence[Constraint]) -> str:
    rules = "\n".join(f"- {c.description}" for c in constraints)
    return f"{task}\n\nFollow these rules exactly:\n{rules}"


def sample_instruction_example(seed: int, k: int = 2) -> dict:
    """One behavioural-RL row: {'prompt', 'constraints' (JSON string), 'task'}; deterministic in `seed`."""
    rng = random.Random(seed)
    task = rng.choice(_IF_TASKS)
    cs = sample_constraints(rng, k)
    return {"prompt": make_instruction_prompt(task, cs), "constraints": constraints_to_json(cs), "task": task}


# ---------------------------------------------------------------------------------------------------- TRL reward functions
def _column(kwargs: dict, name: str, fn: str, n: int) -> list:
    if name not in kwargs or kwargs[name] is None:
        raise KeyError(f"{fn} needs the dataset column {name!r}; got columns {sorted(k for k in kwargs)}")
    col = kwargs[name]
    if isinstance(col, (str, bytes)) or not isinstance(col, Sequence):
        col = [col] * n
    if len(col) != n:
        raise ValueError(f"{fn}: column {name!r} has {len(col)} entries for {n} completions")
    return list(col)


def math_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """1.0 if the extracted answer equals column `answer` (math-verify), else 0.0."""
    golds = _column(kwargs, "answer", "math_reward", len(completions))
    return [score_math(c, g) for c, g in zip(completions, golds)]


def reasoning_gym_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """reasoning-gym's scorer; columns `answer`, `metadata` (dict or JSON string) and optionally `task`/`question`."""
    n = len(completions)
    golds = _column(kwargs, "answer", "reasoning_gym_reward", n)
    metas = kwargs.get("metadata") or [None] * n
    tasks = kwargs.get("task") or [None] * n
    questions = kwargs.get("question") or [""] * n
    out = []
    for c, g, m, t, q in zip(completions, golds, metas, tasks, questions):
        entry = {"question": q, "answer": g, "metadata": cell_dict(m)}
        out.append(score_reasoning_gym(c, entry, t))
    return out


def code_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """Fraction of column `tests` (list of {input, output} or JSON) passed by the completion's ```python block."""
    tests = _column(kwargs, "tests", "code_reward", len(completions))
    return [score_code(extract_code(c), t) for c, t in zip(completions, tests)]


def _if_scores(completions: Sequence, kwargs: dict, fn: str) -> list[list[bool]]:
    cols = _column(kwargs, "constraints", fn, len(completions))
    out = []
    for c, cs in zip(completions, cols):
        text = final_segment(completion_to_text(c)).strip()
        out.append([con.check(text) for con in constraints_from_json(cs)])
    return out


def instruction_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """Fraction of the constraints in column `constraints` that the answer (after `</think>`) satisfies."""
    return [sum(s) / len(s) if s else 0.0 for s in _if_scores(completions, kwargs, "instruction_reward")]


def instruction_strict_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """1.0 only if every constraint holds."""
    return [float(bool(s) and all(s)) for s in _if_scores(completions, kwargs, "instruction_strict_reward")]


def format_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """1.0 for `<think>...</think>` followed by a final answer in `\\boxed{}` or `<answer>` tags, else 0.0."""
    out = []
    for c in completions:
        text = strip_special_tokens(completion_to_text(c))
        ok = text.lstrip().startswith("<think>") and text.count("</think>") == 1 and extract_answer(text) is not None
        out.append(float(ok))
    return out


_EQUATION = re.compile(r"(?<![\w.])(\d{1,12}(?:\s*[-+*/]\s*\d{1,12}){1,6})\s*=\s*(-?\d{1,13})(?![\w.])")


def _arith_value(expr: str) -> Fraction | None:
    """Exact value of an integer expression of + - * / (usual precedence), or None (division by zero)."""
    import ast

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        raise ValueError(expr)

    try:
        return ev(ast.parse(expr.replace(" ", ""), mode="eval").body)
    except (ValueError, SyntaxError, ZeroDivisionError):
        return None


def arithmetic_steps(text: str) -> tuple[int, int]:
    """(correct, total) over the equations `a op b [op c ...] = n` in the reasoning (the text inside
    `<think>...</think>`, or all of it when there is no think block): each left side is evaluated exactly (integers,
    + - * / with the usual precedence; at most 7 numbers of at most 12 digits) and compared with n."""
    text = completion_to_text(text)
    m = re.search(r"<think>(.*?)(?:</think>|$)", text, flags=re.S)
    body = m.group(1) if m else text
    ok = total = 0
    for lhs, rhs in _EQUATION.findall(body[:20_000]):
        total += 1
        ok += _arith_value(lhs) == int(rhs)
    return ok, total


def arithmetic_steps_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """A process reward for the arithmetic chains of thought: the fraction of the reasoning's equations that are
    right (`arithmetic_steps`), 0.0 when there is none. Dense where the outcome reward is sparse: a group whose
    answers are all wrong still ranks its samples by how many steps they got right."""
    out = []
    for c in completions:
        ok, total = arithmetic_steps(c)
        out.append(ok / total if total else 0.0)
    return out


def gym_reward(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
    """Stateless gym verification: column `env` (environment name) and `problem` (dict or JSON from `Gym`)."""
    from zaya_lib.rl.gym import get_environment

    n = len(completions)
    envs = _column(kwargs, "env", "gym_reward", n)
    problems = _column(kwargs, "problem", "gym_reward", n)
    return [get_environment(e).verify(cell_dict(p), c)["reward"] for c, e, p in zip(completions, envs, problems)]


REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {
    "math": math_reward,
    "reasoning_gym": reasoning_gym_reward,
    "code": code_reward,
    "instruction": instruction_reward,
    "instruction_strict": instruction_strict_reward,
    "format": format_reward,
    "gym": gym_reward,
    "arithmetic_steps": arithmetic_steps_reward,
}


def get_reward(name: str) -> Callable[..., list[float]]:
    if name not in REWARD_FUNCTIONS:
        raise KeyError(f"unknown reward function {name!r}; known: {sorted(REWARD_FUNCTIONS)}")
    return REWARD_FUNCTIONS[name]

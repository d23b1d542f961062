"""Synthetic code environments (cascade stage 3): stdin/stdout problems with reference solutions.

Notable features:
- Each `CodeTemplate` has a statement, a reference solution (Python source, stdlib only) and a procedural input
  generator whose size grows with `difficulty`.
- Tests are *generated*: inputs from the generator, expected outputs from running the reference solution in the
  sandbox (`zaya_lib.rl.sandbox`), the way the paper builds code environments from reference programs
  (ZAYA1 report, RL stage 3). A reference that fails on its own input is a bug and raises at once.
- Reward = fraction of tests a candidate program passes (`zaya_lib.rl.verifiers.score_code`).
- `CodeEnvironment` implements the gym's `Environment` protocol (`code/<template>`), so code problems can join
  a `Gym`-style sampler; they are kept out of the default gym registry because each verification runs programs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from zaya_lib.data.answers import completion_to_text, extract_code
from zaya_lib.rl.sandbox import run_python
from zaya_lib.rl.verifiers import score_code

__all__ = ["CodeTemplate", "TEMPLATES", "make_problem", "reference_output", "score_program", "CodeEnvironment",
           "CODE_ENVIRONMENTS", "CODE_HINT"]

CODE_HINT = ("Read the input from standard input and print the answer to standard output. "
             "Give your program in a ```python code block.")


@dataclass(frozen=True)
class CodeTemplate:
    name: str
    statement: str
    solution: str  # reference program
    gen_input: Callable[[random.Random, int], str]  # (rng, difficulty) -> stdin text


def _ints(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _words(rng: random.Random, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz", max_len: int = 7) -> list[str]:
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len))) for _ in range(n)]


def _list_input(rng: random.Random, d: int) -> str:
    xs = _ints(rng, rng.randint(1, 5 + 5 * d), -10 ** (2 + d), 10 ** (2 + d))
    return f"{len(xs)}\n{' '.join(map(str, xs))}\n"


def _pairs_input(rng: random.Random, d: int) -> str:
    t = rng.randint(1, 3 + 2 * d)
    return f"{t}\n" + "".join(f"{rng.randint(1, 10 ** (2 + d))} {rng.randint(1, 10 ** (2 + d))}\n" for _ in range(t))


TEMPLATES: dict[str, CodeTemplate] = {t.name: t for t in [
    CodeTemplate(
        "sum_list", "The first line holds n, the second n integers. Print their sum.",
        "n = int(input())\nprint(sum(map(int, input().split())))\n", _list_input),
    CodeTemplate(
        "max_min", "The first line holds n, the second n integers. Print the largest and the smallest, separated by a space.",
        "n = int(input())\nxs = list(map(int, input().split()))\nprint(max(xs), min(xs))\n", _list_input),
    CodeTemplate(
        "prefix_sums", "The first line holds n, the second n integers. Print their running sums, separated by spaces.",
        "n = int(input())\nacc, out = 0, []\nfor x in map(int, input().split()):\n    acc += x\n    out.append(acc)\n"
        "print(*out)\n", _list_input),
    CodeTemplate(
        "count_distinct", "The first line holds n, the second n integers. Print how many distinct values there are.",
        "input()\nprint(len(set(input().split())))\n",
        lambda rng, d: (lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n")(_ints(rng, rng.randint(1, 6 + 6 * d), 0, 3 + 3 * d))),
    CodeTemplate(
        "reverse_words", "Read one line of words separated by single spaces. Print the words in reverse order.",
        "print(' '.join(input().split()[::-1]))\n",
        lambda rng, d: " ".join(_words(rng, rng.randint(1, 3 + 3 * d))) + "\n"),
    CodeTemplate(
        "count_vowels", "Read one line of text. Print how many vowels (a, e, i, o, u, either case) it contains.",
        "print(sum(c in 'aeiouAEIOU' for c in input()))\n",
        lambda rng, d: " ".join(_words(rng, rng.randint(1, 3 + 3 * d), "abcdeiouxyzAEIOUT")) + "\n"),
    CodeTemplate(
        "fizzbuzz", "The input holds n, a and b. For i = 1..n print 'FizzBuzz' if i is divisible by both a and b, "
        "'Fizz' if only by a, 'Buzz' if only by b, else i; one per line.",
        "n, a, b = map(int, input().split())\nfor i in range(1, n + 1):\n"
        "    s = ('Fizz' if i % a == 0 else '') + ('Buzz' if i % b == 0 else '')\n    print(s or i)\n",
        lambda rng, d: f"{rng.randint(1, 10 + 10 * d)} {rng.randint(2, 7)} {rng.randint(2, 7)}\n"),
    CodeTemplate(
        "palindromes", "The first line holds t, then t lines with one lowercase word each. For each word print YES "
        "if it reads the same backwards, else NO.",
        "t = int(input())\nfor _ in range(t):\n    w = input().strip()\n    print('YES' if w == w[::-1] else 'NO')\n",
        lambda rng, d: (lambda ws: f"{len(ws)}\n" + "".join(w + "\n" for w in ws))(
            [w if rng.random() < 0.5 else w + w[::-1][1:] for w in _words(rng, rng.randint(1, 3 + 2 * d), "abc", 4 + d)])),
    CodeTemplate(
        "gcd_pairs", "The first line holds t, then t lines with two positive integers a b. Print gcd(a, b) for each line.",
        "import math\nt = int(input())\nfor _ in range(t):\n    a, b = map(int, input().split())\n    print(math.gcd(a, b))\n",
        _pairs_input),
    CodeTemplate(
        "caesar", "The first line holds a shift k (0-25), the second a line of lowercase letters and spaces. Print the "
        "line with every letter shifted k places forward in the alphabet (wrapping z to a); spaces stay.",
        "k = int(input())\nprint(''.join(c if c == ' ' else chr((ord(c) - 97 + k) % 26 + 97) for c in input()))\n",
        lambda rng, d: f"{rng.randint(0, 25)}\n" + " ".join(_words(rng, rng.randint(1, 2 + 2 * d))) + "\n"),
]}


def _template(name: str) -> CodeTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown code template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def reference_output(template: CodeTemplate, stdin: str) -> str:
    """Run the reference solution on `stdin` in the sandbox; a failure here is a bug in the template."""
    r = run_python(template.solution, stdin=stdin, timeout_s=5)
    if not r.ok:
        raise RuntimeError(f"code template {template.name!r}: reference solution failed on input {stdin!r}: "
                           f"{r.killed_reason or r.returncode}: {r.stderr[-500:]}")
    return r.stdout


def make_problem(name: str, seed: int, n_tests: int = 5, difficulty: int = 0) -> dict:
    """A problem from template `name`: {'name', 'prompt', 'tests': [{'input', 'output'}], 'solution'}.
    Deterministic in (name, seed, n_tests, difficulty)."""
    if n_tests < 1 or difficulty < 0:
        raise ValueError(f"make_problem: n_tests must be >= 1 and difficulty >= 0, got {n_tests}, {difficulty}")
    t = _template(name)
    rng = random.Random(f"code/{name}/{seed}/{difficulty}")
    tests = []
    for _ in range(n_tests):
        stdin = t.gen_input(rng, difficulty)
        tests.append({"input": stdin, "output": reference_output(t, stdin)})
    return {"name": name, "prompt": f"{t.statement}\n{CODE_HINT}", "tests": tests, "solution": t.solution}


def score_program(program: str | None, tests: list[dict], timeout_s: float = 2.0) -> float:
    """Fraction of `tests` passed by `program` (0.0 for no program)."""
    return score_code(program, tests, timeout_s=timeout_s)


class CodeEnvironment:
    """A code template as a gym `Environment`: the answer is the reference program, tests ride in metadata."""

    max_difficulty: int | None = None

    def __init__(self, template: str, n_tests: int = 5):
        self.template = _template(template).name
        self.name = f"code/{template}"
        self.n_tests = n_tests

    def generate(self, seed: int, difficulty: int) -> dict:
        p = make_problem(self.template, seed, self.n_tests, difficulty)
        return {"prompt": p["prompt"], "answer": f"```python\n{p['solution']}```",
                "metadata": {"env": self.name, "difficulty": difficulty, "seed": seed, "tests": p["tests"]}}

    def verify(self, problem: dict, completion: Any) -> dict:
        program = extract_code(completion_to_text(completion))
        reward = score_program(program, problem["metadata"]["tests"])
        return {"reward": reward, "accuracy": float(reward >= 1.0), "format": float(program is not None)}


CODE_ENVIRONMENTS: dict[str, CodeEnvironment] = {f"code/{n}": CodeEnvironment(n) for n in TEMPLATES}

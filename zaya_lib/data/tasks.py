"""Procedural reasoning tasks with programmatic, compact step-by-step solutions.

Notable features:
- Each task is a generator (`rng, difficulty -> question + metadata`) and one solver (`metadata -> steps`). The
  solver writes the chain of thought (CoT) and the answer; the same solver with an injected fault writes the
  "realistic mistake" rollouts (`corrupt_rollout`), so a mistake propagates through the later steps as a real
  one would (a dropped carry changes every digit after it).
- CoTs are terse, token-cheap traces sized for a ~3M-parameter model (calibration.md): `472+389` ->
  `2+9=11 c1 7+8+1=16 c1 4+3+1=8 →861`. Every `a op b = c` claim in a gold CoT is true arithmetic (tested).
- Responses follow the project format `<think>{cot}</think>\\boxed{answer}`.
- Train / held-out split by a stable hash of the question (1 in `HELDOUT_BUCKETS` questions is held out), on top of
  disjoint seed streams: a held-out question can never appear in training, whatever seeds the two sides use.
- Two tasks wrap reasoning-gym generators (`rg_gcd`, `rg_chain_sum`) with our own CoT (Euclid steps, running sums).
- `DEFAULT_REASONING_SUITE` is the held-out evaluation mixture the notebooks use (task, difficulty), with
  `make_suite(..., difficulty_offset=)` to make it harder or easier.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable

__all__ = [
    "Problem", "Task", "TASKS", "make_problems", "make_suite", "corrupt_rollout", "format_response",
    "DEFAULT_REASONING_SUITE", "MAX_DIFFICULTY", "HELDOUT_BUCKETS", "SPLITS", "is_heldout", "split_of", "cot_final",
    "CHECKERS", "FORWARD_CHECKED", "check_candidate", "aggregation_response", "aggregation_rollout", "parse_verdicts",
]

MAX_DIFFICULTY = 5
HELDOUT_BUCKETS = 8  # 1/8 of the question space is held out for the claims ("test"), 1/8 for calibration ("val")
SPLITS = ("train", "val", "test")
ARROW = "→"  # marks the CoT's final result: "... →861"


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str
    cot: str
    difficulty: int
    seed: int
    metadata: dict = field(default_factory=dict, compare=False)

    def response(self) -> str:
        """The gold assistant response `<think>{cot}</think>\\boxed{answer}`."""
        return format_response(self.cot, self.answer)


def format_response(cot: str, answer: str) -> str:
    return f"<think>{cot}</think>\\boxed{{{answer}}}"


def cot_final(cot: str) -> str:
    """The result a CoT arrives at (the text after its last arrow)."""
    return cot.rsplit(ARROW, 1)[-1].strip()


# --------------------------------------------------------------------------------------------------------------------
# Faults: a solver receives `fault=(step, rng)` or None. At step index `step` it makes one plausible mistake, chosen
# with `rng`, and carries on correctly from the wrong intermediate value.


class _Fault:
    def __init__(self, step: int | None, rng: random.Random | None):
        self.step, self.rng = step, rng

    def at(self, i: int) -> bool:
        return self.step == i

    def choice(self, options):
        return self.rng.choice(options)


_NO_FAULT = _Fault(None, None)


def _digits_rev(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]


def _off_by_one(v: int, f: _Fault, lo: int = 0) -> int:
    w = v + f.choice((-1, 1))
    return w if w >= lo else v + 1


# --------------------------------------------------------------------------------------------------------------------
# Solvers: metadata -> (cot, answer). Steps are counted so faults can target one; `_n_steps` gives their number.


def _solve_columns(nums: list[int], f: _Fault) -> tuple[str, str]:
    """Column addition of 2+ non-negative numbers, right to left: `2+9=11 c1 7+8+1=16 c1 ... →861`.
    Mistakes: dropped carry, off-by-one column sum, a digit read from the neighbouring column."""
    width = max(len(str(n)) for n in nums)
    parts, out, carry = [], [], 0
    for i in range(width):
        # Only the digits an operand actually has (no leading-zero padding in the trace).
        have = [n for n in nums if i < len(str(n))]
        ds = [(n // 10**i) % 10 for n in have]
        kind = f.choice(("carry", "sum", "digit")) if f.at(i) else None
        c_in = carry
        if kind == "carry" and carry:
            c_in, kind = 0, None
        elif kind == "digit" and i + 1 < width:
            j = f.rng.randrange(len(ds))
            ds[j] = (have[j] // 10 ** (i + 1)) % 10
            kind = None
        terms = ds + ([c_in] if c_in else [])
        s = sum(terms)
        if kind is not None:  # "sum", or a carry/digit fault that had nothing to act on
            s = _off_by_one(s, f)
        carry = s // 10
        out.append(s % 10)
        parts.append("+".join(map(str, terms)) + f"={s}" + (f" c{carry}" if carry else ""))
    total = carry * 10**width + int("".join(map(str, reversed(out))))
    return " ".join(parts) + f" {ARROW}{total}", str(total)


def _solve_sub(m: dict, f: _Fault) -> tuple[str, str]:
    """a-b with a>=b, right to left with borrows: `12-9=3 b1 17-8-1=8 b1 4-3-1=0 →83`.
    Mistakes: dropped borrow, off-by-one digit, the classic swap (2-9 done as 9-2, no borrow)."""
    a, b = m["a"], m["b"]
    parts, out, borrow = [], [], 0
    for i in range(len(str(a))):
        kind = f.choice(("borrow", "diff", "swap")) if f.at(i) else None
        x, has_y = (a // 10**i) % 10, i < len(str(b))
        y = (b // 10**i) % 10 if has_y else 0
        b_in = borrow
        if kind == "borrow" and borrow:
            b_in, kind = 0, None
        r = x - y - b_in
        lend = r < 0
        if kind == "swap" and lend:
            r, lend, kind = -r, False, None
        if lend:
            r += 10
        if kind is not None:  # "diff", or a fault that had nothing to act on
            r = _off_by_one(r, f) % 10
        lhs = ("1" if lend else "") + str(x) + (f"-{y}" if has_y else "") + ("-1" if b_in else "")
        borrow = int(lend)
        out.append(r)
        parts.append(f"{lhs}={r}" + (" b1" if borrow else ""))
    diff = int("".join(map(str, reversed(out))))
    return " ".join(parts) + f" {ARROW}{diff}", str(diff)


def _solve_mul1(m: dict, f: _Fault) -> tuple[str, str]:
    """a*d, d one digit, right to left: `2*7=14 c1 7*7+1=50 c5 4*7+5=33 →3304`.
    Mistakes: dropped carry, off-by-one product, a wrong times-table entry (off by d)."""
    a, d = m["a"], m["d"]
    da = _digits_rev(a, len(str(a)))
    parts, out, carry = [], [], 0
    for i, x in enumerate(da):
        kind = f.choice(("carry", "prod", "table")) if f.at(i) else None
        c_in = carry
        if kind == "carry" and carry:
            c_in, kind = 0, None
        p = x * d + c_in
        if kind == "table":
            p = p + d if p < d else p + f.choice((-d, d))
        elif kind is not None:
            p = _off_by_one(p, f)
        parts.append(f"{x}*{d}" + (f"+{c_in}" if c_in else "") + f"={p}" + (f" c{p // 10}" if p >= 10 else ""))
        out.append(p % 10)
        carry = p // 10
    total = int(str(carry) + "".join(map(str, reversed(out)))) if carry else int("".join(map(str, reversed(out))))
    return " ".join(parts) + f" {ARROW}{total}", str(total)


def _solve_div(m: dict, f: _Fault) -> tuple[str, str]:
    """Exact division n/d, d one digit, long division left to right: `33/7=4 r5 50/7=7 r1 14/7=2 r0 →472`.
    The first chunk takes digits until it reaches d; each later chunk is the remainder times ten plus the next digit.
    Mistakes: an off-by-one remainder (carried into the next chunk), a quotient digit written off by one."""
    n, d = m["n"], m["d"]
    ds = str(n)
    chunk, i = int(ds[0]), 1
    while chunk < d and i < len(ds):
        chunk, i = chunk * 10 + int(ds[i]), i + 1
    parts, qs, step = [], [], 0
    while True:
        q, r = divmod(chunk, d)
        kind = f.choice(("rem", "quot")) if f.at(step) else None
        if kind == "rem":
            r = r + 1 if r + 1 < d else r - 1 if r > 0 else r + 1
        elif kind == "quot":
            q = _off_by_one(q, f) % 10
        parts.append(f"{chunk}/{d}={q} r{r}")
        qs.append(str(q))
        if i >= len(ds):
            break
        chunk, i, step = r * 10 + int(ds[i]), i + 1, step + 1
    quotient = int("".join(qs))
    return " ".join(parts) + f" {ARROW}{quotient}", str(quotient)


def _n_div_steps(m: dict) -> int:
    return len(_solve_div(m, _NO_FAULT)[0].split()) // 2


def _solve_max(m: dict, f: _Fault) -> tuple[str, str]:
    """Running maximum: `max(472,389)=472 max(472,501)=501 →501`. Mistake: keep the smaller at one comparison."""
    xs = m["xs"]
    best, parts = xs[0], []
    for i, x in enumerate(xs[1:]):
        new = max(best, x)
        if f.at(i):
            new = min(best, x)
        parts.append(f"max({best},{x})={new}")
        best = new
    return " ".join(parts) + f" {ARROW}{best}", str(best)


def _solve_digit_sum(m: dict, f: _Fault) -> tuple[str, str]:
    """Running sum of digits: `4+7=11 11+2=13 13+9=22 →22`. Mistakes: off-by-one partial sum, a skipped digit."""
    ds = [int(c) for c in str(m["n"])]
    acc, parts = ds[0], []
    for i, x in enumerate(ds[1:]):
        kind = f.choice(("sum", "skip")) if f.at(i) else None
        if kind == "skip" and x != 0:
            continue
        s = acc + x
        if kind is not None:
            s = _off_by_one(s, f)
        parts.append(f"{acc}+{x}={s}")
        acc = s
    return " ".join(parts) + f" {ARROW}{acc}", str(acc)


def _solve_count_letter(m: dict, f: _Fault) -> tuple[str, str]:
    """Spell the word, numbering each hit: `s t r1 a w b e r2 r3 y →3`. Mistakes: a missed or a phantom hit."""
    word, ch = m["word"], m["letter"]
    n, parts = 0, []
    for i, c in enumerate(word):
        hit = c == ch
        if f.at(i):
            hit = not hit
        if hit:
            n += 1
            parts.append(f"{c}{n}")
        else:
            parts.append(c)
    return " ".join(parts) + f" {ARROW}{n}", str(n)


def _solve_linear(m: dict, f: _Fault) -> tuple[str, str]:
    """a*x+b=c: `3x=22-7=15 x=15/3=5 →5`. Mistakes: the sign of b not flipped, an off-by-one difference.
    (A fault yields a non-integer x; the trace then rounds toward zero, as a careless solver would.)"""
    a, b, c = m["a"], m["b"], m["c"]
    kind = f.choice(("sign", "diff")) if f.at(0) else None
    rhs = c - b
    if kind == "sign":
        rhs = c + b
        step = f"{a}x={c}+{b}={rhs}" if b > 0 else f"{a}x={c}-{-b}={rhs}"
    else:
        if kind == "diff":
            rhs = _off_by_one(rhs, f, lo=-10**9)
        step = f"{a}x={c}-{b}={rhs}" if b > 0 else f"{a}x={c}+{-b}={rhs}"
    x = int(rhs / a)  # exact for the gold trace; truncates for a faulty one
    return f"{step} x={rhs}/{a}={x} {ARROW}{x}", str(x)


def _solve_gcd(m: dict, f: _Fault) -> tuple[str, str]:
    """Euclid, pairwise over the list: `780=1*461+319 461=1*319+142 ... →1`. Mistake: an off-by-one remainder."""
    nums = m["numbers"]
    g, parts, step = nums[0], [], 0
    for y in nums[1:]:
        a, b = max(g, y), min(g, y)
        while b:
            q, r = divmod(a, b)
            if f.at(step):
                r = _off_by_one(r, f) % b if b > 1 else r + 1
            parts.append(f"{a}={q}*{b}+{r}")
            a, b = b, r
            step += 1
        g = a
    return " ".join(parts) + f" {ARROW}{g}", str(g)


def _solve_signed_chain(m: dict, f: _Fault) -> tuple[str, str]:
    """Signed chain left to right: `4-1=3 3-7=-4 →-4`. Mistakes: off-by-one step, a flipped operator."""
    terms, ops = m["terms"], m["ops"]
    acc, parts = terms[0], []
    for i, (op, t) in enumerate(zip(ops, terms[1:])):
        kind = f.choice(("step", "op")) if f.at(i) else None
        use = ("-" if op == "+" else "+") if kind == "op" else op
        v = acc + t if use == "+" else acc - t
        if kind == "step":
            v = _off_by_one(v, f, lo=-10**9)
        parts.append(f"{acc}{op}{t}={v}")
        acc = v
    return " ".join(parts) + f" {ARROW}{acc}", str(acc)


# --------------------------------------------------------------------------------------------------------------------
# Generators: (rng, difficulty) -> (question, metadata). Difficulty tables give sizes per level 1..5.

_ADD_DIGITS = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6}
_CHAIN = {1: (3, 2), 2: (3, 3), 3: (4, 3), 4: (4, 4), 5: (5, 4)}  # (operands, digits)
_MUL_DIGITS = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6}
_DIV_DIGITS = {1: 2, 2: 3, 3: 4, 4: 5, 5: 6}  # quotient digits
_MAX = {1: (3, 2), 2: (4, 3), 3: (5, 3), 4: (6, 4), 5: (8, 4)}  # (list length, digits)
_DSUM_DIGITS = {1: 3, 2: 5, 3: 7, 4: 9, 5: 12}
_WORD_LEN = {1: 6, 2: 10, 3: 14, 4: 18, 5: 24}
_LINEAR = {1: (5, 9, 9, False), 2: (9, 20, 50, False), 3: (9, 20, 50, True), 4: (19, 50, 200, True),
           5: (49, 100, 999, True)}  # (max a, max |x|, max |b|, negatives allowed)
_GCD = {1: (2, 100), 2: (2, 1000), 3: (2, 10000), 4: (3, 1000), 5: (3, 10000)}  # (numbers, max value)
_SIGNED = {1: (3, 1), 2: (3, 2), 3: (4, 2), 4: (5, 3), 5: (6, 3)}  # (terms, digits)


def _num(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _gen_add(rng, d):
    n = _ADD_DIGITS[d]
    a, b = _num(rng, n), _num(rng, rng.choice((n, n, n - 1)) if n > 1 else n)
    if rng.random() < 0.5:
        a, b = b, a
    return f"Compute {a}+{b}.", {"nums": [a, b], "gold": a + b}


def _gen_sub(rng, d):
    n = _ADD_DIGITS[d]
    a, b = _num(rng, n), _num(rng, rng.choice((n, n, n - 1)) if n > 1 else n)
    a, b = max(a, b), min(a, b)
    return f"Compute {a}-{b}.", {"a": a, "b": b, "gold": a - b}


def _gen_chain(rng, d):
    k, n = _CHAIN[d]
    nums = [_num(rng, n) for _ in range(k)]
    return "Compute " + "+".join(map(str, nums)) + ".", {"nums": nums, "gold": sum(nums)}


def _gen_mul1(rng, d):
    a, k = _num(rng, _MUL_DIGITS[d]), rng.randrange(2, 10)
    return f"Compute {a}*{k}.", {"a": a, "d": k, "gold": a * k}


def _gen_div(rng, d):
    q, k = _num(rng, _DIV_DIGITS[d]), rng.randrange(2, 10)
    q = max(q, 1)
    return f"Compute {q * k}/{k}.", {"n": q * k, "d": k, "gold": q}


def _gen_max(rng, d):
    k, n = _MAX[d]
    xs = [_num(rng, rng.choice((n, n - 1)) if n > 1 else n) for _ in range(k)]
    return "Which is largest: " + ", ".join(map(str, xs)) + "?", {"xs": xs, "gold": max(xs)}


def _gen_digit_sum(rng, d):
    x = _num(rng, _DSUM_DIGITS[d])
    return f"What is the digit sum of {x}?", {"n": x, "gold": sum(map(int, str(x)))}


def _gen_count_letter(rng, d):
    length = _WORD_LEN[d] + rng.randrange(-2, 3)
    ch = rng.choice(string.ascii_lowercase)
    word = "".join(ch if rng.random() < 0.25 else rng.choice(string.ascii_lowercase) for _ in range(length))
    return f'How many "{ch}" in "{word}"?', {"word": word, "letter": ch, "gold": word.count(ch)}


def _gen_linear(rng, d):
    amax, xmax, bmax, neg = _LINEAR[d]
    a = rng.randrange(2, amax + 1)
    x = rng.randrange(-xmax if neg else 0, xmax + 1)
    b = rng.randrange(1, bmax + 1)
    if neg and rng.random() < 0.5:
        b = -b
    c = a * x + b
    lhs = f"{a}x+{b}" if b > 0 else f"{a}x-{-b}"
    return f"Solve for x: {lhs}={c}.", {"a": a, "b": b, "c": c, "gold": x}


def _rg_entry(name: str, rng: random.Random, **config) -> dict:
    import reasoning_gym  # imported lazily: it costs ~0.7 s

    seed = rng.randrange(2**31)
    return reasoning_gym.create_dataset(name, size=1, seed=seed, **config)[0]


def _gen_gcd(rng, d):
    k, vmax = _GCD[d]
    e = _rg_entry("gcd", rng, min_numbers=k, max_numbers=k, min_value=2, max_value=vmax)
    nums = list(e["metadata"]["numbers"])
    return e["question"], {"numbers": nums, "gold": math.gcd(*nums), "rg_answer": e["answer"]}


def _gen_signed_chain(rng, d):
    k, n = _SIGNED[d]
    e = _rg_entry("chain_sum", rng, min_terms=k, max_terms=k, min_digits=n, max_digits=n)
    toks = e["metadata"]["expression"].split()
    terms, ops = [int(toks[0])], []
    for op, t in zip(toks[1::2], toks[2::2]):
        ops.append(op)
        terms.append(int(t))
    gold = terms[0] + sum(t if o == "+" else -t for o, t in zip(ops, terms[1:]))
    return e["question"], {"terms": terms, "ops": ops, "gold": gold, "rg_answer": e["answer"]}


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[random.Random, int], tuple[str, dict]]  # (rng, difficulty) -> (question, metadata)
    solve: Callable[[dict, _Fault], tuple[str, str]]  # (metadata, fault) -> (cot, answer)
    n_steps: Callable[[dict], int]  # how many steps a fault can target
    description: str


def _n_cols(m):
    return max(len(str(n)) for n in m["nums"])


def _n_gcd_steps(m):
    return len(_solve_gcd(m, _NO_FAULT)[0].split()) - 1


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("add", _gen_add, lambda m, f: _solve_columns(m["nums"], f), _n_cols, "two-operand addition, column CoT"),
    Task("sub", _gen_sub, _solve_sub, lambda m: len(str(m["a"])), "subtraction a-b>=0 with borrows"),
    Task("chain_sum", _gen_chain, lambda m, f: _solve_columns(m["nums"], f), _n_cols, "multi-operand column sum"),
    Task("mul1", _gen_mul1, _solve_mul1, lambda m: len(str(m["a"])), "multi-digit times one digit"),
    Task("div", _gen_div, _solve_div, _n_div_steps, "exact division by one digit, long-division CoT"),
    Task("max", _gen_max, _solve_max, lambda m: len(m["xs"]) - 1, "largest of a list, running max"),
    Task("digit_sum", _gen_digit_sum, _solve_digit_sum, lambda m: len(str(m["n"])) - 1, "sum of the digits"),
    Task("count_letter", _gen_count_letter, _solve_count_letter, lambda m: len(m["word"]), "count a letter"),
    Task("linear_eq", _gen_linear, _solve_linear, lambda m: 1, "solve a*x+b=c for integer x"),
    Task("rg_gcd", _gen_gcd, _solve_gcd, _n_gcd_steps, "reasoning-gym gcd, Euclid CoT"),
    Task("rg_chain_sum", _gen_signed_chain, _solve_signed_chain, lambda m: len(m["ops"]),
         "reasoning-gym chain_sum (+/-), running CoT"),
]}

# Held-out evaluation mixture used by the notebooks: (task, difficulty). Every family has a cheap check by the inverse
# operation (CHECKERS below), so an aggregator can check candidates instead of counting them (issue 18): a+b, a-b,
# a*d, n/d and a*x+b=c. Levels were chosen on the validation split (README, calibration notes), never on this one;
# shift all levels with make_suite(difficulty_offset=...).
DEFAULT_REASONING_SUITE: tuple[tuple[str, int], ...] = (
    ("add", 2),          # 3-digit + 3-digit, checked by s-b
    ("sub", 2),          # 3-digit borrows, checked by r+b
    ("mul1", 2),         # 3 digits x 1 digit, checked by p/d
    ("div", 2),          # 3-digit quotient, one-digit divisor, checked by q*d
    ("linear_eq", 2),    # a*x+b=c, checked by substituting x
)


# --------------------------------------------------------------------------------------------------------------------
# Split and generation


def _question_bucket(task: str, question: str) -> int:
    h = hashlib.blake2b(f"{task}\x00{question}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % HELDOUT_BUCKETS


def is_heldout(task: str, question: str) -> bool:
    """True when the question belongs to the held-out side of the split (a stable hash: same on every machine)."""
    return _question_bucket(task, question) == 0


def split_of(task: str, question: str) -> str:
    """"test" (bucket 0: held out, for the claims), "val" (bucket 1: for choosing difficulties and budgets, never
    trained on) or "train" (the other buckets)."""
    b = _question_bucket(task, question)
    return "test" if b == 0 else "val" if b == 1 else "train"


def _check(task: str, difficulty: int) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    if not isinstance(difficulty, int) or not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"task {task!r}: difficulty must be an int in 1..{MAX_DIFFICULTY}, got {difficulty!r}")
    return TASKS[task]


def make_problems(task: str, n: int, seed: int = 0, difficulty: int = 1, split: str = "train",
                  allow_fewer: bool = False) -> list[Problem]:
    """`n` distinct problems of `task` at `difficulty`, deterministic given (task, n, seed, difficulty, split).

    `split` "train", "val" and "test" draw from different seed streams and from disjoint parts of the question space
    (`split_of`), so no held-out or validation question is ever a training question. Raises ValueError when the space at this
    difficulty is too small for `n` distinct problems, unless `allow_fewer` (then it returns the ones it found).
    """
    t = _check(task, difficulty)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"zaya-tasks|{task}|{split}|{difficulty}|{seed}")
    out, seen, tries = [], set(), 0
    max_tries = 40 * n + 2000
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            if allow_fewer:
                break
            raise ValueError(f"task {task!r} at difficulty {difficulty}: could only find {len(out)} distinct {split} "
                             f"problems of the {n} asked; lower n or raise the difficulty")
        question, meta = t.generate(rng, difficulty)
        if question in seen or split_of(task, question) != split:
            continue
        seen.add(question)
        cot, answer = t.solve(meta, _NO_FAULT)
        if answer != str(meta["gold"]):  # the solver and the generator's own arithmetic must agree
            raise AssertionError(f"{task}: solver answer {answer} != gold {meta['gold']} for {question!r}")
        out.append(Problem(task, question, answer, cot, difficulty, seed, meta))
    return out


def make_suite(n_per_task: int, seed: int = 0, split: str = "test",
               suite: tuple[tuple[str, int], ...] | list | None = None, difficulty_offset: int = 0) -> list[Problem]:
    """Problems of every (task, difficulty) in `suite` (default `DEFAULT_REASONING_SUITE`), `n_per_task` each, with
    every difficulty shifted by `difficulty_offset` and clamped to 1..MAX_DIFFICULTY."""
    out = []
    for task, d in (suite or DEFAULT_REASONING_SUITE):
        d = min(MAX_DIFFICULTY, max(1, int(d) + difficulty_offset))
        out += make_problems(task, n_per_task, seed=seed, difficulty=d, split=split)
    return out


def corrupt_rollout(problem: Problem, rng: random.Random, error_rate: float = 1.0) -> str:
    """A full response from a "programmatic solver with realistic mistakes" (expert-aggregation candidates, issue 5).

    With probability `error_rate` the solver makes one plausible mistake at a random step (dropped carry or borrow,
    off-by-one digit, wrong operand, ...) and carries on from it, so the response is well formed but its boxed answer
    is wrong; otherwise the gold response is returned. With `error_rate=1.0` (default) it is always wrong.
    """
    return format_response(*_corrupt_solution(problem, rng, error_rate))


def _corrupt_solution(problem: Problem, rng: random.Random, error_rate: float = 1.0) -> tuple[str, str]:
    """`corrupt_rollout` as (cot, answer), drawing the same random numbers."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    if rng.random() >= error_rate:
        return problem.cot, problem.answer
    t = TASKS[problem.task]
    m = problem.metadata
    n = max(1, t.n_steps(m))
    for _ in range(32):
        cot, ans = t.solve(m, _Fault(rng.randrange(n), rng))
        if ans != problem.answer:
            return cot, ans
    # Some faults are silent (e.g. a skipped 0 digit). Fall back to a slip in the last step: the final number
    # written one off, the CoT's last value changed to match so the trace stays self-consistent.
    wrong = str(int(problem.answer) + rng.choice((-1, 1)))
    body, _ = problem.cot.rsplit(ARROW, 1)
    return f"{body}{ARROW}{wrong}", wrong


# --------------------------------------------------------------------------------------------------------------------
# Checking a candidate answer (what an aggregator does with the endings of earlier attempts)
#
# RSA beats voting when an aggregator can check candidates instead of only counting them [RSA paper §4; issue 18].
# A check states its equation first, every number of it copied from the problem or the candidate before anything is
# computed (`260+519=779?`), then computes in the solvers' compact CoT format and compares the result with the
# equation's target digit by digit (`→779 9|9= 7|7= 7|7=`), then `ok` or `no`. Measured on `val` (issue 18): with the
# target written after the computation (`→789 want 779`), the tiny model copied it from the result it had just
# written (`→1096 want 136` for 916) and accepted wrong candidates. Where the inverse operation is a skill the model
# has (a-b=r checked by r+b, n/d=q by q*d, a*x+b=c by substituting x) the check runs it. Where it is harder than the
# solve (s-b for a sum, p/d for a product: `FORWARD_CHECKED`), checking a candidate means redoing the solve, so an
# aggregator solves ONCE, first, then compares each candidate with its result (`_forward_response`); measured: with a
# redo per candidate written after the candidate's value (`A1 553: 574+79: ...`), the model copied the candidate's
# digits into the operands. Tasks without a cheap check (count_letter, max, ...) have no checker: an aggregator
# re-solves them.


def _as_int(answer: str | None) -> int | None:
    if answer is None:
        return None
    a = answer.strip()
    if a.startswith("-"):
        return -int(a[1:]) if a[1:].isdigit() else None
    return int(a) if a.isdigit() else None


def _compare(r: int, e: int) -> str:
    """The digits of R and E compared right to left up to the first mismatch (`_` where a number has no digit):
    `3|3= 2|2= 8|8=` (R = E = 823), `1|3≠`. Each verdict is on two digits just written, which a tiny model gets right
    where it does not get `R == E` right as a whole (measured: whole-number verdicts were near chance; with the
    verdict written between the digits, `8≠8` appeared)."""
    rs, es = str(r)[::-1], str(e)[::-1]
    parts = []
    for i in range(max(len(rs), len(es))):
        a, b = (rs[i] if i < len(rs) else "_"), (es[i] if i < len(es) else "_")
        parts.append(f"{a}|{b}" + ("=" if a == b else "≠"))  # both digits first, then the verdict on them
        if a != b:
            break
    return " ".join(parts)


def _check_add(m: dict, x: int) -> tuple[str, bool]:
    a, b = m["nums"]
    cot, s = _solve_columns([a, b], _NO_FAULT)  # forward-checked: redo the sum, compare with x
    return f"{a}+{b}={x}? {cot} {_compare(int(s), x)}", int(s) == x


def _check_sub(m: dict, x: int) -> tuple[str, bool]:
    if x < 0:
        return f"{x}<0", False
    cot, s = _solve_columns([x, m["b"]], _NO_FAULT)
    return f"{x}+{m['b']}={m['a']}? {cot} {_compare(int(s), m['a'])}", int(s) == m["a"]


def _check_mul1(m: dict, x: int) -> tuple[str, bool]:
    cot, p = _solve_mul1({"a": m["a"], "d": m["d"]}, _NO_FAULT)  # forward-checked: division is harder than the product
    return f"{m['a']}*{m['d']}={x}? {cot} {_compare(int(p), x)}", int(p) == x


def _check_div(m: dict, x: int) -> tuple[str, bool]:
    if x <= 0:
        return f"{x}<1", False
    cot, p = _solve_mul1({"a": x, "d": m["d"]}, _NO_FAULT)
    return f"{x}*{m['d']}={m['n']}? {cot} {_compare(int(p), m['n'])}", int(p) == m["n"]


def _check_linear(m: dict, x: int) -> tuple[str, bool]:
    """Substitute x into a*x+b=c. For x >= 0, a one digit and b > 0 (every held-out level-2 problem) both steps run in
    columns, as the mul1 and add solves do: `16*8+28=180? 6*8=48 c4 1*8+4=12 c1 →128 8+8=16 c1 2+2+1=5 1=1 →156
    6|0≠`. Otherwise (negative x or b, a two-digit a) the product and the sum are written whole."""
    a, b, c = m["a"], m["b"], m["c"]
    ax, sign = a * x, "+" if b > 0 else "-"
    if x >= 0 and a <= 9 and b > 0:
        prod, _ = _solve_mul1({"a": x, "d": a}, _NO_FAULT)
        add, s = _solve_columns([ax, b], _NO_FAULT)
        return f"{x}*{a}+{b}={c}? {prod} {add} {_compare(int(s), c)}", int(s) == c
    return f"{a}*{x}{sign}{abs(b)}={c}? {a}*{x}={ax} {ax}{sign}{abs(b)}={ax + b} {_compare(ax + b, c)}", ax + b == c


CHECKERS: dict[str, Callable[[dict, int], tuple[str, bool]]] = {
    "add": _check_add, "sub": _check_sub, "mul1": _check_mul1, "div": _check_div, "linear_eq": _check_linear,
}
# Tasks whose check is the solve itself: an aggregator solves once and compares the candidates with its result.
FORWARD_CHECKED = frozenset({"add", "mul1"})


def check_candidate(problem: Problem, answer: str | None) -> tuple[str, bool | None]:
    """(check trace, verdict) for a candidate `answer` of `problem`: the inverse-operation CoT and whether it lands
    back on the question (True/False); (trace, None) for a task without a checker or an answer that is no integer."""
    x = _as_int(answer)
    if x is None:
        return "none", False
    check = CHECKERS.get(problem.task)
    if check is None:
        return str(x), None
    trace, ok = check(problem.metadata, x)
    return trace, ok


def _check_in_order(candidate_answers: list[str | None], check: Callable[[int], tuple[str, bool]],
                    parts: list[str]) -> int | None:
    """Append one entry per candidate to `parts` (`A1 none.`, `A2 861 same.`, `A3 861: <trace> ok.`), checking each
    distinct integer with `check(x) -> (trace, ok)` and stopping at the first that passes; returns it (else None)."""
    seen = set()
    for i, ans in enumerate(candidate_answers):
        x = _as_int(ans)
        if x is None:
            parts.append(f"A{i + 1} none.")
        elif x in seen:
            parts.append(f"A{i + 1} {x} same.")
        else:
            seen.add(x)
            trace, ok = check(x)
            parts.append(f"A{i + 1} {x}: {trace} {'ok' if ok else 'no'}.")
            if ok:
                return x
    return None


def _forward_response(cot: str, result: str, candidate_answers: list[str | None]) -> str:
    """An aggregation response for a `FORWARD_CHECKED` task. It opens by naming the candidates' answers; for two of
    them it compares their digits right to left, as every check does (`A1 861 A2 861 1|1= 6|6= 8|8= agree.`), because
    the tiny model cannot tell whole numbers apart (measured: with the names alone it wrote `A1 1311 A2 1311
    differ.`). Agreeing candidates are kept without a redo (`... agree. →861`): a redo that slips would otherwise
    overrule two right candidates. Otherwise (`differ.`) it solves once (`cot`, arriving at `result`), compares each
    distinct candidate with the result digit by digit, stops at the first that matches, and answers the result."""
    vals = [_as_int(a) for a in candidate_answers]
    lead = " ".join(f"A{i + 1} {'none' if v is None else v}" for i, v in enumerate(vals))
    if len(vals) == 2 and None not in vals:
        lead += " " + _compare(vals[0], vals[1])
    if len(vals) >= 2 and vals[0] is not None and all(v == vals[0] for v in vals):
        return format_response(f"{lead} agree. {ARROW}{vals[0]}", str(vals[0]))
    parts, r = ([f"{lead} differ."] if len(vals) >= 2 else []) + [cot], _as_int(result)
    _check_in_order(candidate_answers, lambda x: (_compare(r, x), x == r), parts)
    return format_response(" ".join(parts) + f" {ARROW}{result}", result)


def aggregation_response(problem: Problem, candidate_answers: list[str | None]) -> str:
    """The gold response of an aggregation call that saw candidates with these final answers (None: the ending shows
    no answer). Inverse-checked tasks: check the distinct candidates in order and stop at the first that checks out;
    when none does (or the task has no checker), solve the problem afresh. E.g. for `Compute 779-519.` with
    candidates 270, 260: `<think>A1 270: 270+519=779? 0+9=9 7+1=8 2+5=7 →789 9|9= 8|7≠ no. A2 260: 260+519=779? ...
    →779 9|9= 7|7= 7|7= ok. →260</think>\\boxed{260}`. `FORWARD_CHECKED` tasks: compare the candidates, keep them
    when they agree, else solve once and compare each with the result (`_forward_response`): `<think>A1 851 A2 861
    1|1= 5|6≠ differ. 9+2=11 c1 ... →861 A1 851: 1|1= 5|6≠ no. A2 861: 1|1= 6|6= 8|8= ok. →861</think>\\boxed{861}`.
    """
    if problem.task in FORWARD_CHECKED:
        return _forward_response(problem.cot, problem.answer, candidate_answers)
    parts: list[str] = []
    if problem.task in CHECKERS:
        kept = _check_in_order(candidate_answers, lambda x: check_candidate(problem, str(x)), parts)
        if kept is not None:
            return format_response(" ".join(parts) + f" {ARROW}{kept}", str(kept))
    cot = problem.cot if not parts else " ".join(parts) + " solve: " + problem.cot
    return format_response(cot, problem.answer)


# One checked candidate in an aggregation response: "A2 861: <check trace> ok." (or "no."). The trace never holds
# ". " (checks are digits, operators, arrows and `a|b=` comparisons), so the lazy match stops at the verdict.
_VERDICT = re.compile(r"A(\d+) (-?\d+): (.*?) (ok|no)\.")


def parse_verdicts(text: str) -> list[tuple[int, int, str, bool]]:
    """The candidate checks an aggregation response wrote, in order: (candidate index from 1, the value it checked,
    its check trace, its verdict: True for `ok`). The inverse of `aggregation_response`'s format, for measuring how
    often a model's own checks are right (`zaya_lib.ttc.diagnose`). Candidates written as `A1 none.` or `A2 861 same.`
    carry no verdict and are skipped."""
    return [(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4) == "ok") for m in _VERDICT.finditer(text)]


def aggregation_rollout(problem: Problem, rng: random.Random, correct: bool) -> str:
    """A response as an aggregation call would write it, right or wrong: what a later Markovian RSA round sees as a
    candidate (issue 18: trained only on plain candidates, the tiny aggregator met these in round 2 for the first time
    and lost accuracy round after round). Right: `aggregation_response` over a wrong and the right answer, in random
    order. Wrong: a wrong candidate checked and rejected, then a fresh solve with one realistic mistake.
    `FORWARD_CHECKED` tasks: half of them two agreeing candidates kept (right: the answer; wrong: a wrong answer);
    otherwise right: a redo compared with a wrong and the right candidate; wrong: a redo with one realistic mistake,
    compared with a wrong candidate and answered."""
    if problem.task not in CHECKERS:
        return problem.response() if correct else corrupt_rollout(problem, rng)
    _, wrong = _corrupt_solution(problem, rng)
    if problem.task in FORWARD_CHECKED:
        if rng.random() < 0.5:
            agreed = problem.answer if correct else wrong
            return _forward_response("", agreed, [agreed, agreed])
        if correct:
            answers = [wrong, problem.answer]
            rng.shuffle(answers)
            return aggregation_response(problem, answers)
        cot, ans = _corrupt_solution(problem, rng)
        return _forward_response(cot, ans, [wrong])
    if correct:
        answers = [wrong, problem.answer]
        rng.shuffle(answers)
        return aggregation_response(problem, answers)
    trace, _ = check_candidate(problem, wrong)
    cot, ans = _corrupt_solution(problem, rng)
    return format_response(f"A1 {wrong}: {trace} no. solve: {cot}", ans)

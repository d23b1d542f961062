"""Reasoning tasks: every gold CoT is true arithmetic and ends at the gold answer; determinism; held-out split;
corrupt rollouts are well formed and wrong."""
import random
import re

import pytest

from zaya_lib.data.tasks import (
    ARROW, CHECKERS, DEFAULT_REASONING_SUITE, FORWARD_CHECKED, MAX_DIFFICULTY, TASKS, aggregation_response, aggregation_rollout,
    check_candidate,
    corrupt_rollout, cot_final, is_heldout, make_problems, make_suite, split_of,
)
from zaya_lib.data.tasks import _NO_FAULT  # the fault-free solver, to build expected check traces

RESPONSE_RE = re.compile(r"^<think>([^<>]*)</think>\\boxed\{(-?\d+)\}$")
MAX_RE = re.compile(r"^max\((-?\d+),(-?\d+)\)=(-?\d+)$")
ARITH_RE = re.compile(r"^-?\d+(?:[-+*/]-?\d+)*$")
DIV_RE = re.compile(r"^(\d+)/(\d+)=(\d+)$")
REM_RE = re.compile(r"^r(\d+)$")


def false_claims(cot: str) -> list[str]:
    """Every `lhs=rhs[=...]` piece of a CoT whose evaluable sides disagree (sides with `x` are skipped)."""
    bad = []
    pieces = cot.split()
    for i, piece in enumerate(pieces):
        if (m := DIV_RE.match(piece)) and i + 1 < len(pieces) and (r := REM_RE.match(pieces[i + 1])):
            a, b, q = map(int, m.groups())  # long division: `33/7=4 r5` claims 33 = 7*4 + 5 with 0 <= 5 < 7
            if a != b * q + int(r.group(1)) or not 0 <= int(r.group(1)) < b:
                bad.append(f"{piece} {pieces[i + 1]}")
        elif m := MAX_RE.match(piece):
            a, b, c = map(int, m.groups())
            if max(a, b) != c:
                bad.append(piece)
        elif "=" in piece:
            values = [eval(side) for side in piece.split("=") if ARITH_RE.match(side)]  # digits and + - * / only
            if any(v != values[0] for v in values):
                bad.append(piece)
    return bad


CASES = [(t, d) for t in TASKS for d in range(1, MAX_DIFFICULTY + 1)]


@pytest.mark.parametrize("task,difficulty", CASES, ids=[f"{t}-d{d}" for t, d in CASES])
def test_gold_cot_is_correct(task, difficulty):
    for p in make_problems(task, 25, seed=3, difficulty=difficulty):
        assert p.answer == str(p.metadata["gold"])
        assert cot_final(p.cot) == p.answer, p.cot
        assert false_claims(p.cot) == [], (p.question, p.cot)
        if "rg_answer" in p.metadata:  # reasoning-gym's own answer agrees with ours
            assert p.metadata["rg_answer"] == p.answer
        m = RESPONSE_RE.match(p.response())
        assert m and m.group(1) == p.cot and m.group(2) == p.answer


@pytest.mark.parametrize("task,difficulty", CASES, ids=[f"{t}-d{d}" for t, d in CASES])
def test_corrupt_rollouts_wrong_but_well_formed(task, difficulty):
    rng = random.Random(7)
    n_visible = 0
    problems = make_problems(task, 20, seed=4, difficulty=difficulty)
    for p in problems:
        r = corrupt_rollout(p, rng)
        m = RESPONSE_RE.match(r)
        assert m, r
        cot, ans = m.groups()
        assert ans != p.answer and cot_final(cot) == ans  # wrong, and the trace leads to what it boxes
        n_visible += cot.rsplit("→", 1)[0] != p.cot.rsplit("→", 1)[0]
    # The mistake sits inside the trace (a dropped carry, a wrong step), not only in the final number. Only the
    # fallback for silent faults (final number written one off) leaves the steps intact; allow a few of those.
    assert n_visible >= 0.8 * len(problems)


def test_corrupt_error_rate():
    p = make_problems("add", 1, seed=0, difficulty=3)[0]
    rng = random.Random(0)
    assert corrupt_rollout(p, rng, error_rate=0.0) == p.response()
    wrong = sum(corrupt_rollout(p, rng, error_rate=0.5) != p.response() for _ in range(400))
    assert 150 < wrong < 250  # Binomial(400, 0.5): mean 200, sd 10 -> 5 sd either side
    with pytest.raises(ValueError, match="error_rate"):
        corrupt_rollout(p, rng, error_rate=1.5)


def test_deterministic_and_distinct():
    a = make_problems("chain_sum", 50, seed=11, difficulty=2)
    b = make_problems("chain_sum", 50, seed=11, difficulty=2)
    c = make_problems("chain_sum", 50, seed=12, difficulty=2)
    assert [p.question for p in a] == [p.question for p in b] and [p.cot for p in a] == [p.cot for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.question for p in a}) == 50
    g1 = make_problems("rg_gcd", 10, seed=5, difficulty=2)
    g2 = make_problems("rg_gcd", 10, seed=5, difficulty=2)
    assert [p.question for p in g1] == [p.question for p in g2]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_heldout_disjoint(task):
    train = {p.question for s in (0, 1) for p in make_problems(task, 150, seed=s, difficulty=1)}
    test = {p.question for s in (0, 1) for p in make_problems(task, 30, seed=s, difficulty=1, split="test")}
    val = {p.question for s in (0, 1) for p in make_problems(task, 30, seed=s, difficulty=1, split="val")}
    assert train and test and val and not (train & test) and not (train & val) and not (val & test)
    assert all(is_heldout(task, q) for q in test) and not any(is_heldout(task, q) for q in train | val)
    assert {split_of(task, q) for q in val} == {"val"} and {split_of(task, q) for q in train} == {"train"}


def test_suite_and_errors():
    suite = make_suite(5, seed=0)
    assert len(suite) == 5 * len(DEFAULT_REASONING_SUITE)
    assert {(p.task, p.difficulty) for p in suite} == set(DEFAULT_REASONING_SUITE)
    harder = make_suite(2, seed=0, difficulty_offset=10)
    assert {p.difficulty for p in harder} == {MAX_DIFFICULTY}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_problems("nope", 1)
    with pytest.raises(ValueError, match="difficulty"):
        make_problems("add", 1, difficulty=9)
    with pytest.raises(ValueError, match="split"):
        make_problems("add", 1, split="dev")
    assert len(make_problems("linear_eq", 500, difficulty=1, split="test", allow_fewer=True)) < 500
    with pytest.raises(ValueError, match="distinct"):  # only ~45 held-out questions exist at this level
        make_problems("linear_eq", 500, difficulty=1, split="test")


@pytest.mark.parametrize("task", sorted(CHECKERS))
@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_checks_accept_the_answer_and_reject_realistic_mistakes(task, difficulty):
    """The inverse-operation check lands back on the question for the gold answer and never for a wrong one; every
    `a op b = c` claim in a check trace is true arithmetic."""
    rng = random.Random(7)
    for p in make_problems(task, 60, seed=3, difficulty=difficulty):
        trace, ok = check_candidate(p, p.answer)
        assert ok is True, (p.question, trace)
        assert false_claims(trace) == [], trace
        wrong = corrupt_rollout(p, rng).rsplit("boxed{", 1)[1][:-1]
        trace, ok = check_candidate(p, wrong)
        assert ok is False, (p.question, wrong, trace)
        assert false_claims(trace) == [], trace
    assert check_candidate(p, "x7") == ("none", False) and check_candidate(p, None) == ("none", False)


def test_linear_check_substitutes_in_columns():
    """a*x+b=c with x >= 0, a one digit and b > 0 (every level-1 and level-2 problem): the product runs in mul1's columns
    and the sum in add's, each from numbers already written; other signs fall back to whole-number steps."""
    rng = random.Random(5)
    for p in make_problems("linear_eq", 40, seed=6, difficulty=2):
        a, b, c = p.metadata["a"], p.metadata["b"], p.metadata["c"]
        for x in (int(p.answer), int(p.answer) + rng.choice((1, 2, 3))):
            trace, ok = check_candidate(p, str(x))
            prod = TASKS["mul1"].solve({"a": x, "d": a}, _NO_FAULT)[0]
            add = TASKS["add"].solve({"nums": [a * x, b]}, _NO_FAULT)[0]
            assert trace.startswith(f"{x}*{a}+{b}={c}? {prod} {add} "), trace
            assert ok is (x == int(p.answer))
    neg = [p for p in make_problems("linear_eq", 60, seed=6, difficulty=3) if p.metadata["b"] < 0][0]
    a, b, c = neg.metadata["a"], neg.metadata["b"], neg.metadata["c"]
    trace, ok = check_candidate(neg, neg.answer)
    x = int(neg.answer)
    assert ok and trace.startswith(f"{a}*{x}-{-b}={c}? {a}*{x}={a * x} {a * x}-{-b}={c} "), trace


def test_division_task():
    for d in range(1, 6):
        for p in make_problems("div", 80, seed=1, difficulty=d):
            n, k = p.metadata["n"], p.metadata["d"]
            assert n == int(p.answer) * k and 2 <= k <= 9 and len(p.answer) == {1: 2, 2: 3, 3: 4, 4: 5, 5: 6}[d]
            assert cot_final(p.cot) == p.answer and p.cot.split(f" {ARROW}")[0].endswith(" r0")
    p = make_problems("div", 1, seed=0, difficulty=2)[0]
    assert p.question == f"Compute {p.metadata['n']}/{p.metadata['d']}."


def test_aggregation_response_checks_in_order_and_falls_back_to_solving():
    p = make_problems("sub", 1, seed=2, difficulty=2)[0]
    wrong = str(int(p.answer) + 10)
    r = aggregation_response(p, [wrong, wrong, p.answer])
    body = r.split("<think>")[1].split("</think>")[0]
    assert body.startswith(f"A1 {wrong}: ") and f"A2 {wrong} same." in body and f"A3 {p.answer}: " in body
    assert body.endswith(f"ok. {ARROW}{p.answer}") and r.endswith(f"\\boxed{{{p.answer}}}")
    # the check states its equation (every number from the problem or the candidate) before computing
    b, a = p.metadata["b"], p.metadata["a"]
    assert f"A3 {p.answer}: {p.answer}+{b}={a}? " in body and " want " not in body
    r = aggregation_response(p, [None, wrong])  # nothing checks out: solve afresh
    assert "A1 none." in r and " no. solve: " + p.cot in r and r.endswith(f"\\boxed{{{p.answer}}}")
    q = make_problems("count_letter", 1, seed=2, difficulty=2)[0]  # no checker: the plain solve
    assert aggregation_response(q, ["1", "2"]) == q.response()


def test_forward_checked_tasks_solve_once_then_compare():
    """add and mul1 (checking = redoing the solve): the response names the candidates and, for two, compares their digits;
    agreeing candidates are kept as they are; otherwise one solve comes (its operands read from the problem before any
    candidate is checked), then each distinct candidate is compared with its result, and the result is the answer
    even when no candidate matches."""
    assert FORWARD_CHECKED == {"add", "mul1"}
    for task in sorted(FORWARD_CHECKED):
        p = make_problems(task, 1, seed=2, difficulty=2)[0]
        a = p.answer
        wrong = str(int(a) + 10)
        same = " ".join(f"{d}|{d}=" for d in reversed(a))
        assert aggregation_response(p, [a, a]) == f"<think>A1 {a} A2 {a} {same} agree. {ARROW}{a}</think>\\boxed{{{a}}}"
        assert aggregation_response(p, [wrong, wrong]).endswith(f"\\boxed{{{wrong}}}")  # agreement is kept
        r = aggregation_response(p, [wrong, a])  # the first differing digit pair ends the comparison
        assert r.startswith(f"<think>A1 {wrong} A2 {a} {a[-1]}|{a[-1]}= {wrong[-2]}|{a[-2]}≠ differ. {p.cot} A1 {wrong}: ")
        body = aggregation_response(p, [wrong, wrong, a]).split("<think>")[1].split("</think>")[0]
        assert body.startswith(f"A1 {wrong} A2 {wrong} A3 {a} differ. {p.cot} A1 {wrong}: ")  # names only for 3
        assert f"A2 {wrong} same." in body and f"A3 {a}: " in body and body.endswith(f"ok. {ARROW}{a}")
        r = aggregation_response(p, [None, wrong])  # no candidate matches: the solve's own result
        assert r == f"<think>A1 none A2 {wrong} differ. {p.cot} A1 none. A2 {wrong}: " + r.split(f"A2 {wrong}: ")[1]
        assert " no. " in r and r.endswith(f"\\boxed{{{a}}}") and "solve:" not in r


def test_aggregation_rollouts_are_right_or_wrong_as_asked():
    rng = random.Random(3)
    agreed = 0
    for task in sorted(CHECKERS):
        for p in make_problems(task, 20, seed=4, difficulty=2):
            right, wrong = aggregation_rollout(p, rng, True), aggregation_rollout(p, rng, False)
            assert right.endswith(f"\\boxed{{{p.answer}}}")
            ans = wrong.rsplit("boxed{", 1)[1][:-1]
            assert ans != p.answer
            if task in FORWARD_CHECKED:  # agreeing candidates kept, or a solve (that may slip) then comparisons
                for r in (right, wrong):
                    agreed += " agree. " in r
                    assert " agree. " in r or cot_final(r.split("</think>")[0].split(" A1 ")[0]) == \
                        r.rsplit("boxed{", 1)[1][:-1]
                continue
            assert right.startswith("<think>A1 ")
            assert wrong.startswith("<think>A1 ") and " no. solve: " in wrong
            assert cot_final(wrong.split("</think>")[0]) == ans  # the wrong solve arrives where it says
    assert 20 <= agreed <= 60  # about half of the 80 forward-checked rollouts
    q = make_problems("count_letter", 1, seed=2, difficulty=2)[0]
    assert aggregation_rollout(q, rng, True) == q.response()

"""Verifiers: math, reasoning-gym, code, instruction-following, arithmetic-step and gym rewards, the registry."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zaya_lib.data.answers import score_reasoning_gym
from zaya_lib.rl import verifiers as V

from _helpers import FUZZ_TEXT


# ---------------------------------------------------------------------------------------------------- arithmetic steps
_arith_alphabet = st.sampled_from(list("0123456789+-*/= x.\n") + ["<think>", "</think>", "99999999999999"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(FUZZ_TEXT, st.lists(_arith_alphabet, max_size=80).map("".join)))
def test_fuzz_arithmetic_steps_never_crash(text):
    ok, total = V.arithmetic_steps(text)
    assert 0 <= ok <= total
    assert V.arithmetic_steps_reward([""], [text]) == [ok / total if total else 0.0]


def test_arithmetic_steps_reward_scores_the_chain():
    right = "<think>8+4=12 c1 6+3+1=10 c1 3+9+1=13 c1 →1302</think>\\boxed{1302}"
    assert V.arithmetic_steps(right) == (3, 3)
    # two slips out of three steps (the model's real mistakes), and precedence in a multiplication chain
    assert V.arithmetic_steps("<think>1+0=0 5+2=6 6+4=10 c1 →106</think>\\boxed{106}") == (1, 3)
    assert V.arithmetic_steps("<think>3*7+4=25 c2 9*7+2=65 c6</think>") == (2, 2)
    # linear equations: the chained form checks both steps; a wrong integer division is wrong
    assert V.arithmetic_steps("<think>7x=130-11=119 x=119/7=17 →17</think>") == (2, 2)
    assert V.arithmetic_steps("<think>6x=31-7=16 x=16/6=5 →5</think>") == (0, 2)
    # only the reasoning counts; no equation, division by zero, or an equation in the final answer: no credit
    assert V.arithmetic_steps("<think>e p l</think>\\boxed{2+2=4}") == (0, 0)
    assert V.arithmetic_steps("<think>1/0=3</think>") == (0, 1)
    assert V.arithmetic_steps_reward(["", ""], [right, "<think>c w x</think>\\boxed{0}"]) == [1.0, 0.0]


def test_math_reward_trl_signature():
    comps = ["<think>.</think>\\boxed{5}", [{"role": "assistant", "content": "\\boxed{4}"}], "garbage"]
    assert V.math_reward(["p"] * 3, comps, answer=["5", "5", "5"], completion_ids=None, trainer_state=None) == [1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="answer"):
        V.math_reward(["p"], ["\\boxed{1}"])


# ---------------------------------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_reward_uses_dataset_scorer():
    import reasoning_gym

    ds = reasoning_gym.create_dataset("spell_backward", size=3, seed=1)
    e = ds[0]
    right = f"<think>...</think>\\boxed{{{e['answer']}}}"
    tagged = f"<answer>{e['answer']}</answer>"
    wrong = "\\boxed{qqqqqq}"
    r = V.reasoning_gym_reward([e["question"]] * 4, [right, tagged, wrong, "nothing"], answer=[e["answer"]] * 4,
                               metadata=[json.dumps(e["metadata"])] * 4)
    assert r[0] == 1.0 and r[1] == 1.0 and r[2] < 1.0 and r[3] == 0.0
    with pytest.raises(ValueError):  # unknown dataset name is a configuration error
        score_reasoning_gym(right, {"answer": "x", "metadata": {}}, task="no_such_task")


# ---------------------------------------------------------------------------------------------------- code


def test_code_reward_fraction():
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}, {"input": "0 0\n", "output": "0\n"}]
    good = "Sure:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    half = "```python\na, b = map(int, input().split())\nprint(a + b if a != 5 else 0)\n```"
    r = V.code_reward(["p"] * 4, [good, half, "no code", "```python\nraise SystemExit(1)\n```"], tests=[json.dumps(tests)] * 4)
    assert r[0] == 1.0 and r[1] == pytest.approx(2 / 3) and r[2] == 0.0 and r[3] == 0.0
    assert V.score_code("while True:\n    pass", tests[:1], timeout_s=0.5) == 0.0
    with pytest.raises(ValueError, match="input"):
        V.score_code("print(1)", [{"stdin": "x"}])


def test_outputs_match():
    assert V.outputs_match("1 2 \n3\n\n", "1 2\n3")
    assert not V.outputs_match("1 2\n3", "1 2\n4")


# ---------------------------------------------------------------------------------------------------- instruction following


@pytest.mark.parametrize("c, good, bad", [
    (V.MaxWords(5), "one two three", "one two three four five six"),
    (V.MinWords(4), "one two three four", "too short"),
    (V.IncludeWords(("river", "blue")), "The Blue river runs.", "The blue sea."),
    (V.ForbidWords(("very",)), "It is good.", "It is very good."),
    (V.JsonOutput(("a", "b")), '{"a": 1, "b": [2]}', '{"a": 1}'),
    (V.JsonOutput(), '```json\n[1, 2]\n```', "[1, 2"),
    (V.BulletCount(2), "Intro\n- one\n* two\n", "- one\n- two\n- three"),
    (V.EndsWith("The end."), "Story. The end.  \n", "The end. Story."),
    (V.StartsWith("Sure."), "Sure. Here.", "Here. Sure."),
    (V.AllLowercase(), "all lower here 123", "Not lower"),
    (V.NoCommas(), "no commas here", "a, b"),
])
def test_constraints(c, good, bad):
    assert c.check(good) and not c.check(bad)
    assert isinstance(c.description, str) and len(c.description) > 5
    assert V.constraint_from_dict(json.loads(json.dumps(c.to_dict()))) == c  # round trip through a dataset cell


def test_constraints_on_garbage():
    for kind, cls in V.CONSTRAINT_TYPES.items():
        c = V._sample_one(kind, __import__("random").Random(0))
        for text in ("", "\x00{{{", "}" * 1000, "- " * 500):
            assert c.check(text) in (True, False)


def test_sampler_is_seeded_and_consistent():
    a, b = V.sample_instruction_example(11, k=3), V.sample_instruction_example(11, k=3)
    assert a == b
    kinds = set()
    for seed in range(200):
        cs = V.constraints_from_json(V.sample_instruction_example(seed, k=3)["constraints"])
        ks = [c.kind for c in cs]
        assert len(cs) == 3 and len(set(ks)) == 3
        assert not {"json", "bullets"} <= set(ks) and not {"max_words", "min_words"} <= set(ks)
        kinds.update(ks)
    assert kinds == set(V.CONSTRAINT_TYPES)  # every kind gets sampled
    with pytest.raises(ValueError):
        V.sample_constraints(0, k=0)
    with pytest.raises(ValueError, match="unknown constraint kind"):
        V.constraint_from_dict({"kind": "rhyme"})


def test_instruction_rewards():
    cons = V.constraints_to_json([V.MaxWords(6), V.AllLowercase(), V.EndsWith("bye")])
    comps = ["<think>Let Me Think</think>short and sweet bye<|end|>", "<think>x</think>This Is Long And Also Capitalised Bye",
             "<think>x</think>short but Capital bye"]
    assert V.instruction_reward(["p"] * 3, comps, constraints=[cons] * 3) == pytest.approx([1.0, 0.0, 2 / 3])
    assert V.instruction_strict_reward(["p"] * 3, comps, constraints=[cons] * 3) == [1.0, 0.0, 0.0]


def test_format_reward():
    assert V.format_reward(None, ["<think>a</think>\\boxed{1}<|end|>", "\\boxed{1}", "<think>a</think>none",
                                  "<think>a</think></think>\\boxed{1}"]) == [1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------- registry


def test_registry():
    for name, fn in V.REWARD_FUNCTIONS.items():
        assert V.get_reward(name) is fn and callable(fn)
    with pytest.raises(KeyError, match="known: .*math"):
        V.get_reward("nope")


def test_gym_reward_stateless():
    from zaya_lib.rl.gym import get_environment

    p = get_environment("add").generate(3, 1)
    r = V.gym_reward(["x"] * 2, [f"\\boxed{{{p['answer']}}}", "\\boxed{-1}"], env=["add"] * 2, problem=[json.dumps(p)] * 2)
    assert r == [1.0, 0.0]

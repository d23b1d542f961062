"""Synthetic code environments: tests generated from reference solutions; reward = fraction passed."""
from __future__ import annotations

import pytest

from zaya_lib.rl.code_envs import CODE_ENVIRONMENTS, TEMPLATES, make_problem, score_program
from zaya_lib.rl.gym import Environment


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_reference_scores_one_and_wrong_scores_less(name):
    p = make_problem(name, seed=3, n_tests=3, difficulty=1)
    assert len(p["tests"]) == 3 and all(t["output"].strip() for t in p["tests"])
    assert p == make_problem(name, seed=3, n_tests=3, difficulty=1)  # deterministic
    assert score_program(p["solution"], p["tests"]) == 1.0
    # a plausible but wrong program: the reference with its output mangled on every other call
    wrong = "import sys, builtins\n_p = builtins.print\n_n = [0]\ndef print(*a, **k):\n    _n[0] += 1\n" \
            "    _p('x', *a, **k) if _n[0] % 2 else _p(*a, **k)\n" + p["solution"]
    assert score_program(wrong, p["tests"]) < 1.0
    assert score_program("print('')", p["tests"]) == 0.0


def test_hostile_programs_score_zero():
    p = make_problem("sum_list", seed=1, n_tests=2)
    hostile = [
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",  # fork bomb
        "a = []\nwhile True:\n    a.append(bytearray(10**7))\n",  # memory bomb
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nprint(0)\n",  # network
        "import shutil\nshutil.rmtree('/work', ignore_errors=False)\n",  # deleting files
        "while True:\n    pass\n",  # infinite loop
    ]
    for prog in hostile:
        assert score_program(prog, p["tests"], timeout_s=0.5) == 0.0, prog


def test_code_environment_protocol():
    env = CODE_ENVIRONMENTS["code/reverse_words"]
    assert isinstance(env, Environment)
    prob = env.generate(5, 0)
    good = env.verify(prob, f"<think>easy</think>{prob['answer']}<|end|>")
    assert good == {"reward": 1.0, "accuracy": 1.0, "format": 1.0}
    bad = env.verify(prob, "```python\nprint(input())\n```")
    assert bad["accuracy"] == 0.0 and bad["format"] == 1.0
    assert env.verify(prob, "no code")["format"] == 0.0


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown code template 'nope'; known: .*sum_list"):
        make_problem("nope", 0)
    with pytest.raises(ValueError):
        make_problem("sum_list", 0, n_tests=0)


def test_difficulty_grows_inputs():
    small = make_problem("sum_list", seed=2, n_tests=5, difficulty=0)
    big = make_problem("sum_list", seed=2, n_tests=5, difficulty=4)
    size = lambda p: sum(len(t["input"]) for t in p["tests"])  # noqa: E731
    assert size(big) > size(small)

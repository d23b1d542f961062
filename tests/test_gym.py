"""The adaptive environment gym: RLVE difficulty rule, environments, save/resume."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from zaya_lib.rl.gym import ENVIRONMENTS, DifficultyController, Environment, Gym, get_environment


def test_promotion_after_enough_correct_answers():
    c = DifficultyController(window=4, min_prompts=8, samples_per_prompt=2, threshold=0.9)
    for i in range(15):  # 8 prompts x 2 samples = 16 needed: nothing happens before the 16th
        assert not c.record(0, 1.0)
    assert c.h == 0 and c.n == 15
    assert c.record(0, 1.0)
    assert c.h == 1 and c.n == 0 and c.acc_sum == 0.0


def test_no_promotion_below_threshold_and_counters_reset():
    c = DifficultyController(min_prompts=8, samples_per_prompt=2)
    for i in range(16):
        c.record(0, float(i >= 2))  # 14/16 = 0.875 < 0.9
    assert c.h == 0 and c.n == 0  # checked, not promoted, reset
    for i in range(16):
        c.record(0, float(i >= 1))  # 15/16 = 0.9375
    assert c.h == 1


def test_threshold_is_inclusive_and_only_top_level_counts():
    c = DifficultyController(min_prompts=10, samples_per_prompt=1)
    for _ in range(100):
        c.record(-1, 1.0)  # not the top level: ignored
    assert c.n == 0
    for i in range(10):
        c.record(0, float(i != 0))  # exactly 0.9
    assert c.h == 1
    c.h = 3
    for _ in range(50):
        assert not c.record(2, 1.0)  # below h: never counted
    assert c.n == 0


def test_window_sampling_range():
    rng = random.Random(0)
    c = DifficultyController(window=4)
    assert {c.sample(rng) for _ in range(100)} == {0}
    c.h = 1
    assert {c.sample(rng) for _ in range(200)} == {0, 1}
    c.h = 6
    counts = Counter(c.sample(rng) for _ in range(2000))
    assert set(counts) == {3, 4, 5, 6}
    # uniform: each level ~500 of 2000; binomial sd ~19, so 350 is ~8 sd below the mean
    assert min(counts.values()) > 350


def test_bad_controller_args():
    with pytest.raises(ValueError):
        DifficultyController(window=0)


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_every_environment_verifies_gold_and_rejects_wrong(name):
    env = get_environment(name)
    assert isinstance(env, Environment) and env.name == name
    for d in (0, 2, 5):
        p = env.generate(seed=123 + d, difficulty=d)
        assert p == env.generate(seed=123 + d, difficulty=d)  # deterministic
        # tasks.py families keep SFT's prompt format (the bare question); every other environment asks for \boxed{}
        assert ("\\boxed{}" in p["prompt"] or name.startswith("tasks/")) and p["answer"] != ""
        json.dumps(p)  # problems travel in dataset columns
        gold = env.verify(p, f"<think>working</think>The answer is \\boxed{{{p['answer']}}}.<|end|>")
        assert gold == {"reward": 1.0, "accuracy": 1.0, "format": 1.0}, (name, d, p)
        assert env.verify(p, [{"role": "assistant", "content": f"\\boxed{{{p['answer']}}}"}])["accuracy"] == 1.0
        wrong = env.verify(p, "<think>x</think>\\boxed{qqq 17 wrong}")
        assert wrong["accuracy"] == 0.0 and wrong["reward"] < 1.0
        inside_think = env.verify(p, f"<think>\\boxed{{{p['answer']}}}</think>no final answer")
        assert inside_think["accuracy"] == 0.0 and inside_think["format"] == 0.0
    with pytest.raises(ValueError):
        env.generate(0, -1)


def test_difficulty_changes_problems():
    env = get_environment("add")
    easy, hard = env.generate(1, 0), env.generate(1, 6)
    assert len(easy["answer"]) <= 2 and len(hard["answer"]) >= 7
    rg = get_environment("rg/chain_sum")
    assert rg.generate(5, 10**6)["metadata"]["level"] == rg.max_difficulty  # clamped to the curriculum's top


def test_task_environments_are_the_sft_problems_with_a_level_ladder():
    from zaya_lib.data.tasks import is_heldout, make_problems

    env = get_environment("tasks/add")
    p = env.generate(7, 1)
    gold = make_problems("add", 1, seed=7, difficulty=2, split="train")[0]
    assert (p["prompt"], p["answer"], p["metadata"]["level"]) == (gold.question, gold.answer, 2)
    assert env.generate(7, 99)["metadata"]["level"] == 5  # clamped to the top level
    assert not any(is_heldout(t, get_environment(f"tasks/{t}").generate(s, 1)["prompt"])
                   for t in ("add", "linear_eq") for s in range(20))


def test_unknown_environment_errors():
    with pytest.raises(KeyError, match="unknown environment 'nope'; known: .*add"):
        get_environment("nope")
    with pytest.raises(KeyError, match="nope"):
        Gym(["add", "nope"])
    with pytest.raises(ValueError):
        Gym([])


def _simulate(gym: Gym, steps: int, skill: int, batch: int = 8, group: int = 2) -> None:
    """A fake policy that answers right exactly when difficulty <= skill; runs through `gym_reward` like TRL."""
    for _ in range(steps):
        rows = gym.sample_batch(batch)
        rows = [r for r in rows for _ in range(group)]  # TRL repeats each prompt num_generations times
        comps = [f"\\boxed{{{r['answer']}}}" if r["difficulty"] <= skill else "\\boxed{wrong}" for r in rows]
        cols = {k: [r[k] for r in rows] for k in ("env", "difficulty", "problem", "answer")}
        gym.gym_reward([r["prompt"] for r in rows], comps, **cols)


def test_curriculum_rises_to_skill_and_stops():
    gym = Gym(["add", "compare", "rg/count_bits"], seed=0, samples_per_prompt=2)
    _simulate(gym, steps=60, skill=2)
    # levels 0..2 are always solved and promoted; at h=3 accuracy is 0 so it never goes further
    assert gym.levels() == {"add": 3, "compare": 3, "rg/count_bits": 3}
    assert len(gym.promotions) == 9 and all(p["h"] <= 3 for p in gym.promotions)


def test_save_resume_continues_identically():
    a = Gym(["add", "sort", "mod", "rg/gcd"], seed=7, samples_per_prompt=2)
    _simulate(a, steps=25, skill=4)
    sd = json.loads(json.dumps(a.state_dict()))  # must survive JSON (saved with the run)
    b = Gym(["add", "sort", "mod", "rg/gcd"], seed=999)
    b.load_state_dict(sd)
    assert b.levels() == a.levels() and b.state_dict() == a.state_dict()
    _simulate(a, steps=10, skill=4)
    _simulate(b, steps=10, skill=4)
    assert a.sample_batch(20) == b.sample_batch(20)
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="saved environments"):
        Gym(["add"]).load_state_dict(sd)


def test_gym_reward_needs_columns():
    gym = Gym(["add"])
    with pytest.raises(KeyError, match="difficulty"):
        gym.gym_reward(["p"], ["\\boxed{1}"], env=["add"], problem=["{}"])
    with pytest.raises(KeyError, match="not in this gym"):
        gym.record("mod", 0, 1.0)

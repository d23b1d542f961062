"""The seed study: paired statistics, pooling over seeds, claims from metrics files, and a resumable study run."""
import json
import random

import pytest

from zaya_lib.pipeline import seeds as S


def _write(run, name, obj):
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    (run / "metrics" / name).write_text(json.dumps(obj))


def test_paired_stats_mean_and_interval():
    a = [1, 1, 1, 0, 1, 0, 1, 1] * 10
    b = [1, 0, 0, 0, 1, 0, 0, 1] * 10
    r = S.paired_stats(a, b, seed=0)
    assert r["diff"] == pytest.approx(3 / 8)
    assert r["a"] == pytest.approx(6 / 8) and r["b"] == pytest.approx(3 / 8)
    lo, hi = r["ci95"]
    assert lo < r["diff"] < hi and lo > 0  # 30 of 80 pairs better, none worse: the interval excludes 0
    same = S.paired_stats(a, a)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same, nonzero length"):
        S.paired_stats([1, 0], [1])


def test_pooled_is_stratified_and_covers_a_known_difference():
    rng = random.Random(0)
    pairs = []
    for _ in range(3):  # three seeds, each with a true difference of +0.1 on 0/1 outcomes
        b = [int(rng.random() < 0.4) for _ in range(300)]
        a = [1 if (x or rng.random() < 0.1 / 0.6) else 0 for x in b]
        pairs.append((a, b))
    p = S.pooled_paired_stats(pairs)
    assert p["n"] == 900
    assert p["ci95"][0] < 0.1 < p["ci95"][1]  # the true difference lies inside
    assert p["ci95"][0] > 0
    # width shrinks like 1/sqrt(n): pooled interval narrower than one seed's
    one = S.paired_stats(*pairs[0])
    assert (p["ci95"][1] - p["ci95"][0]) < (one["ci95"][1] - one["ci95"][0])


def test_collect_claims_per_seed_pooled_and_missing(tmp_path):
    for s, (a, b) in {0: ([1, 1, 0, 1] * 20, [0, 1, 0, 1] * 20), 1: ([1, 0, 1, 1] * 20, [1, 0, 0, 1] * 20)}.items():
        run = tmp_path / f"seed{s}"
        _write(run, "06_rl_cascade.json", {"paired": {"rl_vs_sft_greedy": {"a": a, "b": b, "label_a": "rl",
                                                                          "label_b": "sft"}}})
        # notebook 05's own pass@k margin is not the claim's: pass@N is read from notebook 07 (N = RSA population)
        _write(run, "05_sft.json", {"values": {"sft_single_sample": 0.4 + 0.05 * s, "sft_passn_margin": 0.9}})
        _write(run, "07_markovian_rsa.json", {"values": {"sft_passn_margin": 0.1 + 0.1 * s}})
    c = S.collect_claims(tmp_path, [0, 1, 2])
    rl = c["paired"]["rl_vs_sft_greedy"]
    assert set(rl["per_seed"]) == {"0", "1"} and rl["missing_seeds"] == [2]
    assert rl["pooled"]["diff"] == pytest.approx(0.25) and rl["pooled"]["n"] == 160
    assert rl["holds"] is False  # a missing seed never counts as holding
    assert c["paired"]["mrsa_vs_majority"]["pooled"] is None and not c["paired"]["mrsa_vs_majority"]["holds"]
    c2 = S.collect_claims(tmp_path, [0, 1])
    assert c2["paired"]["rl_vs_sft_greedy"]["holds"] is True
    v = c2["values"]["sft_single_sample"]
    assert v["holds"] and v["mean"] == pytest.approx(0.425)
    m = c2["values"]["sft_passn_margin"]
    assert m["source"] == "07_markovian_rsa.json" and m["mean"] == pytest.approx(0.15)
    assert m["holds"] is False  # seed 0's margin (0.1) is below 0.15: every seed must pass
    md = S.render_claims_md(c2)
    assert "rl_vs_sft_greedy" in md and "| yes |" in md and "missing" in md  # other claims are missing
    assert "rsa_tokens.png" not in md  # no seed has notebook 07's metrics: no figure, no link
    S.write_claims(tmp_path, c2)
    assert json.loads((tmp_path / "claims.json").read_text())["seeds"] == [0, 1]
    assert (tmp_path / "figures" / "claim_rl_vs_sft_greedy.png").stat().st_size > 1000


def test_rsa_curves_average_sampling_repeats_and_plot_the_seed_spread(tmp_path):
    def rounds(accs, tok):
        return [{"round": t, "majority_acc": a, "tokens_per_problem": tok * (t + 1)} for t, a in enumerate(accs)]
    for s in (0, 1):
        _write(tmp_path / f"seed{s}", "07_markovian_rsa.json", {
            "markovian_rounds_by_seed": [rounds([0.5, 0.6 + 0.1 * s], 100), rounds([0.5, 0.8 + 0.1 * s], 100)],
            "plain_rounds_by_seed": [rounds([0.5, 0.4], 120)],
            "sc_by_seed": [{"majority_acc": [0.5, 0.55, 0.6], "tokens_per_problem": [40, 80, 120]},
                           {"majority_acc": [0.5, 0.65], "tokens_per_problem": [40, 80]}]})
    c = S.rsa_curves(tmp_path, [0, 1, 2])  # seed 2 has no metrics: left out, not an error
    assert c["markovian"]["seeds"] == [0, 1] and c["markovian"]["acc"] == [[0.5, 0.7], [0.5, pytest.approx(0.8)]]
    assert c["markovian"]["tokens"][0] == [100, 200] and c["plain"]["acc"][1] == [0.5, 0.4]
    assert c["majority vote"]["acc"][0] == [0.5, pytest.approx(0.6)] and c["majority vote"]["tokens"][0] == [40, 80]  # shortest run
    path = S.plot_rsa_curves(c, tmp_path / "figures")
    assert path.name == "rsa_tokens.png" and path.stat().st_size > 1000
    assert S.plot_rsa_curves(S.rsa_curves(tmp_path, [2]), tmp_path / "none") is None


def test_a_negative_seed_fails_the_claim(tmp_path):
    for s, (a, b) in {0: ([1] * 50, [0] * 50), 1: ([0, 1] * 25, [1, 1] * 25)}.items():
        _write(tmp_path / f"seed{s}", "06_rl_cascade.json", {"paired": {"rl_vs_sft_greedy": {"a": a, "b": b}}})
    rl = S.collect_claims(tmp_path, [0, 1])["paired"]["rl_vs_sft_greedy"]
    assert rl["pooled"]["diff"] > 0 and rl["per_seed"]["1"]["diff"] < 0 and rl["holds"] is False


def test_study_runs_each_seed_into_its_own_folder(tmp_path, monkeypatch, capsys):
    from zaya_lib.pipeline import runner

    calls = []

    def fake_run(params_path, only=None, force=False, outputs_root="outputs", log=print, **kw):
        import yaml

        data = yaml.safe_load(open(params_path))
        calls.append((data["seed"], data["run_name"], str(outputs_root)))
        run = tmp_path / "tiny-seeds" / data["run_name"]
        _write(run, "06_rl_cascade.json", {"paired": {"rl_vs_sft_greedy": {"a": [1, 1], "b": [0, 1]}}})

    monkeypatch.setattr(runner, "run_pipeline", fake_run)
    params = tmp_path / "tiny.yaml"
    params.write_text("seed: 0\nrsa_N: 4\n")
    monkeypatch.setattr(runner, "plan_run", lambda p, only=None, outputs_root=None: None)
    claims = S.run_seed_study(params, [0, 1], outputs_root=tmp_path, log=lambda *a, **k: None)
    assert calls == [(0, "seed0", str(tmp_path / "tiny-seeds")), (1, "seed1", str(tmp_path / "tiny-seeds"))]
    assert "\nseed: 1\n" in (tmp_path / "tiny-seeds" / "seed1.params.yaml").read_text()
    assert claims["paired"]["rl_vs_sft_greedy"]["pooled"]["n"] == 4
    assert (tmp_path / "tiny-seeds" / "claims.md").is_file()
    with pytest.raises(ValueError, match="repeated seeds"):
        S.run_seed_study(params, [1, 1], outputs_root=tmp_path)


def test_bad_params_fail_before_any_seed_runs(tmp_path):
    """A real plan_run: an unknown key fails at once, naming it, and no seed folder is created."""
    from zaya_lib.pipeline.params import ParamsError

    params = tmp_path / "bad.yaml"
    params.write_text("seed: 0\nno_such_key: 1\n")
    with pytest.raises(ParamsError, match="no_such_key"):
        S.run_seed_study(params, [0, 1], outputs_root=tmp_path, log=lambda *a, **k: None)
    assert not (tmp_path / "bad-seeds" / "seed0").exists()

"""The seed study: the whole pipeline once per seed, and every paired claim of the report pooled over the seeds.

    python -m zaya_lib seeds --params params/tiny.yaml --seeds 0 1 2      ->  outputs/tiny-seeds/

Notable features:
- One run folder per seed (`outputs/<profile>-seeds/seed<k>/`), each an ordinary pipeline run whose parameters are
  the profile's with `seed: k` (written to `seed<k>.params.yaml` beside it, the record of what ran). Resumable like
  `run`: an interrupted study continues where it stopped (finished notebooks of finished seeds are skipped).
- Claims are read from the notebooks' metrics: every notebook that makes a paired claim stores, under
  `metrics["paired"][<claim id>]`, the two per-problem outcome vectors it compares on the same held-out problems
  (`a` the method, `b` its baseline), with labels. Value claims (a band a number must fall in) are stored under
  `metrics["values"][<claim id>]`.
- Per seed: the paired mean difference with a bootstrap 95% interval over problems. Pooled: the mean over every
  (seed, problem) pair with a bootstrap that resamples problems within each seed (stratified), so each seed keeps
  its weight. A claim holds when the pooled interval excludes 0 AND every seed's point estimate is positive.
- Output: `claims.json` (every number), `claims.md` (one table row per claim, each seed's value, the pooled interval,
  the verdict) and one figure per claim with the seeds side by side (`figures/claim_<id>.png`); `figures/
  rsa_tokens.png` plots accuracy against generated tokens for Markovian RSA, plain RSA and majority vote, every
  seed's curve and the spread over seeds.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from zaya_lib.utils import atomic_write_json, atomic_write_text

__all__ = ["CLAIMS", "VALUE_CLAIMS", "study_dir", "run_seed_study", "collect_claims", "paired_stats",
           "pooled_paired_stats", "render_claims_md", "plot_claims", "rsa_curves", "plot_rsa_curves"]

# claim id -> (notebook metrics file, statement). The notebooks write the vectors; this table is the report's order.
CLAIMS: dict[str, tuple[str, str]] = {
    "rl_vs_sft_greedy": ("06_rl_cascade.json",
                         "the RL cascade's final checkpoint is above the SFT checkpoint on held-out greedy accuracy"),
    "mrsa_vs_majority": ("07_markovian_rsa.json",
                         "Markovian RSA's final round is above majority vote over independent samples at no more "
                         "generated tokens"),
    "mrsa_vs_round0": ("07_markovian_rsa.json",
                       "Markovian RSA's final round is above its own round 0 (population accuracy)"),
    "agg_vs_noagg": ("07_markovian_rsa.json",
                     "under the same Markovian RSA settings, the aggregation-trained SFT checkpoint is above the "
                     "control trained without aggregation data"),
}
# value claims: id -> (metrics file, statement, low, high) on the pooled and on every seed's value
VALUE_CLAIMS: dict[str, tuple[str, str, float, float]] = {
    "sft_single_sample": ("05_sft.json", "SFT single-sample accuracy lies in [0.3, 0.7]", 0.3, 0.7),
    # N is Markovian RSA's population (rsa_N): notebook 07 samples it from the SFT checkpoint as round 0
    "sft_passn_margin": ("07_markovian_rsa.json", "SFT pass@N (N = the Markovian RSA population, its round 0) is at "
                         "least 0.15 above its single-sample accuracy", 0.15, 1.0),
}


def study_dir(params_path: str | Path, outputs_root: str | Path = "outputs") -> Path:
    return Path(outputs_root) / f"{Path(params_path).stem}-seeds"


def _seed_params(params_path: Path, seed: int, out: Path) -> Path:
    """The profile's params with `seed` and `run_name` set, written beside the seed's run folder."""
    data = yaml.safe_load(params_path.read_text()) or {}
    if not isinstance(data, dict):
        from zaya_lib.pipeline.params import ParamsError

        raise ParamsError(f"{params_path}: expected a mapping of parameters at the top level")
    data.update(seed=int(seed), run_name=f"seed{seed}")
    head = (f"# {params_path} with seed: {seed} (written by `python -m zaya_lib seeds`; the record of what ran in "
            f"seed{seed}/)\n")
    path = out / f"seed{seed}.params.yaml"
    atomic_write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path


def run_seed_study(params_path: str | Path, seeds: Sequence[int], outputs_root: str | Path = "outputs",
                   force: bool = False, only: list[str] | None = None, log: Callable[..., None] = print) -> dict:
    """Run the pipeline once per seed (resumably), then collect and write the claims. Returns the claims dict.

    Every seed's parameters are validated before the first notebook of the first seed runs."""
    from zaya_lib.pipeline import runner

    params_path = Path(params_path)
    if not seeds:
        raise ValueError("seed study: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed study: repeated seeds {list(seeds)}")
    out = study_dir(params_path, outputs_root)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_seed_params(params_path, s, out) for s in seeds]
    for p in paths:  # fail on bad parameters before any work
        runner.plan_run(p, only=only, outputs_root=out)
    for s, p in zip(seeds, paths):
        log(f"== seed {s} ({out / f'seed{s}'})")
        runner.run_pipeline(p, only=only, force=force, outputs_root=out, log=log)
    claims = collect_claims(out, seeds)
    write_claims(out, claims)
    log(f"claims -> {out / 'claims.md'}")
    return claims


# ------------------------------------------------------------------------------------------------------- statistics
def paired_stats(a: Sequence[float], b: Sequence[float], n_boot: int = 4000, seed: int = 0) -> dict:
    """Mean of a - b over paired problems, with a bootstrap 95% interval over problems."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired vectors must have the same, nonzero length: {len(a)} vs {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    return _summary([d], n_boot, seed) | {"a": sum(map(float, a)) / len(a), "b": sum(map(float, b)) / len(b)}


def pooled_paired_stats(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = 4000,
                        seed: int = 0) -> dict:
    """Pooled over seeds: the mean difference over all (seed, problem) pairs; the bootstrap resamples problems
    within each seed (stratified)."""
    groups = [[float(x) - float(y) for x, y in zip(a, b)] for a, b in pairs]
    return _summary(groups, n_boot, seed)


def _summary(groups: list[list[float]], n_boot: int, seed: int) -> dict:
    n = sum(map(len, groups))
    mean = sum(map(sum, groups)) / n
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        tot = 0.0
        for g in groups:
            m = len(g)
            tot += sum(g[rng.randrange(m)] for _ in range(m))
        boots.append(tot / n)
    boots.sort()
    lo, hi = boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]
    return {"diff": mean, "ci95": [lo, hi], "n": n}


# ------------------------------------------------------------------------------------------------------- collection
def _load(run: Path, name: str) -> dict | None:
    p = run / "metrics" / name
    return json.loads(p.read_text()) if p.is_file() else None


def collect_claims(out: str | Path, seeds: Sequence[int]) -> dict:
    """Every claim with each seed's value and the pooled interval; claims whose metrics are missing in a seed are
    reported as missing there (never silently dropped)."""
    out = Path(out)
    res: dict[str, Any] = {"seeds": list(seeds), "paired": {}, "values": {}}
    for cid, (fname, text) in CLAIMS.items():
        per, pairs, missing = {}, [], []
        labels = None
        for s in seeds:
            m = _load(out / f"seed{s}", fname)
            entry = (m or {}).get("paired", {}).get(cid)
            if entry is None:
                missing.append(s)
                continue
            labels = (entry.get("label_a"), entry.get("label_b"))
            per[str(s)] = paired_stats(entry["a"], entry["b"], seed=s)
            pairs.append((entry["a"], entry["b"]))
        row: dict[str, Any] = {"claim": text, "source": fname, "per_seed": per, "missing_seeds": missing,
                               "labels": labels}
        if pairs:
            row["pooled"] = pooled_paired_stats(pairs)
            row["holds"] = (not missing and row["pooled"]["ci95"][0] > 0
                            and all(v["diff"] > 0 for v in per.values()))
        else:
            row["pooled"], row["holds"] = None, False
        res["paired"][cid] = row
    for cid, (fname, text, lo, hi) in VALUE_CLAIMS.items():
        per, missing = {}, []
        for s in seeds:
            v = ((_load(out / f"seed{s}", fname) or {}).get("values") or {}).get(cid)
            if v is None:
                missing.append(s)
            else:
                per[str(s)] = float(v)
        vals = list(per.values())
        res["values"][cid] = {"claim": text, "source": fname, "per_seed": per, "missing_seeds": missing,
                              "band": [lo, hi], "mean": sum(vals) / len(vals) if vals else None,
                              "holds": bool(vals) and not missing and all(lo <= v <= hi for v in vals)}
    return res


def render_claims_md(claims: dict) -> str:
    seeds = claims["seeds"]
    head = "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled (95% CI) | holds |"
    lines = [f"# Seed study: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             "Paired claims: the difference method - baseline on the same held-out problems; per seed the mean "
             "difference [bootstrap 95% CI over problems]; pooled over all (seed, problem) pairs with a stratified "
             "bootstrap. A claim holds when the pooled interval excludes 0 and every seed's estimate is positive.", "",
             head, "|" + "---|" * (len(seeds) + 3)]
    for cid, row in claims["paired"].items():
        cells = []
        for s in seeds:
            v = row["per_seed"].get(str(s))
            cells.append("missing" if v is None else
                         f"{v['a']:.3f} vs {v['b']:.3f}: {v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]")
        p = row["pooled"]
        pooled = "n/a" if p is None else f"{p['diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] (n={p['n']})"
        lines.append(f"| {row['claim']} (`{cid}`, [figure](figures/claim_{cid}.png)) | " + " | ".join(cells)
                     + f" | {pooled} | {'yes' if row['holds'] else 'NO'} |")
    lines += ["", "| value claim | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | holds |",
              "|" + "---|" * (len(seeds) + 3)]
    for cid, row in claims["values"].items():
        cells = [("missing" if str(s) not in row["per_seed"] else f"{row['per_seed'][str(s)]:.3f}") for s in seeds]
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.3f}"
        lines.append(f"| {row['claim']} (`{cid}`) | " + " | ".join(cells) + f" | {mean} | "
                     f"{'yes' if row['holds'] else 'NO'} |")
    if claims["paired"].get("mrsa_vs_majority", {}).get("per_seed"):  # notebook 07 ran: write_claims draws the figure
        lines += ["", "Accuracy against generated tokens (Markovian RSA, plain RSA, majority vote), each seed and the "
                  "spread over seeds: [figures/rsa_tokens.png](figures/rsa_tokens.png)."]
    return "\n".join(lines) + "\n"


def plot_claims(claims: dict, figures: Path) -> list[Path]:
    """One figure per paired claim: each seed's difference with its interval, and the pooled one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zaya_lib.pipeline.figures import save_figure

    figures.mkdir(parents=True, exist_ok=True)
    paths = []
    for cid, row in claims["paired"].items():
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        xs, labels = [], []
        for i, s in enumerate(claims["seeds"]):
            v = row["per_seed"].get(str(s))
            if v is not None:
                ax.errorbar([i], [v["diff"]], yerr=[[v["diff"] - v["ci95"][0]], [v["ci95"][1] - v["diff"]]],
                            fmt="o", color="C0", capsize=4)
            xs.append(i)
            labels.append(f"seed {s}")
        if row["pooled"] is not None:
            p = row["pooled"]
            i = len(xs)
            ax.errorbar([i], [p["diff"]], yerr=[[p["diff"] - p["ci95"][0]], [p["ci95"][1] - p["diff"]]], fmt="s",
                        color="C3", capsize=4)
            xs.append(i)
            labels.append("pooled")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(xs, labels)
        la, lb = row["labels"] or ("method", "baseline")
        ax.set(ylabel=f"{la} - {lb}", title=cid + (" (holds)" if row["holds"] else " (does not hold)"))
        fig.tight_layout()
        paths.append(figures / save_figure(fig, figures.parent, f"claim_{cid}"))
        plt.close(fig)
    return paths


def _mean_rows(rows: list[list[float]]) -> list[float]:
    """Element-wise mean of several runs' curves, over the shortest one."""
    n = min(len(r) for r in rows)
    return [sum(r[i] for r in rows) / len(rows) for i in range(n)]


def rsa_curves(out: str | Path, seeds: Sequence[int]) -> dict[str, dict[str, list[list[float]]]]:
    """Accuracy against generated tokens per problem for Markovian RSA, plain RSA (majority over the population after
    each round) and majority vote over n independent samples, one curve per seed that has notebook 07's metrics (its
    sampling repeats averaged): `{method: {"tokens": [[...] per seed], "acc": [[...] per seed], "seeds": [...]}}`."""
    curves: dict[str, dict[str, list]] = {k: {"tokens": [], "acc": [], "seeds": []}
                                          for k in ("markovian", "plain", "majority vote")}
    for s in seeds:
        m = _load(Path(out) / f"seed{s}", "07_markovian_rsa.json")
        if not m or not m.get("sc_by_seed"):
            continue
        runs = {"markovian": [[(r["tokens_per_problem"], r["majority_acc"]) for r in run]
                              for run in m["markovian_rounds_by_seed"]],
                "plain": [[(r["tokens_per_problem"], r["majority_acc"]) for r in run]
                          for run in m["plain_rounds_by_seed"]],
                "majority vote": [list(zip(c["tokens_per_problem"], c["majority_acc"])) for c in m["sc_by_seed"]]}
        for name, rs in runs.items():
            curves[name]["tokens"].append(_mean_rows([[t for t, _ in r] for r in rs]))
            curves[name]["acc"].append(_mean_rows([[a for _, a in r] for r in rs]))
            curves[name]["seeds"].append(s)
    return curves


def plot_rsa_curves(curves: dict, figures: Path) -> Path | None:
    """`figures/rsa_tokens.png`: every seed's curve (thin) and their mean with the min-max spread over seeds (band);
    None when no seed has notebook 07's metrics."""
    if not any(c["acc"] for c in curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zaya_lib.pipeline.figures import save_figure

    figures.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, c) in enumerate(curves.items()):
        if not c["acc"]:
            continue
        x = _mean_rows(c["tokens"])
        n = len(x)
        ys = [[a[j] for a in c["acc"]] for j in range(n)]
        for t, a in zip(c["tokens"], c["acc"]):
            ax.plot(t[:n], a[:n], "-", color=f"C{i}", lw=0.7, alpha=0.35)
        ax.plot(x, [sum(y) / len(y) for y in ys], "o-" if name != "majority vote" else "^-", color=f"C{i}",
                label=f"{name} (mean of {len(c['acc'])} seeds)")
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.15)
    ax.set(xlabel="generated tokens per problem", ylabel="majority-vote accuracy (held-out)",
           title="Test-time compute over the seeds: Markovian RSA, plain RSA, majority vote")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = figures / save_figure(fig, figures.parent, "rsa_tokens")
    plt.close(fig)
    return path


def write_claims(out: Path, claims: dict) -> None:
    atomic_write_json(out / "claims.json", claims)
    atomic_write_text(out / "claims.md", render_claims_md(claims))
    plot_claims(claims, out / "figures")
    plot_rsa_curves(rsa_curves(out, claims["seeds"]), out / "figures")

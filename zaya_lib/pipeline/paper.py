"""The paper's claims by topic, matched with what a run measured: the body of `report.md` (notebook 08_report).

Notable features:
- `PAPER_TOPICS` lists the ZAYA1-8B report's claims that this reproduction checks, grouped by topic, each with the
  notebook(s) that measure it and the paper's value (architecture numbers, KV-cache compression, context and RoPE
  schedule, trimming, RL stage gains, Markovian RSA scaling and bounded context; [TR] = arXiv 2605.05365, see
  shared/spec/*.md). These rows are what a reader sees when a notebook has not run ("not run (NN_name)").
- The measured rows come from the notebooks themselves: each metrics JSON's `claims` list (report.py's convention).
  A claim goes to its own `"topic"` when it names one of PAPER_TOPICS, else to the first topic measured by its
  notebook; claims of notebooks no topic lists land under "Other measurements". No per-notebook code here.
- `render_paper_report` composes the whole report.md: provenance line, claims by topic, the notebooks that finished
  in this run dir (from the runner's `.stamps/`), every scalar metric and the figure list (same sections as the
  runner's fallback report, so adding 08_report loses nothing).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zaya_lib.pipeline.report import Claim, collect_claims, load_metrics, render_claims_table, render_metrics_table

__all__ = ["PaperTopic", "PAPER_TOPICS", "claims_by_topic", "render_claims_by_topic", "finished_notebooks",
           "render_paper_report"]


@dataclass(frozen=True)
class PaperTopic:
    title: str
    notebooks: tuple[str, ...]  # notebook stems that measure it, in the order their claims are shown
    claims: tuple[tuple[str, str], ...]  # (claim, paper value): the rows shown when no notebook measured it


PAPER_TOPICS: tuple[PaperTopic, ...] = (
    PaperTopic("Architecture numbers", ("00_overview", "01_architecture"), (
        ("total parameters", "8.4B ([TR]; 8.84B with embeddings by tensor shapes)"),
        ("active parameters per token", "0.76B ([TR]; 0.754B non-embedding by shapes)"),
        ("CCA matches transformers' ZayaForCausalLM (fp32 logits)", "reference implementation"),
    )),
    PaperTopic("KV-cache compression", ("00_overview", "07_markovian_rsa"), (
        ("KV cache vs full multi-head attention", "8x smaller ([TR] App. C)"),
        ("KV-cache bytes per token (bf16, 40 layers)", "40 KiB (2 KV heads x 128 x K,V)"),
    )),
    PaperTopic("Kernels", ("02_kernels",), (
        ("fused CCA / latent attention / MoE kernels match eager", "CCA cuts training and prefill compute ([TR] §II-A)"),
    )),
    PaperTopic("Pretraining and answer-preserving trimming", ("03_pretraining",), (
        ("trimming keeps every answer whole and fits the context", "AP-trimming ([TR] §III-A)"),
        ("loss falls on every data category", "two pretraining phases at 4K, RoPE base 1e4 ([TR] Tab. II)"),
    )),
    PaperTopic("Context and RoPE schedule", ("04_midtraining",), (
        ("context extension with a larger RoPE base", "4K/1e4 -> 32K/1e6 -> 131K/5e6 ([TR] Tab. II)"),
    )),
    PaperTopic("SFT with aggregation data", ("05_sft",), (
        ("aggregating tails beats one sample after SFT", "aggregation examples folded into SFT ([TR] §III)"),
    )),
    PaperTopic("RL stage gains", ("06_rl_cascade",), (
        ("held-out accuracy rises through the four-stage RL cascade", "gains per stage ([TR] §IV)"),
    )),
    PaperTopic("Markovian RSA scaling and bounded context", ("07_markovian_rsa",), (
        ("accuracy rises with aggregation rounds", "AIME'25 91.9, HMMT'25 89.6 ([TR])"),
        ("context per call stays bounded however many rounds", "carries only a 4K-token tail ([TR])"),
    )),
)
OTHER = "Other measurements"


def _short(stem: str) -> str:
    return stem.split("_", 1)[0]


def _find(stem: str, metrics: dict[str, dict]) -> str | None:
    """The run's metrics stem for a topic's notebook: exact name, else the same number (a renamed notebook)."""
    if stem in metrics:
        return stem
    same = [s for s in metrics if _short(s) == _short(stem)]
    return same[0] if same else None


def claims_by_topic(metrics: dict[str, dict]) -> dict[str, list[Claim]]:
    """Topic title -> rows: measured claims, or the paper's rows marked "not run" / "not reported" when absent."""
    out: dict[str, list[Claim]] = {t.title: [] for t in PAPER_TOPICS}
    titles = set(out)
    home: dict[str, str] = {}  # metrics stem -> first topic listing it
    for t in PAPER_TOPICS:
        for nb in t.notebooks:
            found = _find(nb, metrics)
            if found is not None:
                home.setdefault(found, t.title)
    for stem, m in metrics.items():
        raw = m.get("claims", []) if isinstance(m, dict) else []
        for c, r in zip(collect_claims({stem: m}), raw):
            topic = r.get("topic") if r.get("topic") in titles else home.get(stem, OTHER)
            out.setdefault(topic, []).append(c)
    for t in PAPER_TOPICS:
        if out[t.title]:
            continue
        ran = [s for s in (_find(nb, metrics) for nb in t.notebooks) if s is not None]
        status = (f"ran ({', '.join(ran)}); no claim recorded" if ran else f"not run ({', '.join(t.notebooks)})")
        out[t.title] = [Claim(claim, paper, status, None, "") for claim, paper in t.claims]
    return out


def render_claims_by_topic(metrics: dict[str, dict]) -> str:
    parts = []
    for title, rows in claims_by_topic(metrics).items():
        sources = sorted({c.source for c in rows if c.source})
        parts.append(f"### {title}{' (' + ', '.join(sources) + ')' if sources else ''}\n")
        parts.append(render_claims_table(rows))
    return "\n".join(parts)


def finished_notebooks(run_dir: str | Path) -> list[dict]:
    """The runner's stamps (`run_dir/.stamps/NN.json`): notebooks finished in this run dir, in pipeline order."""
    rows = []
    for p in sorted((Path(run_dir) / ".stamps").glob("*.json")):
        try:
            s = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # a stamp being replaced right now; the runner rewrites it atomically
        rows.append({"notebook": s.get("notebook", p.stem), "seconds": s.get("seconds"), "finished": s.get("finished"),
                     "git_commit": (s.get("git_commit") or "")[:12]})
    return rows


def render_paper_report(run_dir: str | Path, title: str = "ZAYA1-8B reproduction") -> str:
    """The full report.md text for a run directory (see the module docstring for its sections)."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    prov_path = run_dir / "provenance.json"
    prov = json.loads(prov_path.read_text(encoding="utf-8")) if prov_path.is_file() else {}
    git, dev = prov.get("git") or {}, prov.get("device") or {}
    parts = [f"# {title}: run `{run_dir.name}`\n",
             f"- params `{prov.get('params_file', '?')}`; git `{(git.get('commit') or 'none')[:12]}`"
             f"{' (dirty)' if git.get('dirty') else ''}; device {dev.get('resolved_device', '?')} ({dev.get('cpu', '?')})\n"
             f"- each row: the paper's claim, its value, this run's measurement, and the figure it comes from\n",
             "## Paper claims vs this run\n", render_claims_by_topic(metrics), "## Notebooks finished in this run\n"]
    lines = ["| notebook | seconds | finished | git | executed copy |", "|---|---|---|---|---|"]
    for r in finished_notebooks(run_dir):
        nb = f"notebooks/{r['notebook']}.ipynb"
        lines.append(f"| {r['notebook']} | {r['seconds']} | {r['finished']} | {r['git_commit']} | [{Path(nb).name}]({nb}) |")
    if len(lines) == 2:
        lines.append("| none recorded (notebooks run outside `python -m zaya_lib run`) | | | | |")
    parts.append("\n".join(lines) + "\n")
    if metrics:
        parts += ["## Metrics\n", render_metrics_table(metrics)]
    figs = sorted((run_dir / "figures").glob("*.png"))
    if figs:
        parts += ["## Figures\n", "\n".join(f"- [{p.name}](figures/{p.name})" for p in figs) + "\n"]
    return "\n".join(parts)

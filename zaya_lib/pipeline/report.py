"""The paper-versus-run report: load a run's metrics JSON and render markdown tables.

Notable features:
- A notebook states a comparison with the paper by adding rows to its metrics JSON under `"claims"`:
  `{"claim": "KV-cache compression vs GQA", "paper": "8x", "measured": 7.98, "figure": "kv_cache.png"}`.
  `collect_claims` gathers them from every notebook, so 08_report needs no per-notebook code.
- `render_claims_table` gives the `paper claim | paper value | this run | figure` table, each figure a relative link
  from `report.md` (`figures/<name>.png`), so the report reads the same on GitHub and in JupyterLab.
- `render_run_report` is the runner's fallback `report.md` when no `*_report` notebook exists yet: the notebooks
  with status and time, the claims, and every scalar metric.
- `write_report` writes atomically (temp file + os.replace).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from zaya_lib.utils import atomic_write_text

__all__ = ["Claim", "load_metrics", "collect_claims", "flatten_metrics", "format_value", "render_claims_table",
           "render_metrics_table", "render_run_report", "write_report"]


@dataclass
class Claim:
    """One row of the report: a paper claim, the paper's value, this run's value, and its figure (file name)."""

    claim: str
    paper: Any
    measured: Any
    figure: str | None = None
    source: str = ""  # the notebook that measured it


def load_metrics(run_dir: str | Path) -> dict[str, dict]:
    """`run_dir/metrics/*.json` as {file stem: parsed JSON}, sorted by name. A broken file raises naming it."""
    out: dict[str, dict] = {}
    mdir = Path(run_dir) / "metrics"
    if not mdir.is_dir():
        return out
    for p in sorted(mdir.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from None
    return out


def collect_claims(metrics: dict[str, dict]) -> list[Claim]:
    """Claims listed under the `"claims"` key of each metrics file, in notebook order."""
    rows: list[Claim] = []
    for stem, m in metrics.items():
        if not isinstance(m, dict):
            continue
        for i, c in enumerate(m.get("claims", [])):
            missing = [k for k in ("claim", "paper", "measured") if k not in c]
            if missing:
                raise ValueError(f"metrics/{stem}.json: claims[{i}] lacks {', '.join(missing)}")
            rows.append(Claim(c["claim"], c["paper"], c["measured"], c.get("figure"), stem))
    return rows


def format_value(v: Any) -> str:
    """Readable cell text: floats to 4 significant digits, lists/dicts as compact JSON, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, separators=(", ", ": "))
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v).replace("|", "\\|").replace("\n", " ")


def _figure_link(fig: str | None) -> str:
    if not fig:
        return "—"
    rel = fig if "/" in fig else f"figures/{fig}"
    return f"[{Path(fig).name}]({rel})"


def render_claims_table(claims: Iterable[Claim]) -> str:
    lines = ["| paper claim | paper value | this run | figure |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {format_value(c.claim)} | {format_value(c.paper)} | {format_value(c.measured)} | "
                     f"{_figure_link(c.figure)} |")
    return "\n".join(lines) + "\n"


def flatten_metrics(m: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists of scalars kept whole; the `claims` list is left out (it has its table)."""
    out: dict[str, Any] = {}
    if isinstance(m, dict):
        for k, v in m.items():
            if not prefix and k == "claims":
                continue
            out.update(flatten_metrics(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = m
    return out


def render_metrics_table(metrics: dict[str, dict], max_rows_per_notebook: int = 40) -> str:
    lines = ["| notebook | metric | value |", "|---|---|---|"]
    for stem, m in metrics.items():
        flat = flatten_metrics(m)
        for i, (k, v) in enumerate(flat.items()):
            if i == max_rows_per_notebook:
                lines.append(f"| {stem} | ({len(flat) - i} more in metrics/{stem}.json) | |")
                break
            lines.append(f"| {stem} | {format_value(k)} | {format_value(v)} |")
    return "\n".join(lines) + "\n"


def render_run_report(run_dir: str | Path, results: list[dict], provenance: dict | None = None) -> str:
    """The runner's report.md: what ran (status, seconds), the paper claims found, every metric, the figures.

    `results` rows: {"notebook": stem, "status": "ran"|"skipped"|"failed", "seconds": float}.
    """
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    prov = provenance or {}
    git = prov.get("git") or {}
    dev = prov.get("device") or {}
    parts = [f"# Run `{run_dir.name}`\n"]
    parts.append(f"- params: `{prov.get('params_file', '?')}`; git `{(git.get('commit') or 'none')[:12]}`"
                 f"{' (dirty)' if git.get('dirty') else ''}; device: {dev.get('resolved_device', '?')} "
                 f"({dev.get('cpu', '?')}{', ' + ', '.join(dev['cuda_devices']) if dev.get('cuda_devices') else ''})\n"
                 f"- started {prov.get('started', '?')}, finished {prov.get('finished', '?')}\n")
    parts.append("## Notebooks\n")
    lines = ["| notebook | status | seconds | executed copy |", "|---|---|---|---|"]
    for r in results:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "—"
        nb = r.get("executed") or f"notebooks/{r['notebook']}.ipynb"
        lines.append(f"| {r['notebook']} | {r['status']} | {secs} | [{Path(nb).name}]({nb}) |")
    parts.append("\n".join(lines) + "\n")
    claims = collect_claims(metrics)
    if claims:
        parts.append("## Paper claims vs this run\n")
        parts.append(render_claims_table(claims))
    if metrics:
        parts.append("## Metrics\n")
        parts.append(render_metrics_table(metrics))
    figs = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").is_dir() else []
    if figs:
        parts.append("## Figures\n")
        parts.append("\n".join(f"- [{p.name}](figures/{p.name})" for p in figs) + "\n")
    return "\n".join(parts)


def write_report(run_dir: str | Path, text: str) -> Path:
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, text)
    return path

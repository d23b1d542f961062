"""Saving notebook figures into a run: `run_dir/figures/<name>.png`, written atomically.

Notable features:
- `save_figure` renders to a temporary file in the figures folder and renames it, so the report never links a
  half-written PNG; it returns the bare file name, which is what a metrics `claims` row's `figure` field holds.
- Works the same in JupyterLab and headless papermill kernels (the file is written whatever the display backend).
"""
from __future__ import annotations

from pathlib import Path

from zaya_lib.utils import atomic_path

__all__ = ["save_figure"]


def save_figure(fig, run_dir: str | Path, name: str, dpi: int = 120) -> str:
    """Write matplotlib `fig` to run_dir/figures/<name>.png atomically; returns "<name>.png"."""
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"figure name must be a bare stem like 'kv_cache', got {name!r}")
    path = Path(run_dir) / "figures" / f"{name}.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return path.name

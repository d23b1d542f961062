"""environment.yml (conda users) and pyproject.toml (pip / make setup) describe the same dependencies."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(map(_norm, deps)) == sorted(map(_norm, pip_block))


def test_torch_is_pinned_exactly():
    """An unpinned torch (or trl/peft without the pin) resolves a multi-GB CUDA build on CPU-only machines."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_reqs = [d for d in deps if re.match(r"torch\b", d) and not d.startswith("torch-")]
    assert len(torch_reqs) == 1 and "==" in torch_reqs[0], torch_reqs

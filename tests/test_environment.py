"""Dependencies: ranges in pyproject.toml (= environment.yml, for conda users), the exact tested set in constraints.txt.

`make setup` installs with `-c constraints.txt`: a fresh .venv gets exactly the tested versions, while installing the
project into an existing environment only has to satisfy the ranges (a newer torch or transformers stays).
"""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def _deps() -> list[Requirement]:
    return [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and " " not in version, f"constraints.txt: not an exact pin: {line!r}"
            key = canonicalize_name(name)
            assert key not in pins, f"constraints.txt: {name} pinned twice"
            pins[key] = version
    return pins


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(map(_norm, deps)) == sorted(map(_norm, pip_block))


def test_every_dependency_pinned_within_its_range():
    pins = _constraints()
    for req in _deps():
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} is a dependency but not in constraints.txt"
        assert req.specifier.contains(pins[key], prereleases=True), f"constraints.txt {req.name}=={pins[key]} " \
                                                                    f"is outside pyproject's range {req.specifier}"
    assert "zaya-repro" not in pins  # the project itself is installed editable, not pinned


def test_torch_pinned_to_the_cpu_wheel_version_in_constraints_only():
    """constraints.txt pins torch to 2.13.0 without a local label: on a CPU-only machine pip takes the local CPU wheel
    (2.13.0+cpu), elsewhere the CUDA build (an unpinned torch resolves the newest, a multi-GB CUDA build). pyproject
    keeps a range, so an environment with a newer torch is not downgraded."""
    assert _constraints()["torch"] == "2.13.0"
    torch_req = next(r for r in _deps() if r.name == "torch")
    assert not any(s.operator in ("==", "===") for s in torch_req.specifier), torch_req
    assert torch_req.specifier.contains("2.15.0") and not torch_req.specifier.contains("2.12.1")


def test_transformers_range_covers_both_cache_names():
    """The model supports generate() before and after transformers 5.24's past_key_values -> cache rename."""
    tf = next(r for r in _deps() if r.name == "transformers")
    assert tf.specifier.contains("5.23.0") and tf.specifier.contains("5.25.0"), tf

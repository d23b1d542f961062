"""The committed notebooks and the params profiles: clean notebooks, flat parameters, headless smoke runs, profiles.

(a) every numbered notebook is committed without outputs or execution counts and has exactly one flat `parameters`
    cell of literals that includes run_dir, device and seed (style.md principles 8-9);
(b) every notebook runs headless under papermill through the real runner with params/smoke.yaml (marked `notebook`;
    notebooks run in pipeline order into one tmp run dir, and each test also runs the ones before it, which resume
    makes free when they already ran, so `-k 05_sft` alone still works);
(c) the notebooks' defaults ARE the tiny profile: params/tiny.yaml holds every notebook key with the same value,
    params/smoke.yaml holds every key too, and all four profiles validate (so every key in them is known to some
    notebook, and shared keys agree across notebooks).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zaya_lib.pipeline.params import COMMON_KEYS, build_schema, list_notebooks, parse_parameters_cell, validate_params
from zaya_lib.pipeline.runner import run_pipeline

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
PARAMS = REPO / "params"
PROFILES = ["smoke", "tiny", "gpu-1x", "zaya1-8b"]
NOTEBOOKS = list(list_notebooks(NB_DIR))
REQUIRED = ("run_dir", "device", "seed")  # BRIEF: every parameters cell holds these


# ------------------------------------------------------------------------------------------------- (a) clean notebooks
@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_committed_clean(stem):
    nb = json.loads((NB_DIR / f"{stem}.ipynb").read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{stem}: code cells {dirty} have outputs or execution counts; clear them before committing"
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    assert sum("parameters" in t for t in tags) == 1, f"{stem}: needs exactly one cell tagged 'parameters'"
    assert not any("injected-parameters" in t for t in tags), f"{stem}: committed an executed (papermill) copy"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", f"{stem}: kernelspec must be python3"
    params = parse_parameters_cell(NB_DIR / f"{stem}.ipynb")  # raises on anything but `name = literal` lines
    missing = [k for k in REQUIRED if k not in params]
    assert not missing, f"{stem}: parameters cell lacks {missing}"
    assert params["run_dir"] == "outputs/tiny", f"{stem}: run_dir default must be 'outputs/tiny' (the tiny profile)"


# ------------------------------------------------------------------------------------------------ (b) headless smoke run
@pytest.fixture(scope="module")
def smoke_outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_outputs")


@pytest.mark.notebook
@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_runs_headless_with_smoke(stem, smoke_outputs):
    upto = NOTEBOOKS[: NOTEBOOKS.index(stem) + 1]  # earlier notebooks produce this one's inputs (checkpoints, data)
    res = run_pipeline(PARAMS / "smoke.yaml", only=upto, outputs_root=smoke_outputs, log=lambda *a, **k: None)
    row = res.results[-1]
    assert row["notebook"] == stem and row["status"] == "ran"
    executed = res.run_dir / "notebooks" / f"{stem}.ipynb"
    nb = json.loads(executed.read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors
    # ipywidgets is a dependency: tqdm renders widgets in a kernel instead of warning "IProgress not found"
    texts = [o.get("text", "") for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [t for t in texts if "TqdmWarning" in "".join(t)], f"{stem}: a TqdmWarning in the executed notebook"
    # smoke means seconds per notebook; 180 s leaves room for a loaded 2-core machine and kernel start-up
    assert row["seconds"] < 180, f"{stem} took {row['seconds']} s under params/smoke.yaml"


# --------------------------------------------------------------------------------------------------------- (c) profiles
@pytest.mark.parametrize("profile", PROFILES)
def test_profile_validates(profile):
    schema = build_schema(NB_DIR)
    data = validate_params(PARAMS / f"{profile}.yaml", schema)  # unknown keys / wrong types raise, naming them
    assert data["run_name"] == profile
    for k, v in COMMON_KEYS.items():
        assert k in data, f"params/{profile}.yaml lacks the common key {k!r} (default {v!r})"


def test_tiny_profile_equals_notebook_defaults():
    schema = build_schema(NB_DIR)
    tiny = yaml.safe_load((PARAMS / "tiny.yaml").read_text()) or {}
    for key, p in schema.params.items():
        if key not in COMMON_KEYS or p.notebooks:
            assert key in tiny, f"params/tiny.yaml lacks {key!r} (declared by {p.notebooks})"
        if key in COMMON_KEYS and not p.notebooks:
            assert tiny[key] == COMMON_KEYS[key], f"params/tiny.yaml: {key!r} must be {COMMON_KEYS[key]!r}"
        for stem, default in p.defaults.items():
            assert tiny[key] == default, (f"params/tiny.yaml: {key!r} = {tiny[key]!r} but {stem}'s parameters cell "
                                          f"says {default!r}; the notebooks' defaults are the tiny profile")


def test_smoke_profile_covers_every_key():
    schema = build_schema(NB_DIR)
    smoke = yaml.safe_load((PARAMS / "smoke.yaml").read_text()) or {}
    missing = sorted(k for k, p in schema.params.items() if p.notebooks and k not in smoke)
    assert not missing, f"params/smoke.yaml lacks {missing}: give each a fast value"

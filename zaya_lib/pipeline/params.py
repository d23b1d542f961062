"""The parameter schema of the notebook pipeline, read from the notebooks themselves, and validation of params files.

Notable features:
- No second schema to keep in sync: each numbered notebook `notebooks/NN_*.ipynb` has one cell tagged `parameters`
  holding flat `name = literal` lines (style.md principles 9-10). `build_schema` parses those cells with `ast`
  (nothing is executed) into key -> type, default, and the notebooks that use it.
- `validate_params` checks a params YAML *before anything runs*: a non-mapping file, an unknown key, or a wrong type
  raises `ParamsError` naming the key and the file. int is accepted for float; bool is never an int. A string that
  looks like a number gets a hint (YAML 1.1 reads `1e4` as a string; write `1.0e4`).
- Keys known without any notebook: the runner keys `run_name` and `notebooks`, and the common keys `device`, `dtype`,
  `seed` that every notebook shares (their types and defaults are fixed here so all notebooks agree).
- `run_dir` is not settable from a file: the runner injects `<outputs>/<run_name>` so one run never writes into another.

Imports nothing heavy (no torch, no papermill) so a bad file is reported in well under a second.
"""
from __future__ import annotations

import ast
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ParamsError", "Param", "Schema", "NOTEBOOK_RE", "RUNNER_KEYS", "COMMON_KEYS", "INJECTED_KEYS",
    "list_notebooks", "parse_parameters_cell", "build_schema", "load_params_file", "validate_params", "select_notebooks",
]

# numbered pipeline notebooks: 00_overview.ipynb ... 08_report.ipynb (style.md principle 10)
NOTEBOOK_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+$")
# keys the runner itself reads; they are never injected into notebooks
RUNNER_KEYS: dict[str, type] = {"run_name": str, "notebooks": list}
# keys every notebook shares (BRIEF: parameters cell always holds run_dir, device, seed); fixed type and default
COMMON_KEYS: dict[str, Any] = {"device": "auto", "dtype": "auto", "seed": 0}
# set by the runner, not by a params file
INJECTED_KEYS = ("run_dir",)
_ALLOWED_TYPES = (bool, int, float, str, list)
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class ParamsError(ValueError):
    """A params file or a notebook's parameters cell is invalid. The message names the file and the key."""


@dataclass
class Param:
    """One schema entry: the literal type of the default, the default, and which notebooks declare the key."""

    type: type
    default: Any
    notebooks: list[str] = field(default_factory=list)
    # per-notebook defaults; they should agree (tests/test_notebooks.py checks), but each notebook keeps its own
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Schema:
    params: dict[str, Param]          # notebook keys (including the common ones), run_dir excluded
    notebooks: dict[str, Path]        # stem -> path, in pipeline order
    keys_by_notebook: dict[str, list[str]]  # stem -> keys its parameters cell declares (run_dir excluded)

    def defaults_for(self, stem: str) -> dict[str, Any]:
        return {k: self.params[k].defaults[stem] for k in self.keys_by_notebook[stem]}


def _type_name(t: type) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list"}.get(t, t.__name__)


def list_notebooks(notebooks_dir: str | Path) -> dict[str, Path]:
    """Numbered notebooks `NN_name.ipynb` in pipeline order (stem -> path). A missing folder means no notebooks."""
    d = Path(notebooks_dir)
    if not d.is_dir():
        return {}
    found = sorted(p for p in d.glob("*.ipynb") if NOTEBOOK_RE.match(p.stem))
    return {p.stem: p for p in found}


def _literal(node: ast.AST, where: str, name: str) -> Any:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise ParamsError(f"{where}: parameter {name!r} must be a literal (int/float/str/bool/list); "
                          f"derived values belong in the next cell (papermill does not recompute them)") from None
    if type(value) not in _ALLOWED_TYPES:
        raise ParamsError(f"{where}: parameter {name!r} has a {type(value).__name__} default {value!r}; "
                          f"only int/float/str/bool/list literals are allowed")
    if isinstance(value, list) and any(type(v) not in (bool, int, float, str) for v in value):
        raise ParamsError(f"{where}: parameter {name!r}: lists may only hold int/float/str/bool literals")
    return value


def parse_parameters_cell(nb_path: str | Path) -> dict[str, Any]:
    """The `name = literal` assignments of the notebook's single cell tagged `parameters`, in order."""
    nb_path = Path(nb_path)
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    cells = [c for c in nb.get("cells", []) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParamsError(f"{nb_path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    src = cells[0]["source"]
    src = "".join(src) if isinstance(src, list) else src
    where = f"{nb_path} (parameters cell)"
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise ParamsError(f"{where}: syntax error: {e}") from None
    out: dict[str, Any] = {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            line = ast.get_source_segment(src, stmt) or type(stmt).__name__
            raise ParamsError(f"{where}: only simple `name = literal` lines are allowed, got: {line.splitlines()[0]}")
        name = stmt.targets[0].id
        if name in out:
            raise ParamsError(f"{where}: parameter {name!r} is assigned twice")
        out[name] = _literal(stmt.value, where, name)
    return out


def build_schema(notebooks_dir: str | Path) -> Schema:
    """Collect every notebook's parameters into one schema. Keys shared by notebooks must share a type."""
    params: dict[str, Param] = {k: Param(type(v), v) for k, v in COMMON_KEYS.items()}
    notebooks = list_notebooks(notebooks_dir)
    keys_by_nb: dict[str, list[str]] = {}
    for stem, path in notebooks.items():
        declared = parse_parameters_cell(path)
        keys_by_nb[stem] = [k for k in declared if k not in INJECTED_KEYS]
        for key, default in declared.items():
            if key in INJECTED_KEYS:
                continue
            if key in RUNNER_KEYS:
                raise ParamsError(f"{path}: parameter {key!r} is reserved for the runner; rename it")
            t = type(default)
            p = params.get(key)
            if p is None:
                p = params[key] = Param(t, default)
            elif p.type is int and t is float and key not in COMMON_KEYS:
                p.type = float  # one notebook writes 1, another 1.5: the key is a float
            elif p.type is not t and not (p.type is float and t is int):
                first = p.notebooks[0] if p.notebooks else "the common keys"
                raise ParamsError(f"{path}: parameter {key!r} is a {_type_name(t)} here but a {_type_name(p.type)} "
                                  f"in {first}; shared keys must have one type")
            if not p.notebooks and key not in COMMON_KEYS:
                p.default = default
            p.notebooks.append(stem)
            p.defaults[stem] = default
    return Schema(params, notebooks, keys_by_nb)


def load_params_file(path: str | Path) -> dict[str, Any]:
    """Read a params YAML (flat mapping). Missing, unparsable or non-mapping files raise ParamsError."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # an empty file (or only comments) sets nothing
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: a params file must be a flat mapping of key: value, got a {type(data).__name__}")
    for k in data:
        if not isinstance(k, str):
            raise ParamsError(f"{path}: key {k!r} is not a string")
    return data


def _type_ok(expected: type, value: Any) -> bool:
    if expected is float:
        return type(value) in (int, float)  # bool is excluded: type(True) is bool
    return type(value) is expected


def _type_error(path: Path, key: str, expected: type, value: Any, what: str = "") -> ParamsError:
    msg = f"{path}: key {key!r}{what} must be {_type_name(expected)}, got {type(value).__name__} {value!r}"
    if expected in (int, float) and isinstance(value, str):
        try:
            float(value)
            msg += " (YAML reads numbers like 1e4 as strings; write 1.0e4 or 10000.0)"
        except ValueError:
            pass
    return ParamsError(msg)


def validate_params(path: str | Path, schema: Schema) -> dict[str, Any]:
    """Load and check a params file against the schema; returns the mapping with `run_name` filled in.

    Raises ParamsError naming the file and the offending key: unknown key, wrong type, bad run_name/device/dtype,
    or a `notebooks` entry that names no existing notebook.
    """
    path = Path(path)
    data = load_params_file(path)
    for key, value in data.items():
        if key in INJECTED_KEYS:
            raise ParamsError(f"{path}: key {key!r} is set by the runner (<outputs>/<run_name>); set 'run_name' instead")
        if key in RUNNER_KEYS:
            expected = RUNNER_KEYS[key]
            if not _type_ok(expected, value):
                raise _type_error(path, key, expected, value)
            continue
        p = schema.params.get(key)
        if p is None:
            close = difflib.get_close_matches(key, list(schema.params) + list(RUNNER_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(schema.params)) or "none"
            raise ParamsError(f"{path}: unknown key {key!r}: no notebook in the pipeline declares it{hint} "
                              f"(known keys: {known})")
        if not _type_ok(p.type, value):
            raise _type_error(path, key, p.type, value)
        if p.type is float and type(value) is int:
            data[key] = float(value)  # `lr: 1` and `lr: 1.0` are the same setting (and the same resume hash)
        if p.type is list and value:
            elem_types = {type(v) for v in p.default}
            # a homogeneous default list fixes the element type; mixed or empty defaults accept any literal list
            if len(elem_types) == 1:
                (et,) = elem_types
                for i, v in enumerate(value):
                    if not _type_ok(et, v):
                        raise _type_error(path, key, et, v, what=f"[{i}]")
                if et is float:
                    data[key] = [float(v) for v in value]
            for i, v in enumerate(value):
                if type(v) not in (bool, int, float, str):
                    raise _type_error(path, key, str, v, what=f"[{i}] (int/float/str/bool)")
    run_name = data.get("run_name", path.stem)
    if not _RUN_NAME_RE.match(run_name):
        raise ParamsError(f"{path}: key 'run_name' must be a plain folder name (letters, digits, . _ -), got {run_name!r}")
    if "device" in data and not _DEVICE_RE.match(data["device"]):
        raise ParamsError(f"{path}: key 'device' must be auto, cpu, mps, cuda or cuda:N, got {data['device']!r}")
    if "dtype" in data and data["dtype"] not in _DTYPES:
        raise ParamsError(f"{path}: key 'dtype' must be one of {', '.join(_DTYPES)}, got {data['dtype']!r}")
    if "notebooks" in data:
        # `notebooks: [3, 5]` reads as ints in YAML; take them as the notebooks' numbers
        data["notebooks"] = [f"{v:02d}" if type(v) is int else v for v in data["notebooks"]]
        for i, v in enumerate(data["notebooks"]):
            if not isinstance(v, str):
                raise _type_error(path, "notebooks", str, v, what=f"[{i}]")
        select_notebooks(schema, data["notebooks"], where=f"{path}: key 'notebooks'")
    _check_domain(path, data)
    return {**data, "run_name": run_name}


def _check_domain(path: Path, data: dict[str, Any]) -> None:
    """Checks a notebook would otherwise only hit when it reaches that cell, minutes into a run: mixture names and
    weights (`*_mixture`), and the training phases' context budgets (`*_context`, `sft_seq_len`): long enough for a chat."""
    mixture_keys = [k for k in data if k.endswith("_mixture")]
    if mixture_keys:
        from ..data.mixtures import resolve_mixture

        for key in mixture_keys:
            try:
                resolve_mixture(data[key])
            except ValueError as e:
                raise ParamsError(f"{path}: key {key!r}: {e}") from None
    for key, value in data.items():
        if (key.endswith("_context") or key == "sft_seq_len") and type(value) is int and value < MIN_CONTEXT:
            raise ParamsError(f"{path}: key {key!r}: a context budget of {value} tokens is impossible; a prompt, its "
                              f"thinking markers and answer need at least {MIN_CONTEXT}")


MIN_CONTEXT = 32  # tokens: the shortest reasoning chat of the task suite (prompt + <think></think> + boxed answer) fits


def select_notebooks(schema: Schema, wanted: list[str] | None, where: str = "--only") -> list[str]:
    """Stems to run, in pipeline order. `wanted` entries are stems (`03_pretraining`) or their numbers (`03`)."""
    if not wanted:
        return list(schema.notebooks)
    chosen: set[str] = set()
    for w in wanted:
        hits = [s for s in schema.notebooks if s == w or s.split("_", 1)[0] == w]
        if not hits:
            avail = ", ".join(schema.notebooks) or "none"
            raise ParamsError(f"{where}: no notebook {w!r} in the pipeline (available: {avail})")
        chosen.update(hits)
    return [s for s in schema.notebooks if s in chosen]

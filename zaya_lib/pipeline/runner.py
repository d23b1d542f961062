"""Run the numbered notebooks through papermill with a profile's parameters, resumably, leaving a complete record.

Notable features:
- Validation first: the params file is checked against the schema the notebooks declare (params.py) before any
  folder is created or papermill is imported, so a bad file fails in well under a second and touches nothing.
- Each notebook gets only the keys its parameters cell declares (file value, else its own default) plus `run_dir`.
- Resumable (style.md principle 11): a notebook is skipped when its executed copy exists, its stamp
  `.stamps/NN.json` holds the same hash = sha256 of the JSON of its resolved parameters and of the notebook file's
  sha256, and it started after every earlier notebook of the plan finished: later notebooks read earlier ones'
  checkpoints, so rerunning 05 (a changed SFT key) reruns 06 and 07 too, also when the run is killed in between
  (conservative: an edit to 01 reruns everything after it). Killing a run and restarting it redoes only what had
  not finished; `force=True` reruns.
- Atomic outputs: papermill executes into a hidden temp copy `notebooks/.NN_name.running.ipynb` that is renamed onto
  `notebooks/NN_name.ipynb` only on success, and the stamp is written after that rename. A failed notebook's partial
  copy becomes `notebooks/NN_name.failed.ipynb`; earlier outputs are never touched.
- Headless-friendly: one progress line per notebook (`[03/08] 03_pretraining ... done in 312.4 s`), kernels run with
  ZAYA_PROGRESS=0 so tqdm bars stay silent in executed notebooks and logs.
- Provenance (provenance.py) and the resolved parameters are written at the start and updated after every notebook,
  so even a killed run says where it came from; a fallback `report.md` is written when no `*_report` notebook exists.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from zaya_lib.pipeline.params import INJECTED_KEYS, ParamsError, Schema, build_schema, select_notebooks, validate_params
from zaya_lib.pipeline.provenance import REPO_ROOT, collect_provenance, now_iso
from zaya_lib.pipeline.report import render_run_report, write_report
from zaya_lib.utils import atomic_write_json, atomic_write_text

__all__ = ["run_pipeline", "plan_run", "NotebookFailed", "ParamsError", "RunResult", "DEFAULT_NOTEBOOKS_DIR", "KERNEL_NAME"]

DEFAULT_NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
# the venv's own kernelspec (environment.md §5): jupyter_client runs it with the current interpreter
KERNEL_NAME = "python3"
# environment for the notebook kernels: silent progress bars (BRIEF), no debugger banner on kernel start-up
KERNEL_ENV = {"ZAYA_PROGRESS": "0", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
# the kernel's own log would print a TCP-transport warning per notebook into the run's log; errors still show
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]


class NotebookFailed(RuntimeError):
    """A notebook raised (or its kernel died). The message names it, the error, and the partial copy kept."""

    def __init__(self, message: str, notebook: str, failed_copy: Path | None):
        super().__init__(message)
        self.notebook, self.failed_copy = notebook, failed_copy


@dataclass
class NotebookPlan:
    stem: str
    source: Path
    params: dict[str, Any]  # what is injected, run_dir included
    digest: str             # the resume hash


@dataclass
class RunResult:
    run_dir: Path
    results: list[dict] = field(default_factory=list)  # one row per planned notebook: notebook, status, seconds


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _param_digest(params: dict[str, Any], notebook_sha: str) -> str:
    # run_dir is left out: the stamp lives inside the run dir, and moving/renaming outputs/ must not force reruns
    payload = {"params": {k: v for k, v in params.items() if k not in INJECTED_KEYS}, "notebook_sha256": notebook_sha}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_run(params_path: str | Path, only: list[str] | None = None, outputs_root: str | Path = "outputs",
             notebooks_dir: str | Path | None = None) -> tuple[Schema, dict[str, Any], Path, list[NotebookPlan]]:
    """Validate and resolve everything a run needs, without side effects. Raises ParamsError on bad input."""
    schema = build_schema(notebooks_dir or DEFAULT_NOTEBOOKS_DIR)
    data = validate_params(params_path, schema)
    stems = select_notebooks(schema, only or data.get("notebooks"))
    run_dir = (Path(outputs_root) / data["run_name"]).resolve()
    plans = []
    for stem in stems:
        resolved = {k: data.get(k, v) for k, v in schema.defaults_for(stem).items()}
        resolved["run_dir"] = str(run_dir)
        src = schema.notebooks[stem]
        plans.append(NotebookPlan(stem, src, resolved, _param_digest(resolved, _sha256_file(src))))
    return schema, data, run_dir, plans


def _stamp_path(run_dir: Path, stem: str) -> Path:
    return run_dir / ".stamps" / f"{stem.split('_', 1)[0]}.json"


def _is_up_to_date(run_dir: Path, plan: NotebookPlan) -> dict | None:
    """The stamp when the executed copy exists and the stamp's hash matches, else None."""
    out = run_dir / "notebooks" / f"{plan.stem}.ipynb"
    stamp = _stamp_path(run_dir, plan.stem)
    if not (out.is_file() and stamp.is_file()):
        return None
    try:
        s = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return s if s.get("hash") == plan.digest and s.get("notebook") == plan.stem else None


@contextmanager
def _kernel_environment() -> Iterator[None]:
    """Set env vars the kernels inherit (jupyter_client copies os.environ); restore them afterwards."""
    extra = dict(KERNEL_ENV)
    # kernels import zaya_lib from this checkout even when the package is not pip-installed
    extra["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _error_summary(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:  # PapermillExecutionError: the notebook's own exception
        where = f" (at In [{exc.exec_count}])" if getattr(exc, "exec_count", None) else ""
        return f"{ename}: {evalue}{where}"
    return f"{type(exc).__name__}: {exc}".strip()


def _execute(plan: NotebookPlan, run_dir: Path) -> None:
    """Run one notebook through papermill into a temp copy; rename on success, keep as .failed on error."""
    import papermill as pm

    nb_dir = run_dir / "notebooks"
    final = nb_dir / f"{plan.stem}.ipynb"
    tmp = nb_dir / f".{plan.stem}.running.ipynb"
    failed = nb_dir / f"{plan.stem}.failed.ipynb"
    try:
        pm.execute_notebook(str(plan.source), str(tmp), parameters=plan.params, kernel_name=KERNEL_NAME,
                            progress_bar=False, log_output=False, request_save_on_cell_execute=True,
                            extra_arguments=KERNEL_ARGS)
    except BaseException as exc:
        kept = None
        if tmp.exists():
            os.replace(tmp, failed)
            kept = failed
        if not isinstance(exc, Exception):  # KeyboardInterrupt / SystemExit: keep the partial copy, then stop
            raise
        raise NotebookFailed(_error_summary(exc), plan.stem, kept) from exc
    os.replace(tmp, final)
    failed.unlink(missing_ok=True)  # a stale failure from an earlier attempt no longer describes this notebook


def _write_resolved(run_dir: Path, schema: Schema, data: dict, params_path: Path, plans: list[NotebookPlan]) -> None:
    union: dict[str, Any] = {}
    for stem in schema.notebooks:
        for k, v in schema.defaults_for(stem).items():
            union.setdefault(k, data.get(k, v))
    doc = {
        "run_name": data["run_name"],
        "run_dir": str(run_dir),
        "params_file": str(params_path),
        "notebooks": [p.stem for p in plans],
        "parameters": union,
        "hashes": {p.stem: p.digest for p in plans},
    }
    text = (f"# Resolved parameters of run {data['run_name']!r}: {params_path} over the notebooks' defaults.\n"
            f"# Written by zaya_lib.pipeline.runner; each executed notebook also shows its injected-parameters cell.\n")
    atomic_write_text(run_dir / "params.resolved.yaml", text + yaml.safe_dump(doc, sort_keys=False))


def run_pipeline(params_path: str | Path, only: list[str] | None = None, force: bool = False,
                 outputs_root: str | Path = "outputs", notebooks_dir: str | Path | None = None,
                 log: Callable[..., None] = print) -> RunResult:
    """Run the pipeline; returns the per-notebook results. Raises ParamsError (nothing written) or NotebookFailed."""
    params_path = Path(params_path)
    schema, data, run_dir, plans = plan_run(params_path, only, outputs_root, notebooks_dir)

    for sub in ("notebooks", "metrics", "figures", ".stamps"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    _write_resolved(run_dir, schema, data, params_path, plans)
    prov = collect_provenance(params_path, data.get("device", "auto"), data.get("dtype", "auto"))
    prov["run_dir"] = str(run_dir)
    prov["notebooks"] = []
    atomic_write_json(run_dir / "provenance.json", prov)
    result = RunResult(run_dir, prov["notebooks"])
    own_report = any(s.endswith("_report") for s in schema.notebooks)

    n = len(plans)
    log(f"run {data['run_name']!r}: {n} notebook(s) from {params_path} -> {run_dir}")
    logging.getLogger("papermill").setLevel(logging.ERROR)  # its per-cell INFO/WARNING lines would flood headless logs
    upstream_finished = ""  # latest finish time of an earlier notebook of this plan (ISO, UTC: compares as text)
    try:
        with _kernel_environment():
            for i, plan in enumerate(plans, 1):
                head = f"[{i:02d}/{n:02d}] {plan.stem} ..."
                stamp = None if force else _is_up_to_date(run_dir, plan)
                if stamp is not None and str(stamp.get("started", "")) < upstream_finished:
                    stamp = None  # an earlier notebook (whose outputs this one reads) finished after this one ran
                if stamp is not None:
                    upstream_finished = max(upstream_finished, str(stamp.get("finished", "")))
                    log(f"{head} skipped (up to date)")
                    result.results.append({"notebook": plan.stem, "status": "skipped", "seconds": stamp.get("seconds"),
                                           "hash": plan.digest, "finished": stamp.get("finished"),
                                           "git_commit": stamp.get("git_commit"),
                                           "executed": f"notebooks/{plan.stem}.ipynb"})
                    continue
                log(head, end=" ", flush=True)
                t0, started = time.perf_counter(), now_iso()
                try:
                    _execute(plan, run_dir)
                except NotebookFailed as e:
                    dt = time.perf_counter() - t0
                    log(f"FAILED after {dt:.1f} s")
                    result.results.append({"notebook": plan.stem, "status": "failed", "seconds": round(dt, 2),
                                           "error": str(e), "executed": f"notebooks/{plan.stem}.failed.ipynb"})
                    where = e.failed_copy if e.failed_copy else "(no partial copy: the kernel never started)"
                    raise NotebookFailed(
                        f"notebook {plan.stem} failed: {e}\n  partially executed copy: {where}\n"
                        f"  earlier notebooks' outputs are intact; fix and rerun (finished notebooks are skipped)",
                        plan.stem, e.failed_copy) from e.__cause__
                dt = time.perf_counter() - t0
                finished = now_iso()
                upstream_finished = max(upstream_finished, finished)
                atomic_write_json(_stamp_path(run_dir, plan.stem), {
                    "notebook": plan.stem, "hash": plan.digest, "params": plan.params,
                    "notebook_sha256": _sha256_file(plan.source), "started": started, "finished": finished,
                    "seconds": round(dt, 2), "git_commit": prov["git"]["commit"], "git_dirty": prov["git"]["dirty"]})
                log(f"done in {dt:.1f} s")
                result.results.append({"notebook": plan.stem, "status": "ran", "seconds": round(dt, 2),
                                       "hash": plan.digest, "executed": f"notebooks/{plan.stem}.ipynb"})
                atomic_write_json(run_dir / "provenance.json", prov)
    finally:
        prov["finished"] = now_iso()
        atomic_write_json(run_dir / "provenance.json", prov)
        if not own_report:
            write_report(run_dir, render_run_report(run_dir, result.results, prov))
    total = sum(r["seconds"] or 0 for r in result.results if r["status"] == "ran")
    log(f"run {data['run_name']!r}: finished, {sum(r['status'] == 'ran' for r in result.results)} ran "
        f"({total:.1f} s), {sum(r['status'] == 'skipped' for r in result.results)} skipped -> {run_dir}")
    return result


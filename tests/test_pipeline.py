"""The papermill runner, params validation, provenance and the report helpers (zaya_lib.pipeline, zaya_lib.__main__).

Runs real papermill kernels on three dummy notebooks generated with nbformat into a tmp folder (the runner's notebooks
folder is configurable), so these tests do not depend on the real notebooks (tests/test_notebooks.py runs those).
Covered: validation errors (unknown key, wrong types, non-mapping, missing file) exit nonzero fast and touch nothing;
a run writes the full record; a rerun skips everything; --force, --only, per-notebook hashes; a failing notebook stops
the run and keeps its partial copy; SIGKILL mid-run then restart finishes without redoing finished notebooks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from zaya_lib.__main__ import main
from zaya_lib.pipeline import report
from zaya_lib.pipeline.params import ParamsError, build_schema, parse_parameters_cell, validate_params
from zaya_lib.pipeline.runner import NotebookFailed, run_pipeline

REPO = Path(__file__).resolve().parents[1]

# Every dummy notebook appends its stem to <run_dir>/exec.log when its body runs: counting lines tells exactly
# which notebooks executed, independently of what the runner reports.
_LOG = 'open(os.path.join(run_dir, "exec.log"), "a").write("{stem}\\n")\n'
NOTEBOOKS = {
    "01_alpha": ('run_dir = "outputs/tiny"\ndevice = "auto"\nseed = 0\n# a comment\nsteps = 3  # trailing comment\n'
                 'lr = 0.1\nsizes = [1, 2]\n',
                 "import json, os\n" + _LOG.format(stem="01_alpha") +
                 'json.dump({"steps": steps, "lr": lr, "sizes": sizes, "progress_env": os.environ.get("ZAYA_PROGRESS"),\n'
                 '           "claims": [{"claim": "KV cache compression", "paper": "8x", "measured": steps * 2.0,\n'
                 '                       "figure": "alpha.png"}]},\n'
                 '          open(os.path.join(run_dir, "metrics", "01_alpha.json"), "w"))\n'
                 'open(os.path.join(run_dir, "figures", "alpha.png"), "wb").write(b"\\x89PNG\\r\\n\\x1a\\n")\n'),
    "02_beta": ('run_dir = "outputs/tiny"\ndevice = "auto"\nseed = 0\nfail = False\nhold_file = ""\n',
                "import json, os, time\n" + _LOG.format(stem="02_beta") +
                "t0 = time.time()\n"
                "while hold_file and os.path.exists(hold_file) and time.time() - t0 < 60:\n"
                "    time.sleep(0.05)  # the kill-and-resume test kills the runner while this cell waits\n"
                'assert not fail, "asked to fail"\n'
                'open(os.path.join(run_dir, "beta_done.log"), "a").write("done\\n")  # past the wait\n'
                'json.dump({"fail": fail}, open(os.path.join(run_dir, "metrics", "02_beta.json"), "w"))\n'),
    "03_gamma": ('run_dir = "outputs/tiny"\ndevice = "auto"\nseed = 0\nsteps = 3\n',
                 "import json, os\n" + _LOG.format(stem="03_gamma") +
                 'alpha = json.load(open(os.path.join(run_dir, "metrics", "01_alpha.json")))  # reads an earlier output\n'
                 'json.dump({"alpha_steps": alpha["steps"], "steps": steps},\n'
                 '          open(os.path.join(run_dir, "metrics", "03_gamma.json"), "w"))\n'),
}
STEMS = list(NOTEBOOKS)


def _write_nb(path: Path, params_src: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params_src)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def nbdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("notebooks")
    for stem, (params_src, body) in NOTEBOOKS.items():
        _write_nb(d / f"{stem}.ipynb", params_src, body)
    (d / "scratch.ipynb").write_text("{}")  # not numbered: not part of the pipeline, never parsed
    return d


def _params(tmp: Path, text: str, name: str = "prof") -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


def _exec_log(run_dir: Path) -> list[str]:
    f = run_dir / "exec.log"
    return f.read_text().split() if f.exists() else []


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zaya_lib", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=120)


def _snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, nbdir):
    """One full run of the three dummy notebooks; other tests copy its run dir instead of re-executing."""
    tmp = tmp_path_factory.mktemp("base")
    params = _params(tmp, "steps: 5\nlr: 1\nseed: 7\n", name="prof")
    buf: list[str] = []
    t0 = time.perf_counter()
    # collect what the runner prints, honouring print's `end` (the start of a progress line and its "done in" part
    # are two calls, so a headless log shows which notebook is running)
    log = lambda *a, end="\n", **k: buf.append(" ".join(map(str, a)) + end)  # noqa: E731
    res = run_pipeline(params, outputs_root=tmp / "outputs", notebooks_dir=nbdir, log=log)
    return {"tmp": tmp, "params": params, "result": res, "lines": "".join(buf).splitlines(),
            "seconds": time.perf_counter() - t0}


def _copy_run(base_run, dst: Path) -> Path:
    shutil.copytree(base_run["tmp"] / "outputs", dst / "outputs")
    return dst / "outputs" / "prof"


# ---------------------------------------------------------------------------------------------------------- validation
BAD = [
    ("unknown", "steps: 5\nstpes: 4\n", "'stpes'", "did you mean 'steps'"),
    ("future-notebook", "rope_theta: 10000.0\n", "'rope_theta'", "unknown key"),
    ("str-for-int", "steps: five\n", "'steps'", "must be int"),
    ("bool-for-int", "steps: true\n", "'steps'", "must be int, got bool"),
    ("float-for-int", "steps: 2.5\n", "'steps'", "must be int"),
    ("int-for-bool", "fail: 1\n", "'fail'", "must be bool"),
    ("yaml-1e4-string", "lr: 1e-4\n", "'lr'", "write 1.0e4"),
    ("list-elem", "sizes: [1, two]\n", "'sizes'[1]", "must be int"),
    ("non-mapping-list", "- steps\n- 5\n", "flat mapping", "list"),
    ("non-mapping-scalar", "just a string\n", "flat mapping", "str"),
    ("run-dir", "run_dir: elsewhere\n", "'run_dir'", "run_name"),
    ("only-unknown", "notebooks: [09_missing]\n", "'09_missing'", "available"),
]


@pytest.mark.parametrize("case,text,key,detail", BAD, ids=[b[0] for b in BAD])
def test_bad_params_in_process(tmp_path, nbdir, case, text, key, detail):
    params = _params(tmp_path, text, name=f"bad-{case}")
    with pytest.raises(ParamsError) as ei:
        run_pipeline(params, outputs_root=tmp_path / "outputs", notebooks_dir=nbdir, log=lambda *a, **k: None)
    msg = str(ei.value)
    assert str(params) in msg and key in msg and detail in msg, msg
    assert not (tmp_path / "outputs").exists()  # validation happens before any folder is created


def test_bad_params_cli_fast_and_touch_nothing(tmp_path, nbdir):
    """The acceptance check through the real CLI: nonzero exit within seconds, names key and file, outputs untouched."""
    outputs = tmp_path / "outputs"
    (outputs / "prof").mkdir(parents=True)
    (outputs / "prof" / "keep.txt").write_text("earlier run")
    before = _snapshot(outputs)
    # `python -m zaya_lib` first imports the package (torch + transformers via zaya_lib.config): time that alone,
    # so the bound below measures what the CLI adds (schema + validation) and not the machine's current load
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import zaya_lib"], cwd=tmp_path, env=_env(), check=True, timeout=120)
    import_s = time.perf_counter() - t0
    cases = [("steps: 5\nstpes: 4\n", "'stpes'"), ("[1, 2]\n", "flat mapping")]
    for text, key in cases:
        params = _params(tmp_path, text, name="prof")
        t0 = time.perf_counter()
        r = _cli("run", "--params", str(params), "--notebooks-dir", str(nbdir), "--outputs", str(outputs), cwd=tmp_path)
        dt = time.perf_counter() - t0
        assert r.returncode == 2, r.stderr
        assert key in r.stderr and str(params) in r.stderr, r.stderr
        # validation itself takes milliseconds (in-process tests above); 5 s of slack absorbs start-up jitter
        # on a loaded 2-core machine. Typical here: import 3-5 s idle, the CLI about the same.
        assert dt < import_s + 5, (dt, import_s)
    assert _snapshot(outputs) == before


def test_missing_params_file(tmp_path, nbdir, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["run", "--params", str(missing), "--notebooks-dir", str(nbdir), "--outputs", str(tmp_path / "o")]) == 2
    assert f"{missing}: params file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_validate_coerces_and_accepts(tmp_path, nbdir):
    schema = build_schema(nbdir)
    assert list(schema.notebooks) == STEMS  # numbered only, in order; scratch.ipynb is ignored
    assert schema.params["steps"].notebooks == ["01_alpha", "03_gamma"]
    assert schema.params["lr"].type is float and schema.params["sizes"].type is list
    data = validate_params(_params(tmp_path, "lr: 1\nnotebooks: [2, 03_gamma]\n", name="ok"), schema)
    assert data["lr"] == 1.0 and type(data["lr"]) is float  # int accepted for float, stored as float
    assert data["run_name"] == "ok" and data["notebooks"] == ["02", "03_gamma"]
    assert validate_params(_params(tmp_path, "# only comments\n", name="empty"), schema) == {"run_name": "empty"}


@pytest.mark.parametrize("src,err", [
    ("a = 1\nb = a * 2\n", "must be a literal"),
    ("import os\n", "only simple `name = literal`"),
    ("a = 1\na = 2\n", "assigned twice"),
    ("a = None\n", "NoneType default"),
    ("a = {'x': 1}\n", "dict default"),
    ("a = [[1]]\n", "lists may only hold"),
], ids=["derived", "import", "twice", "none", "dict", "nested-list"])
def test_parameters_cell_must_be_flat_literals(tmp_path, src, err):
    p = tmp_path / "01_x.ipynb"
    _write_nb(p, src, "pass")
    with pytest.raises(ParamsError, match="01_x.ipynb") as ei:
        parse_parameters_cell(p)
    assert err in str(ei.value)


def test_schema_rejects_type_conflicts_and_missing_cell(tmp_path):
    _write_nb(tmp_path / "01_a.ipynb", "steps = 3\n", "pass")
    _write_nb(tmp_path / "02_b.ipynb", 'steps = "three"\n', "pass")
    with pytest.raises(ParamsError, match=r"02_b.ipynb: parameter 'steps' is a str here but a int in 01_a"):
        build_schema(tmp_path)
    _write_nb(tmp_path / "02_b.ipynb", 'seed = "0"\n', "pass")
    with pytest.raises(ParamsError, match="'seed' is a str"):  # the common keys have fixed types
        build_schema(tmp_path)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, tmp_path / "02_b.ipynb")
    with pytest.raises(ParamsError, match="exactly one cell tagged 'parameters', found 0"):
        build_schema(tmp_path)


# ----------------------------------------------------------------------------------------------------------------- run
def test_run_writes_full_record(base_run):
    res, run_dir = base_run["result"], base_run["result"].run_dir
    assert [r["status"] for r in res.results] == ["ran"] * 3
    assert _exec_log(run_dir) == STEMS
    for stem in STEMS:
        assert (run_dir / "notebooks" / f"{stem}.ipynb").is_file()
        assert (run_dir / ".stamps" / f"{stem[:2]}.json").is_file()
        assert (run_dir / "metrics" / f"{stem}.json").is_file()
    assert not list((run_dir / "notebooks").glob(".*running*"))  # temp copies were renamed away
    # progress lines: one per notebook with its time
    done = [l for l in base_run["lines"] if " done in " in l]
    assert [l.split()[1] for l in done] == STEMS and done[0].startswith("[01/03] 01_alpha ...")

    # each notebook got only its own keys (+ run_dir), file values over defaults, int->float coerced
    nb2 = nbformat.read(run_dir / "notebooks" / "02_beta.ipynb", as_version=4)
    injected = [c for c in nb2.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "seed = 7" in injected[0].source and "steps" not in injected[0].source
    assert f'run_dir = "{run_dir}"' in injected[0].source
    m1 = json.loads((run_dir / "metrics" / "01_alpha.json").read_text())
    assert m1["steps"] == 5 and m1["lr"] == 1.0 and m1["sizes"] == [1, 2]
    assert m1["progress_env"] == "0"  # kernels run with ZAYA_PROGRESS=0: no tqdm spam in executed notebooks
    assert json.loads((run_dir / "metrics" / "03_gamma.json").read_text())["alpha_steps"] == 5

    resolved = yaml.safe_load((run_dir / "params.resolved.yaml").read_text())
    assert resolved["run_name"] == "prof" and resolved["notebooks"] == STEMS
    assert resolved["parameters"] == {"device": "auto", "seed": 7, "steps": 5, "lr": 1.0, "sizes": [1, 2],
                                      "fail": False, "hold_file": ""}
    prov = json.loads((run_dir / "provenance.json").read_text())
    for key in ("git", "python", "packages", "device", "hostname", "started", "finished", "command"):
        assert prov[key] is not None, key
    assert set(prov["git"]) >= {"commit", "dirty"}
    assert prov["packages"]["torch"] and prov["packages"]["papermill"]
    assert prov["device"]["cpu"] and prov["device"]["resolved_device"] in ("cpu", "cuda", "mps")
    assert [n["status"] for n in prov["notebooks"]] == ["ran"] * 3

    rep = (run_dir / "report.md").read_text()  # no *_report notebook here, so the runner wrote the fallback
    assert all(s in rep for s in STEMS)
    assert "| KV cache compression | 8x | 10 | [alpha.png](figures/alpha.png) |" in rep


def test_second_run_skips_everything(base_run, tmp_path, nbdir):
    run_dir = _copy_run(base_run, tmp_path)  # a copy at another path: run_dir is not part of the hash
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "notebooks").glob("*.ipynb")}
    t0 = time.perf_counter()
    res = run_pipeline(base_run["params"], outputs_root=tmp_path / "outputs", notebooks_dir=nbdir, log=lambda *a, **k: None)
    dt = time.perf_counter() - t0
    assert [r["status"] for r in res.results] == ["skipped"] * 3
    assert _exec_log(run_dir) == STEMS  # nothing executed again
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "notebooks").glob("*.ipynb")} == before
    # "skips everything in seconds": no kernel starts; the time is provenance (torch import) and file checks
    assert dt < 10, dt


def test_force_reruns_and_only_selects(base_run, tmp_path, nbdir):
    run_dir = _copy_run(base_run, tmp_path)
    out = tmp_path / "outputs"
    quiet = dict(outputs_root=out, notebooks_dir=nbdir, log=lambda *a, **k: None)
    res = run_pipeline(base_run["params"], only=["02_beta"], **quiet)
    assert [(r["notebook"], r["status"]) for r in res.results] == [("02_beta", "skipped")]
    res = run_pipeline(base_run["params"], only=["02_beta", "01"], force=True, **quiet)
    assert [(r["notebook"], r["status"]) for r in res.results] == [("01_alpha", "ran"), ("02_beta", "ran")]
    assert _exec_log(run_dir) == STEMS + ["01_alpha", "02_beta"]
    # changing a key that only 02 declares invalidates 02's hash, and 03 (which reads what 02 wrote) reruns after it
    params2 = _params(tmp_path, base_run["params"].read_text() + 'hold_file: "/nonexistent"\n', name="prof")
    res = run_pipeline(params2, **quiet)
    assert [r["status"] for r in res.results] == ["skipped", "ran", "ran"]
    # a stamp older than an earlier notebook's finish is stale even in a later invocation (a run killed after 02)
    stamp3 = run_dir / ".stamps" / "03.json"
    st = json.loads(stamp3.read_text())
    st["started"] = "2000-01-01T00:00:00+00:00"
    stamp3.write_text(json.dumps(st))
    res = run_pipeline(params2, **quiet)
    assert [r["status"] for r in res.results] == ["skipped", "skipped", "ran"]
    # editing a notebook's file invalidates it too (its content hash is part of the stamp)
    edited = tmp_path / "nb_edited"
    shutil.copytree(nbdir, edited)
    nb = nbformat.read(edited / "03_gamma.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 1"))
    nbformat.write(nb, edited / "03_gamma.ipynb")
    res = run_pipeline(params2, outputs_root=out, notebooks_dir=edited, log=lambda *a, **k: None)
    assert [r["status"] for r in res.results] == ["skipped", "skipped", "ran"]


def test_failing_notebook_stops_run_cli(base_run, tmp_path, nbdir, capsys):
    run_dir = _copy_run(base_run, tmp_path)
    keep = {p.name: p.read_bytes() for p in (run_dir / "notebooks").glob("*.ipynb")}
    stamp1 = (run_dir / ".stamps" / "01.json").read_bytes()
    params = _params(tmp_path, base_run["params"].read_text() + "fail: true\n", name="prof")
    # the CLI's main() in-process (a subprocess would add seconds of imports; test_kill_and_resume covers that path)
    rc = main(["run", "--params", str(params), "--notebooks-dir", str(nbdir), "--outputs", str(tmp_path / "outputs")])
    r = capsys.readouterr()
    assert rc == 1, r.out + r.err
    failed = run_dir / "notebooks" / "02_beta.failed.ipynb"
    assert "02_beta" in r.err and "AssertionError: asked to fail" in r.err and str(failed) in r.err
    assert "[02/03] 02_beta ... FAILED after" in r.out and "03_gamma" not in r.out
    assert failed.is_file()  # partially executed copy, with the error in it
    fnb = nbformat.read(failed, as_version=4)
    assert any(o.get("ename") == "AssertionError" for c in fnb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    # earlier outputs intact: executed copies byte-identical (02's previous successful copy too), 01's stamp kept
    assert {p.name: p.read_bytes() for p in (run_dir / "notebooks").glob("*.ipynb") if ".failed" not in p.name} == keep
    assert (run_dir / ".stamps" / "01.json").read_bytes() == stamp1
    assert _exec_log(run_dir) == STEMS + ["02_beta"]  # 01 skipped, 02 ran and failed, 03 never started
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert [n["status"] for n in prov["notebooks"]] == ["skipped", "failed"] and prov["finished"]


def test_notebook_failed_exception_in_process(tmp_path, nbdir):
    params = _params(tmp_path, "fail: true\nnotebooks: [02_beta]\n", name="f")
    with pytest.raises(NotebookFailed) as ei:
        run_pipeline(params, outputs_root=tmp_path / "outputs", notebooks_dir=nbdir, log=lambda *a, **k: None)
    assert ei.value.notebook == "02_beta" and ei.value.failed_copy.name == "02_beta.failed.ipynb"
    assert not (tmp_path / "outputs" / "f" / ".stamps" / "02.json").exists()


def test_kill_and_resume(tmp_path, nbdir, capsys):
    """SIGKILL the CLI while notebook 2 runs; the same command again skips 1 and finishes 2 and 3."""
    hold = tmp_path / "hold"
    hold.write_text("02_beta waits while this file exists")
    params = _params(tmp_path, f'hold_file: "{hold}"\n', name="kr")
    out = tmp_path / "outputs"
    run_dir = out / "kr"
    cmd = ["run", "--params", str(params), "--notebooks-dir", str(nbdir), "--outputs", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "zaya_lib", *cmd], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 90
        while "02_beta" not in _exec_log(run_dir):  # notebook 2's body is running (and waiting on the hold file)
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "notebook 2 never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the orphaned kernel notices its parent is gone (ipykernel's parent poller, 1 s period) and exits; give it
    # time before releasing the hold, so it cannot finish notebook 2 behind the resumed run's back
    time.sleep(2.5)
    hold.unlink()
    assert not (run_dir / "notebooks" / "02_beta.ipynb").exists()
    assert (run_dir / ".stamps" / "01.json").exists() and not (run_dir / ".stamps" / "02.json").exists()
    rc = main(cmd)  # the same command again (in-process: the killed run above already exercised the subprocess path)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[01/03] 01_alpha ... skipped (up to date)" in out
    assert "[02/03] 02_beta ... done in" in out and "[03/03] 03_gamma ... done in" in out
    assert _exec_log(run_dir) == ["01_alpha", "02_beta", "02_beta", "03_gamma"]  # 01 was not redone
    # only the resumed run got past the wait: the orphaned kernel of the killed run really exited
    assert (run_dir / "beta_done.log").read_text() == "done\n"
    assert sorted(p.name for p in (run_dir / "notebooks").iterdir()) == [f"{s}.ipynb" for s in STEMS]


def test_validate_cli_ok(tmp_path, nbdir, capsys):
    params = _params(tmp_path, "steps: 4\n", name="good")
    assert main(["validate", "--params", str(params), "--notebooks-dir", str(nbdir)]) == 0
    out = capsys.readouterr().out
    assert "good.yaml: OK (1 key(s) set; run 'good'" in out and "01_alpha, 02_beta, 03_gamma" in out
    assert main(["validate", "--params", str(_params(tmp_path, "steps: x\n", name="bad")),
                 "--notebooks-dir", str(nbdir)]) == 2
    assert "bad.yaml: key 'steps' must be int" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------------- report
def test_report_helpers(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "03_x.json").write_text(json.dumps({
        "loss": {"final": 0.123456, "curve": [3.0, 2.0]}, "ok": True,
        "claims": [{"claim": "RoPE base at 32K", "paper": 1000000.0, "measured": 1e6, "figure": "rope.png"}]}))
    metrics = report.load_metrics(tmp_path)
    assert report.flatten_metrics(metrics["03_x"]) == {"loss.final": 0.123456, "loss.curve": [3.0, 2.0], "ok": True}
    claims = report.collect_claims(metrics)
    assert claims == [report.Claim("RoPE base at 32K", 1e6, 1e6, "rope.png", "03_x")]
    table = report.render_claims_table(claims)
    assert table.splitlines()[0] == "| paper claim | paper value | this run | figure |"
    assert "| RoPE base at 32K | 1e+06 | 1e+06 | [rope.png](figures/rope.png) |" in table
    assert "| 03_x | loss.final | 0.1235 |" in report.render_metrics_table(metrics)
    assert report.format_value(None) == "—" and report.format_value("a|b") == "a\\|b"
    path = report.write_report(tmp_path, "# hi\n")
    assert path.read_text() == "# hi\n" and not list(tmp_path.glob(".report.md*"))  # atomic: no temp left
    (tmp_path / "metrics" / "04_y.json").write_text('{"claims": [{"claim": "x"}]}')
    with pytest.raises(ValueError, match=r"metrics/04_y.json: claims\[0\] lacks paper, measured"):
        report.collect_claims(report.load_metrics(tmp_path))
    (tmp_path / "metrics" / "05_z.json").write_text("{not json")
    with pytest.raises(ValueError, match="05_z.json: not valid JSON"):
        report.load_metrics(tmp_path)


def test_domain_errors_name_the_key_before_anything_runs(tmp_path):
    """An unknown mixture or an impossible context budget fails at validation (issue 4), naming key and file."""
    from zaya_lib.pipeline.params import ParamsError, build_schema, validate_params

    schema = build_schema(Path(__file__).resolve().parents[1] / "notebooks")
    for text, needle in (("pretrain_phase1_mixture: nonsense\n", "unknown mixture 'nonsense'"),
                         ("pretrain_context: 8\n", "'pretrain_context': a context budget of 8 tokens is impossible")):
        f = tmp_path / "bad.yaml"
        f.write_text(text)
        with pytest.raises(ParamsError, match=needle) as e:
            validate_params(f, schema)
        assert str(f) in str(e.value)

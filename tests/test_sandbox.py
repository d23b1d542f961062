"""The code sandbox: hostile programs contained, as root and as an ordinary user; benign ones still run; no silent
downgrade where no namespace can be had.

The hostile cases live in `sandbox_cases.py` (standard library only). Each runs in a driver process, the "caller",
which checks from outside that nothing escaped: once as root (when the tests run as root, as CI does) and once as
the ordinary user `nobody` through runuser/setpriv, so both isolation paths run on every `make test`. Run as an
ordinary user, the second column is that user itself and the root column is skipped.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import sandbox_cases
from zaya_lib.rl import sandbox as sb
from zaya_lib.rl.sandbox import _AUDIT_BOOTSTRAP, SandboxUnavailable, isolation_mode, run_python

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
NS_MODES = (sb.NS_ROOT, sb.NS_USER)


# ------------------------------------------------------------------------------------------------ the API
def test_normal_program_passes():
    r = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n40\n")
    assert r.ok and r.returncode == 0 and r.stdout == "46\n" and not r.timed_out and r.killed_reason is None
    assert r.wall_s < 5


def test_failing_program_is_not_ok():
    r = run_python("raise SystemExit(3)")
    assert not r.ok and r.returncode == 3 and r.killed_reason is None


def test_multiprocessing_and_private_tmp_work():
    code = ("import multiprocessing as mp, tempfile\n"
            "if __name__ == '__main__':\n"
            "    with mp.Pool(2) as p:\n        print(sum(p.map(abs, [-1, -2, 3])))\n"
            "    with tempfile.TemporaryDirectory() as d:\n        print(d.startswith('/tmp/sandbox'))\n")
    r = run_python(code, timeout_s=10)
    assert r.ok and r.stdout == "6\nTrue\n", r.stderr[-500:]


def test_isolation_mode_reported():
    r = run_python("print(1)")
    assert r.isolation == isolation_mode()
    if sys.platform == "linux":  # never the weak mode silently: a namespace mode, or run_python would have raised
        assert r.isolation == (sb.NS_ROOT if IS_ROOT else sb.NS_USER), sb.namespace_error()


def test_bad_arguments_error_clearly():
    with pytest.raises(ValueError, match="positive"):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(TypeError, match="code must be str"):
        run_python(b"print(1)")  # type: ignore[arg-type]


def test_audit_hook_fallback_blocks_sockets(tmp_path):
    """The weak mode's audit hook on its own: sockets and exec are refused."""
    (tmp_path / "main.py").write_text(
        "import socket\ntry:\n    socket.socket()\n    print('SOCKET')\nexcept PermissionError:\n    print('blocked')\n"
        "import os\ntry:\n    os.system('true')\n    print('EXEC')\nexcept PermissionError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _AUDIT_BOOTSTRAP], cwd=tmp_path, env={},
                         capture_output=True, text=True, timeout=10)
    assert out.stdout.split() == ["blocked", "blocked"], out.stderr


# ------------------------------------------------------------------------------------------------ no namespace
def test_no_namespace_refuses_unless_opted_in(monkeypatch):
    """Where the namespaces cannot be had (simulated: the probe saw unshare fail), model code is refused with an
    error that says why and how to opt in; the parameter or the environment variable opts in to the weak mode."""
    monkeypatch.setitem(sb._PROBE, os.geteuid(), (None, "userns: unshare(CLONE_NEWUSER|...): Operation not permitted"))
    monkeypatch.delenv(sb.ALLOW_WEAK_ENV, raising=False)
    assert isolation_mode() == sb.NONE and "unshare" in sb.namespace_error()
    with pytest.raises(SandboxUnavailable) as e:
        run_python("print(1)")
    msg = str(e.value)
    assert "Operation not permitted" in msg and sb.ALLOW_WEAK_ENV in msg and "allow_weak=True" in msg
    assert "user namespaces" in msg
    r = run_python("print(1)", allow_weak=True)
    assert r.ok and r.stdout == "1\n" and r.isolation == sb.WEAK
    monkeypatch.setenv(sb.ALLOW_WEAK_ENV, "1")
    assert isolation_mode() == sb.WEAK
    r = run_python("open('big', 'wb').write(b'x' * (20 << 20))", max_file_mb=8)
    assert r.isolation == sb.WEAK and r.killed_reason == "file_size"
    with pytest.raises(SandboxUnavailable):  # an explicit allow_weak=False wins over the variable
        run_python("print(1)", allow_weak=False)


_NO_USERNS_DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from sandbox_cases import load_sandbox
sb = load_sandbox(sys.argv[2])
out = {"mode": sb.isolation_mode(), "why": sb.namespace_error()}
try:
    r = sb.run_python("print(6 * 7)")
    out.update(ran=True, isolation=r.isolation, stdout=r.stdout)
except sb.SandboxUnavailable as e:
    out.update(ran=False, error=str(e))
print(json.dumps(out))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="user namespaces are Linux-only")
@pytest.mark.parametrize("opt_in", [False, True])
def test_no_namespace_for_real(opt_in, tmp_path):
    """The same, for real: inside a user namespace whose user.max_user_namespaces is 0, unshare(CLONE_NEWUSER)
    fails with ENOSPC, as on a host with unprivileged user namespaces disabled."""
    unshare = shutil.which("unshare")
    assert unshare, "util-linux `unshare` is needed to simulate a host without user namespaces"
    for f in ("sandbox_cases.py",):
        shutil.copy(Path(__file__).with_name(f), tmp_path / f)
    shutil.copy(sb.__file__, tmp_path / "sandbox.py")
    os.chmod(tmp_path, 0o755)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(tmp_path)}
    if opt_in:
        env[sb.ALLOW_WEAK_ENV] = "1"
    script = ("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" -I -c \"$1\" \"$2\" \"$3\"")
    p = subprocess.run([unshare, "--user", "--map-root-user", "sh", "-c", script, sb.sandbox_python(),
                        _NO_USERNS_DRIVER, str(tmp_path), str(tmp_path / "sandbox.py")],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert "No space left on device" in out["why"] or "not permitted" in out["why"], out
    if opt_in:
        assert out["mode"] == sb.WEAK and out["ran"] and out["isolation"] == sb.WEAK and out["stdout"] == "42\n", out
    else:
        assert out["mode"] == sb.NONE and not out["ran"], out
        assert "refusing to run model-written code" in out["error"] and sb.ALLOW_WEAK_ENV in out["error"], out


# ------------------------------------------------------------------------------------------------ hostile cases
def _world_traversable(path: Path) -> bool:
    p = path.resolve()
    return all(os.stat(q).st_mode & stat.S_IXOTH for q in [p, *p.parents])


def _as_user_prefix(user: str) -> list[str]:
    runuser, setpriv = shutil.which("runuser"), shutil.which("setpriv")
    if runuser:
        return [runuser, "-u", user, "--"]
    if setpriv:
        pw = pwd.getpwnam(user)
        return [setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
    pytest.fail("the sandbox's ordinary-user path needs runuser or setpriv (util-linux) to start it as root")


def _run_driver(who: str) -> dict[str, dict]:
    """Run every case in a driver process as `who` ("root", or "nobody": an ordinary user) and collect its
    JSON lines. The caller's dir is a fresh dir in the repo (outside every dir the sandbox hides, so the read-only
    mounts are what is tested there), or under /tmp where the repo is not reachable by an ordinary user."""
    secret = "zaya-secret-" + uuid.uuid4().hex
    ordinary = who == "nobody" and IS_ROOT
    base = REPO if (not ordinary or _world_traversable(REPO)) else Path(tempfile.gettempdir())
    caller = Path(tempfile.mkdtemp(prefix=".zaya_sbx_caller_", dir=base))
    files = Path(tempfile.mkdtemp(prefix="zaya_sbx_driver_"))
    try:
        (caller / "home").mkdir()
        shutil.copy(Path(__file__).with_name("sandbox_cases.py"), files / "sandbox_cases.py")
        shutil.copy(sb.__file__, files / "sandbox.py")
        for p in (files, caller, caller / "home"):
            os.chmod(p, 0o755)
        for p in files.iterdir():
            os.chmod(p, 0o644)
        out = caller / "results.jsonl"
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(caller / "home"),
               sandbox_cases.SECRET_ENV: secret}
        if ordinary:
            try:
                pw = pwd.getpwnam("nobody")
            except KeyError:
                pytest.fail("no user 'nobody' to run the sandbox's ordinary-user path as")
            for p in (caller, caller / "home"):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            py = sb.sandbox_python()  # reachable by an unprivileged uid
            cmd = _as_user_prefix("nobody") + ["/usr/bin/env", "-i"] + [f"{k}={v}" for k, v in env.items()] + [
                py, "-I", str(files / "sandbox_cases.py"), str(files / "sandbox.py"), str(out)]
            env_arg = None
        else:
            cmd = [sys.executable, "-I", str(files / "sandbox_cases.py"), str(files / "sandbox.py"), str(out)]
            env_arg = env
        p = subprocess.run(cmd, env=env_arg, cwd=caller, capture_output=True, text=True, timeout=600,
                           start_new_session=True)
        results = {}
        if out.exists():
            for line in out.read_text().splitlines():
                rec = json.loads(line)
                results[rec["case"]] = rec
        if not results:
            pytest.fail(f"the {who} driver produced no results (rc {p.returncode}): {p.stderr[-3000:]}")
        for rec in results.values():
            rec["driver_rc"], rec["driver_stderr"] = p.returncode, p.stderr[-2000:]
        return results
    finally:
        shutil.rmtree(files, ignore_errors=True)
        shutil.rmtree(caller, ignore_errors=True)


_RESULTS: dict[str, dict[str, dict]] = {}


@pytest.fixture(scope="module")
def hostile_results():
    def get(who: str) -> dict[str, dict]:
        if who not in _RESULTS:
            _RESULTS[who] = _run_driver(who)
        return _RESULTS[who]
    return get


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's namespaces are Linux-only")
@pytest.mark.parametrize("case", list(sandbox_cases.CASES))
@pytest.mark.parametrize("who", ["root", "nobody"])
def test_hostile_case_contained(who, case, hostile_results):
    if who == "root" and not IS_ROOT:
        pytest.skip("the tests do not run as root here; the ordinary-user column runs as this user")
    results = hostile_results(who)
    rec = results.get(case)
    assert rec is not None, f"case {case} left no result (did it kill the driver?): {next(iter(results.values()))}"
    assert rec["isolation"] == (sb.NS_ROOT if who == "root" else sb.NS_USER), rec
    assert rec["contained"], rec
    assert rec["driver_rc"] == 0, rec
    if who == "nobody" and IS_ROOT:
        assert rec["uid"] == pwd.getpwnam("nobody").pw_uid

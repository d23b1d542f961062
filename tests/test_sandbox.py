"""Hostile programs in the code sandbox: each is contained, scored as a failure, and the host is unharmed."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from zaya_lib.rl.sandbox import _AUDIT_BOOTSTRAP, isolation_mode, run_python

REPO = Path(__file__).resolve().parents[1]


def _procs_of_uid(uid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    pids.append(int(d))
            except FileNotFoundError:
                pass
    return pids


def test_normal_program_passes():
    r = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n40\n")
    assert r.ok and r.returncode == 0 and r.stdout == "46\n" and not r.timed_out and r.killed_reason is None
    assert r.wall_s < 5


def test_program_may_write_in_its_own_dir():
    r = run_python("open('f.txt', 'w').write('hi')\nprint(open('f.txt').read())")
    assert r.ok and r.stdout == "hi\n", r.stderr


def test_failing_program_is_not_ok():
    r = run_python("raise SystemExit(3)")
    assert not r.ok and r.returncode == 3


def test_infinite_loop_wall_timeout():
    r = run_python("while True:\n    pass", timeout_s=1.0, cpu_s=10)
    assert not r.ok and r.timed_out and r.killed_reason == "wall_timeout"
    assert r.wall_s < 4  # 1 s deadline + kill sweep; generous for a loaded 2-core box


def test_infinite_loop_cpu_limit():
    r = run_python("while True:\n    pass", timeout_s=30, cpu_s=1)
    assert not r.ok and not r.timed_out and r.killed_reason == "cpu_time"
    assert r.wall_s < 15  # 1 CPU-second; on a shared, overloaded 2-core box that can take several wall seconds


def test_memory_bomb():
    r = run_python("a = []\nwhile True:\n    a.append(bytearray(10**7))", memory_mb=256, timeout_s=5)
    assert not r.ok and r.killed_reason == "memory", (r.returncode, r.stderr[-300:])
    assert r.wall_s < 5


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)", timeout_s=1.0, max_output_bytes=10_000)
    assert not r.ok and r.timed_out and len(r.stdout) <= 10_000


@pytest.mark.skipif(os.geteuid() != 0, reason="fork-bomb containment via a private uid needs root; "
                    "non-root hosts rely on the user's own RLIMIT_NPROC")
def test_fork_bomb_contained_and_swept():
    code = textwrap.dedent("""
        import os
        print(os.getuid(), flush=True)
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()          # try to leave the process group
            except OSError:
                pass
    """)
    n_before = len([d for d in os.listdir("/proc") if d.isdigit()])
    r = run_python(code, timeout_s=1.5, max_procs=16)
    assert not r.ok and r.timed_out
    uid = int(r.stdout.split()[0])
    assert uid != os.getuid()
    assert _procs_of_uid(uid) == []  # every descendant, setsid() or not, is gone
    n_after = len([d for d in os.listdir("/proc") if d.isdigit()])
    assert n_after <= n_before + 5  # other helpers share this box: allow a little unrelated churn
    assert r.wall_s < 8  # 1.5 s deadline + the sweep of up to 16 spinning processes on a loaded box


def test_writes_outside_its_dir_fail(tmp_path):
    tag = uuid.uuid4().hex
    targets = [REPO / f"zaya_escape_{tag}", tmp_path / "escape", Path(f"/tmp/zaya_escape_{tag}"),
               Path(f"/var/tmp/zaya_escape_{tag}"), Path(f"/dev/shm/zaya_escape_{tag}")]
    code = textwrap.dedent(f"""
        import sys
        wrote = []
        for p in {[str(t) for t in targets] + ['../zaya_escape_' + tag]!r}:
            try:
                with open(p, "w") as f:
                    f.write("pwned")
                wrote.append(p)
            except OSError:
                pass
        print(wrote)
        sys.exit(0 if wrote else 1)
    """)
    r = run_python(code)
    for t in targets:
        assert not t.exists(), t
    assert not r.ok, r.stdout


def test_deleting_files_fails(tmp_path):
    canaries = [tmp_path / "canary.txt"]
    fd, var_canary = tempfile.mkstemp(prefix="zaya_canary_", dir="/var/tmp")
    os.close(fd)
    canaries.append(Path(var_canary))
    repo_dir = Path(tempfile.mkdtemp(prefix=".zaya_canary_", dir=REPO))
    canaries.append(repo_dir / "canary.txt")
    try:
        for c in canaries:
            c.write_text("alive")
        code = textwrap.dedent(f"""
            import os, shutil, sys
            gone = []
            for p in {[str(c) for c in canaries]!r}:
                for op in (os.remove, lambda q: shutil.rmtree(os.path.dirname(q))):
                    try:
                        op(p)
                        gone.append(p)
                    except OSError:
                        pass
            sys.exit(0 if gone else 1)
        """)
        r = run_python(code)
        assert not r.ok
        for c in canaries:
            assert c.read_text() == "alive", c
    finally:
        os.unlink(var_canary)
        (repo_dir / "canary.txt").unlink(missing_ok=True)
        repo_dir.rmdir()


def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket, sys
        try:
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"hello")
            print("CONNECTED")
            sys.exit(0)
        except OSError as e:
            print("refused", e)
            sys.exit(1)
    """)
    try:
        r = run_python(code)
        assert not r.ok and "CONNECTED" not in r.stdout
        with pytest.raises(socket.timeout):  # nobody ever knocked on the host's loopback port
            server.accept()
    finally:
        server.close()


def test_parent_environment_is_invisible(monkeypatch):
    secret = "zaya-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("ZAYA_TEST_SECRET", secret)
    code = textwrap.dedent(f"""
        import os, sys
        seen = repr(dict(os.environ))
        for p in (f"/proc/{{os.getppid()}}/environ", "/proc/self/environ", "/proc/1/environ",
                  "/proc/{os.getpid()}/environ"):
            try:
                seen += open(p, "rb").read().decode("latin-1")
            except OSError:
                pass
        print(seen)
        sys.exit(0 if {secret!r} in seen else 1)
    """)
    r = run_python(code)
    assert secret not in r.stdout and secret not in r.stderr
    assert not r.ok
    assert "ZAYA_TEST_SECRET" not in r.stdout


def test_isolation_mode_reported():
    r = run_python("print(1)")
    assert r.isolation == isolation_mode() == ("namespaces+uid" if os.geteuid() == 0 else "audit-hook")


def test_audit_hook_fallback_blocks_sockets(tmp_path):
    """The non-root fallback (audit hook) on its own, run without the namespaces: sockets and exec are refused."""
    (tmp_path / "main.py").write_text(
        "import socket\ntry:\n    socket.socket()\n    print('SOCKET')\nexcept PermissionError:\n    print('blocked')\n"
        "import os\ntry:\n    os.system('true')\n    print('EXEC')\nexcept PermissionError:\n    print('blocked')\n")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _AUDIT_BOOTSTRAP], cwd=tmp_path, env={},
                         capture_output=True, text=True, timeout=10)
    assert out.stdout.split() == ["blocked", "blocked"], out.stderr


def test_bad_arguments_error_clearly():
    with pytest.raises(ValueError, match="positive"):
        run_python("print(1)", timeout_s=0)
    with pytest.raises(TypeError, match="code must be str"):
        run_python(b"print(1)")  # type: ignore[arg-type]

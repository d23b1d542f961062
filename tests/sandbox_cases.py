"""Hostile and benign programs for the code sandbox, each with a check, made by the caller outside, that nothing
escaped. Standard library only, so it also runs as an ordinary user (`nobody`) with a system Python:

    python sandbox_cases.py SANDBOX_PY OUT_JSONL [CASE ...]

loads the sandbox module from the file SANDBOX_PY, runs each case through its `run_python` in the caller's current
directory (the "caller's dir"), and appends one JSON line per case to OUT_JSONL as soon as it is done (so a case that
kills the caller still leaves the earlier ones). tests/test_sandbox.py runs it as root and, through runuser, as
nobody. A case's "contained" is the caller's verdict; "detail" says what it saw.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

SECRET_ENV = "ZAYA_TEST_SECRET"  # the driver is started with this in its initial environment


def _tag() -> str:
    return "zx" + uuid.uuid4().hex[:12]  # 14 chars: fits a process name (comm, 15)


def _named(tag: str) -> list[int]:
    """Host pids whose process name is `tag` (sandboxed processes name themselves with prctl(PR_SET_NAME))."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() == tag:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


_NAME_SELF = "import ctypes\nctypes.CDLL(None).prctl(15, {tag!r}.encode(), 0, 0, 0)\n"  # PR_SET_NAME


def _survivors(tag: str, wait_s: float = 0.0) -> list[int]:
    end = time.monotonic() + wait_s
    while True:
        pids = _named(tag)
        if not pids or time.monotonic() >= end:
            return pids
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------- the cases
# Each returns (contained: bool, detail: str, result: SandboxResult).

def benign_compute(run):
    r = run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n40\n")
    return r.ok and r.stdout == "46\n", f"stdout={r.stdout!r}", r


def benign_write_workdir(run):
    code = ("import os, tempfile\nopen('f.txt', 'w').write('hi')\nos.mkdir('d')\n"
            "with tempfile.NamedTemporaryFile('w+') as t:\n    t.write('tmp'); t.flush()\n"
            "print(open('f.txt').read(), os.getcwd() == os.environ['HOME'])")
    r = run(code)
    return r.ok and r.stdout == "hi True\n", f"stdout={r.stdout!r} stderr={r.stderr[-200:]!r}", r


def infinite_loop(run):
    r = run("while True:\n    pass", timeout_s=1.0, cpu_s=10)
    return r.killed_reason == "wall_timeout" and r.wall_s < 4, f"wall {r.wall_s:.2f}s", r


def cpu_limit(run):
    r = run("while True:\n    pass", timeout_s=30, cpu_s=1)
    return r.killed_reason == "cpu_time" and r.wall_s < 15, f"wall {r.wall_s:.2f}s", r


def sleep(run):
    r = run("import time\ntime.sleep(100)", timeout_s=1.0)
    return r.killed_reason == "wall_timeout" and r.wall_s < 4, f"wall {r.wall_s:.2f}s", r


def memory_bomb(run):
    r = run("a = []\nwhile True:\n    a.append(bytearray(10**7))", memory_mb=256, timeout_s=5)
    return r.killed_reason == "memory" and r.wall_s < 5, f"wall {r.wall_s:.2f}s", r


def fork_bomb(run):
    tag = _tag()
    code = _NAME_SELF.format(tag=tag) + textwrap.dedent("""
        import os
        print("p", flush=True)
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()          # try to leave the process group and the session
                    print("p", flush=True)
            except OSError:
                pass
    """)
    r = run(code, timeout_s=1.5, max_procs=16)
    n, left = r.stdout.count("p"), _survivors(tag)
    return (not r.ok and n <= 16 and not left and r.wall_s < 8,
            f"{n} processes at most (limit 16), {len(left)} left after the run, wall {r.wall_s:.2f}s", r)


def thread_bomb(run):
    code = textwrap.dedent("""
        import threading, time
        n = 1
        while True:
            threading.Thread(target=time.sleep, args=(100,), daemon=True).start()
            n += 1
            print(n, flush=True)
    """)
    r = run(code, timeout_s=5, max_procs=16)
    n = int((r.stdout.split() or ["1"])[-1])
    return r.killed_reason == "processes" and n <= 16, f"{n} threads at most (limit 16)", r


def writes_outside(run):
    tag = _tag()
    home = Path(os.path.expanduser("~"))
    targets = [Path.cwd() / f"zaya_escape_{tag}", Path(f"/tmp/zaya_escape_{tag}"), Path(f"/var/tmp/zaya_escape_{tag}"),
               Path(f"/dev/shm/zaya_escape_{tag}"), home / f"zaya_escape_{tag}", Path(__file__).resolve().parent /
               f"zaya_escape_{tag}"]
    code = textwrap.dedent(f"""
        import sys
        wrote = []
        for p in {[str(t) for t in targets] + ['../zaya_escape_' + tag, '/zaya_escape_' + tag]!r}:
            try:
                with open(p, "w") as f:
                    f.write("pwned")
                wrote.append(p)
            except OSError:
                pass
        print(wrote)
    """)
    r = run(code)
    landed = [str(t) for t in targets + [Path("/zaya_escape_" + tag), Path.cwd().parent / f"zaya_escape_{tag}"]
              if t.exists()]
    for t in landed:
        Path(t).unlink()
    return not landed, f"landed on the host: {landed}; the program saw its writes succeed for {r.stdout.strip()}", r


def delete_caller_file(run):
    canaries = [Path.cwd() / f"zaya_canary_{_tag()}", Path(os.path.expanduser("~")) / f"zaya_canary_{_tag()}"]
    made = []
    for c in canaries:
        try:
            c.write_text("alive")
            made.append(c)
        except OSError:
            pass
    code = textwrap.dedent(f"""
        import os, shutil
        for p in {[str(c) for c in made]!r}:
            for op in (os.remove, lambda q: shutil.rmtree(os.path.dirname(q)), lambda q: open(q, "w").close()):
                try:
                    op(p)
                except OSError:
                    pass
    """)
    r = run(code)
    alive = [c.exists() and c.read_text() == "alive" for c in made]
    for c in made:
        c.unlink(missing_ok=True)
    return bool(made) and all(alive), f"{sum(alive)}/{len(made)} canaries intact ({[str(c) for c in made]})", r


def _run_against(run, code: str, server: socket.socket):
    """Run `code` while `server` listens; (result, whether anything reached the server). Closes the server."""
    try:
        r = run(code)
        try:
            server.accept()
            knocked = True
        except socket.timeout:
            knocked = False
    finally:
        server.close()
    return r, knocked


def loopback_network(run):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        try:
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"hello")
            print("CONNECTED")
        except OSError as e:
            print("refused", e)
    """)
    r, knocked = _run_against(run, code, server)
    return (not knocked and "CONNECTED" not in r.stdout,
            f"program: {r.stdout.strip()!r}; host port knocked: {knocked}", r)


def unix_socket(run):
    """A unix socket the caller listens on in its own dir (ro mounts do not stop connect(); hiding does)."""
    path = Path.cwd() / f".zs_{_tag()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(0.3)
    code = textwrap.dedent(f"""
        import socket
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect({str(path)!r})
            print("CONNECTED")
        except OSError as e:
            print("refused", e)
    """)
    try:
        r, knocked = _run_against(run, code, server)
    finally:
        path.unlink(missing_ok=True)
    return not knocked and "CONNECTED" not in r.stdout, f"program: {r.stdout.strip()!r}; socket reached: {knocked}", r


def parent_environment(run):
    secret = os.environ.get(SECRET_ENV, "")
    code = textwrap.dedent(f"""
        import os
        seen = repr(dict(os.environ))
        for d in os.listdir("/proc"):
            for f in ("environ", "cmdline"):
                try:
                    seen += open(f"/proc/{{d}}/{{f}}", "rb").read().decode("latin-1")
                except OSError:
                    pass
        for p in (f"/proc/{{os.getppid()}}/environ", "/proc/{os.getpid()}/environ"):
            try:
                seen += open(p, "rb").read().decode("latin-1")
            except OSError:
                pass
        print(seen)
        print("PIDS", sorted(int(d) for d in os.listdir("/proc") if d.isdigit()))
    """)
    r = run(code)
    pids = r.stdout.rsplit("PIDS", 1)[-1].strip()
    leaked = bool(secret) and (secret in r.stdout or secret in r.stderr)
    return (bool(secret) and not leaked and SECRET_ENV not in r.stdout,
            f"secret in the caller's initial environment: {bool(secret)}; leaked: {leaked}; pids visible: {pids}", r)


def kill_parent(run):
    me = os.getpid()
    code = textwrap.dedent(f"""
        import os, signal
        for how in (lambda: os.kill(os.getppid(), 9), lambda: os.kill({me}, 9), lambda: os.killpg({os.getpgid(0)}, 9),
                    lambda: os.kill(-1, 9)):
            try:
                how()
            except OSError as e:
                print("refused", e)
    """)
    r = run(code)
    return True, f"the caller (pid {me}) survived; program said {r.stdout.strip()!r}", r  # we are still here


def setsid_daemon(run):
    tag = _tag()
    code = _NAME_SELF.format(tag=tag) + textwrap.dedent("""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:          # double fork: a daemon, re-parented away from the program
                for _ in range(100):
                    time.sleep(0.1)
                    print("still here", flush=True)
            os._exit(0)
        print("parent done", flush=True)
    """)
    r = run(code, timeout_s=5)
    left = _survivors(tag)
    time.sleep(0.3)
    left += _survivors(tag)
    return r.ok and not left and r.wall_s < 4, f"{len(left)} left after the run, wall {r.wall_s:.2f}s", r


def output_flood(run):
    r = run("while True:\n    print('x' * 1000)", timeout_s=5.0, max_output_bytes=10_000)
    return (r.killed_reason == "output_limit" and len(r.stdout) <= 10_000 and r.wall_s < 4,
            f"{len(r.stdout)} bytes kept, wall {r.wall_s:.2f}s", r)


def disk_fill(run):
    code = textwrap.dedent("""
        n = 0
        while True:
            with open(f"fill{n}", "wb") as f:
                f.write(b"x" * (4 << 20))
            n += 1
            print(n, flush=True)
    """)
    r = run(code, timeout_s=10, max_file_mb=8, max_disk_mb=32)
    n = int((r.stdout.split() or ["0"])[-1])
    return r.killed_reason == "disk_full" and n * 4 <= 32, f"{n} x 4 MB written (limit 32 MB)", r


def file_size(run):
    r = run("open('big', 'wb').write(b'x' * (20 << 20))", max_file_mb=8)
    return r.killed_reason == "file_size", f"returncode {r.returncode}", r


def devices(run):
    """Terminals (TIOCSTI keystroke injection into the caller's shell), the console and hardware are out of reach."""
    code = textwrap.dedent("""
        import glob, os
        print(sorted(os.listdir("/dev")))
        for p in sorted(set(glob.glob("/dev/pts/*") + ["/dev/tty", "/dev/console", "/dev/kmsg", "/dev/tty0",
                                                         "/dev/mem", "/dev/sda", "/dev/vda", "/dev/kvm"])):
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NOCTTY))
                print("OPENED", p)
            except OSError:
                pass
        with open("/dev/null", "w") as f:
            f.write("x")
        print(len(open("/dev/urandom", "rb").read(8)))
    """)
    r = run(code)
    return r.ok and "OPENED" not in r.stdout and r.stdout.endswith("8\n"), f"program: {r.stdout.strip()!r}", r


def busy_caller(run):
    """The process limit counts the sandbox's own processes only: a caller with more processes than the limit
    (here 24 sleepers of the same uid) still gets a program that forks 8 children to run."""
    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(24)]
    code = textwrap.dedent("""
        import os, time
        kids = []
        for i in range(8):
            pid = os.fork()
            if pid == 0:
                time.sleep(0.3)
                os._exit(0)
            kids.append(pid)
        for k in kids:
            os.waitpid(k, 0)
        print(len(kids))
    """)
    try:
        r = run(code, max_procs=16)
    finally:
        for k in kids:
            k.kill()
            k.wait()
    return r.ok and r.stdout == "8\n", f"stdout={r.stdout!r} stderr={r.stderr[-200:]!r}", r


def remount_writable(run):
    """Try to undo the read-only mounts: as is, and as root of a nested user namespace (locked there)."""
    tag = _tag()
    target = Path.cwd() / f"zaya_escape_{tag}"
    code = textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        REMOUNT, BIND = 32, 4096
        def attempt(where):
            for mp in ("/", {str(Path.cwd())!r}):
                libc.mount(None, mp.encode(), None, REMOUNT | BIND, None)
            try:
                open({str(target)!r}, "w").write("pwned")
                print("WROTE", where)
            except OSError as e:
                print(where, e)
        attempt("plain")
        if libc.unshare(0x10000000 | 0x20000) == 0:   # CLONE_NEWUSER | CLONE_NEWNS
            uid, gid = os.getuid(), os.getgid()
            for f, s in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"), ("gid_map", f"0 {{gid}} 1")):
                try:
                    open(f"/proc/self/{{f}}", "w").write(s)
                except OSError as e:
                    print(f, e)
            attempt("nested userns")
        else:
            print("unshare", os.strerror(ctypes.get_errno()))
    """)
    r = run(code)
    landed = target.exists()
    target.unlink(missing_ok=True)
    return not landed and "WROTE" not in r.stdout, f"program: {r.stdout.strip()!r}", r


CASES = {f.__name__: f for f in (benign_compute, benign_write_workdir, infinite_loop, cpu_limit, sleep, memory_bomb,
                                  fork_bomb, thread_bomb, writes_outside, delete_caller_file, loopback_network,
                                  unix_socket, parent_environment, kill_parent, setsid_daemon, output_flood, disk_fill,
                                  file_size, busy_caller, devices, remount_writable)}
BENIGN = ("benign_compute", "benign_write_workdir", "busy_caller")


def load_sandbox(path: str):
    spec = importlib.util.spec_from_file_location("zaya_sandbox_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses looks its module up
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    sb = load_sandbox(argv[0])
    out = Path(argv[1])
    names = argv[2:] or list(CASES)
    for name in names:
        t0 = time.monotonic()
        try:
            contained, detail, r = CASES[name](sb.run_python)
            rec = {"case": name, "contained": bool(contained), "detail": detail, "ok": r.ok,
                   "killed_reason": r.killed_reason, "isolation": r.isolation, "wall_s": round(r.wall_s, 3),
                   "stderr_tail": r.stderr[-300:]}
        except Exception as e:  # noqa: BLE001 - a crash of the check is a failed case, reported
            rec = {"case": name, "contained": False, "detail": f"check raised {e!r}", "ok": None,
                   "killed_reason": None, "isolation": None, "wall_s": round(time.monotonic() - t0, 3)}
        rec["uid"] = os.getuid()
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

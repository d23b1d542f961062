"""Run untrusted, model-written Python programs in a separate, contained process.

Notable features:
- One fresh process per run, in its own session/process group, with resource limits set in the child before exec:
  RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_NPROC (processes), RLIMIT_FSIZE (file size),
  RLIMIT_CORE=0, RLIMIT_NOFILE. A wall-clock deadline kills everything the program started.
- Fork bombs: RLIMIT_NPROC counts processes *per uid* and root ignores it. When we are root the child therefore
  drops to a fresh, otherwise unused uid/gid drawn from a high range (`UID_BASE`), so the limit really binds and,
  after the run, a tiny helper running as that uid calls kill(-1, SIGKILL): one atomic sweep that also catches
  descendants that left the process group with setsid().
- No network: as root the child enters a new network namespace (unshare(CLONE_NEWNET) through libc; Python 3.11
  has no os.unshare) which has no interfaces up, so even 127.0.0.1 is unreachable. Without that privilege we fall
  back to an audit hook (PEP 578) that refuses socket creation, ctypes and exec/spawn; this is weaker (native code
  could bypass it) and the result's `isolation` field says which mode ran.
- Filesystem: as root the child also enters a new mount namespace, bind-remounts every mount read-only, mounts an
  empty read-only tmpfs over the world-writable scratch dirs (/tmp, /var/tmp, /dev/shm, /run/lock), and binds its
  private work dir (a fresh `tempfile.mkdtemp`, deleted afterwards) as the only writable place, `/tmp/sandbox`.
  Combined with the unprivileged uid, the host's files can be neither written nor deleted.
- Clean environment (PATH, LANG, HOME=workdir only; nothing from the parent), `python -I -S -B` (isolated mode, no
  site-packages, no .pyc), stdin fed through a pipe, stdout/stderr read concurrently and capped at `max_output_bytes`
  (the rest is discarded, the program is not blocked).
- Interpreter: the sandbox uid must be able to reach the interpreter; the venv's Python may live under a private
  home (/root is 0700), so we pick the first candidate whose whole path is world-executable (override with
  env ZAYA_SANDBOX_PYTHON).
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_python", "sandbox_python", "isolation_mode", "UID_BASE"]

UID_BASE = 1_500_000_000  # sandbox uids/gids are UID_BASE + random < 10**8: no real account lives up there
_UID_SPAN = 100_000_000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_SANDBOX_DIR = "/tmp/sandbox"  # where the work dir appears inside the mount namespace

_libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only calls into it


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0, no limit hit, no timeout
    returncode: int | None  # negative = killed by that signal (subprocess convention)
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock deadline fired
    killed_reason: str | None  # "wall_timeout" | "cpu_time" | "file_size" | "memory" | "signal:NAME" | None
    wall_s: float
    isolation: str = ""  # "namespaces+uid" (root) or "audit-hook" (fallback), see module docstring


def isolation_mode() -> str:
    """Which containment `run_python` uses on this host: 'namespaces+uid' when root, else 'audit-hook'."""
    return "namespaces+uid" if os.geteuid() == 0 else "audit-hook"


def _world_reachable(path: str) -> bool:
    """True if an unprivileged uid can execute `path`: every ancestor dir and the file itself are o+x."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def sandbox_python() -> str:
    """The interpreter the sandbox runs: env ZAYA_SANDBOX_PYTHON, else the first world-reachable candidate."""
    override = os.environ.get("ZAYA_SANDBOX_PYTHON")
    if override:
        return override
    cands = [sys.executable, getattr(sys, "_base_executable", sys.executable),
             shutil.which("python3") or "", "/usr/bin/python3", "/usr/local/bin/python3"]
    if os.geteuid() != 0:  # we keep our own uid: our interpreter is always reachable
        return os.path.realpath(sys.executable)
    for c in cands:
        if c and os.path.exists(c) and _world_reachable(c):
            return os.path.realpath(c)
    raise RuntimeError(
        "sandbox: no Python interpreter is reachable by an unprivileged uid (candidates: "
        f"{[c for c in cands if c]}); install one under /usr or set ZAYA_SANDBOX_PYTHON")


# Fallback containment when we cannot use namespaces: an audit hook installed before the program runs.
_AUDIT_BOOTSTRAP = r"""
import sys
_BLOCK = ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "ctypes.dlopen",
          "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.system")
def _hook(event, args):
    if event.startswith(_BLOCK):
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_hook)
del _hook
_src = open("main.py", encoding="utf-8").read()
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {target}: {os.strerror(e)}")


def _mount_points() -> list[str]:
    pts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as \ooo octal
            pts.append(mp.encode().decode("unicode_escape"))
    return pts


def _make_preexec(workdir: str, uid: int | None, limits: dict[str, int]):
    """The function run in the child between fork and exec. Order matters: namespaces and mounts need root,
    so they come before dropping to the sandbox uid; rlimits last so they cannot break the setup."""

    def preexec() -> None:
        if uid is not None:
            if _libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET|CLONE_NEWNS) failed")
            _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # our mount changes stay in our namespace
            wd_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
            for mp in _mount_points():  # the whole host becomes read-only for us
                try:
                    _mount(None, mp, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
                except OSError:
                    pass  # e.g. a locked or vanished mount; the uid's permissions still apply there
            for d in _SCRATCH_DIRS:  # hide world-writable scratch dirs behind empty tmpfs
                if os.path.isdir(d) and not os.path.islink(d):
                    _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=755")
            os.mkdir(_SANDBOX_DIR)
            _mount(f"/proc/self/fd/{wd_fd}", _SANDBOX_DIR, None, _MS_BIND)
            # a bind of a read-only mount starts read-only: make this one (and only this one) writable
            _mount(None, _SANDBOX_DIR, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV)
            for d in _SCRATCH_DIRS:
                if os.path.isdir(d) and not os.path.islink(d):
                    _mount(None, d, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=64k,mode=755")
            os.close(wd_fd)
            os.chdir(_SANDBOX_DIR)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        else:
            os.chdir(workdir)
        os.umask(0o077)
        cpu = limits["cpu_s"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_procs"],) * 2)

    return preexec


def _uid_procs(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat(f"/proc/{d}").st_uid == uid
            except OSError:
                pass
    return n


def _kill_uid(uid: int, wait_s: float = 3.0) -> None:
    """SIGKILL every process owned by `uid` and wait until they are gone (SIGKILL is delivered asynchronously).

    The kill is one kill(-1) issued *as* that uid (Linux skips the caller), so it cannot race a fork bomb."""
    deadline = time.monotonic() + wait_s
    while _uid_procs(uid):
        _kill_uid_once(uid)
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)


def _kill_uid_once(uid: int) -> None:

    def become() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    try:
        subprocess.run([sandbox_python(), "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
                       preexec_fn=become, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10, cwd="/")
    except (OSError, subprocess.SubprocessError):
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, stdin: str = "", timeout_s: float = 5.0, cpu_s: int = 4, memory_mb: int = 512,
               max_procs: int = 16, max_file_mb: int = 8, max_output_bytes: int = 1 << 20) -> SandboxResult:
    """Run the Python program `code` with `stdin` under the limits above; never raises for anything the program does.

    Limits: `timeout_s` wall seconds (whole process tree SIGKILLed), `cpu_s` CPU seconds, `memory_mb` address
    space per process, `max_procs` processes for the sandbox uid (root only; see module docstring), `max_file_mb`
    per written file, `max_output_bytes` kept from each of stdout and stderr.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be str, got {type(code).__name__}")
    if timeout_s <= 0 or cpu_s <= 0 or memory_mb <= 0 or max_procs <= 0 or max_file_mb <= 0:
        raise ValueError("run_python: timeout_s, cpu_s, memory_mb, max_procs and max_file_mb must be positive")
    root = os.geteuid() == 0
    uid = UID_BASE + secrets.randbelow(_UID_SPAN) if root else None
    workdir = tempfile.mkdtemp(prefix="zaya_sbx_")
    t0 = time.monotonic()
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        os.chmod(workdir, 0o700)
        py = sandbox_python()
        argv = [py, "-I", "-S", "-B", "main.py"] if root else [py, "-I", "-S", "-B", "-c", _AUDIT_BOOTSTRAP]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": _SANDBOX_DIR if root else workdir}
        limits = {"cpu_s": int(max(1, cpu_s)), "memory_bytes": int(memory_mb) << 20,
                  "file_bytes": int(max_file_mb) << 20, "max_procs": int(max_procs)}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True, close_fds=True,
                                    preexec_fn=_make_preexec(workdir, uid, limits))
        except (OSError, subprocess.SubprocessError) as e:  # setup failed in the child: a failure, not a crash
            return SandboxResult(False, None, "", f"sandbox setup failed: {e}", False, "setup_error",
                                 time.monotonic() - t0, isolation_mode())
        out, err, timed_out = _communicate(proc, stdin.encode("utf-8", "replace"), t0 + timeout_s, max_output_bytes)
        _killpg(proc.pid)  # the program is its session leader: it cannot leave this group, so this always kills it
        rc, cpu_used = _reap(proc)  # reap first: its zombie would otherwise count as a live process of the uid
        if uid is not None:
            _kill_uid(uid)
        wall = time.monotonic() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    reason = None
    if timed_out:
        reason = "wall_timeout"
    elif rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= limits["cpu_s"] - 0.05):
            reason = "cpu_time"
        elif sig == signal.SIGXFSZ:
            reason = "file_size"
        else:
            reason = f"signal:{signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_ else f"signal:{sig}"
    elif rc != 0 and "MemoryError" in stderr:
        reason = "memory"
    return SandboxResult(rc == 0 and reason is None, rc, stdout, stderr, timed_out, reason, wall, isolation_mode())


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for the program with wait4 so we also get its CPU time (tells a CPU-limit SIGKILL from others)."""
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except ChildProcessError:  # already reaped by Popen
        return proc.wait(), 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Feed stdin and read stdout/stderr until the program exits (or the deadline), keeping at most `cap` bytes
    of each stream; reading goes on past the cap so a chatty program never blocks on a full pipe."""
    sel = selectors.DefaultSelector()
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pending = memoryview(data)
    timed_out = False
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            timed_out = proc.poll() is None
            break
        if proc.poll() is not None:
            # the program is gone; descendants may still hold the pipes: give them a moment, the sweep kills them
            exited_at = exited_at or now
            if now - exited_at > 0.2:
                break
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            fd = key.fd
            if fd == in_fd:
                try:
                    n = os.write(fd, pending[:65536])
                    pending = pending[n:]
                except (BrokenPipeError, OSError):
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    proc.stdin.close()
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(fd)
                continue
            buf = bufs[fd]
            if len(buf) < cap:
                buf += chunk[: cap - len(buf)]
    if proc.poll() is None and not timed_out and time.monotonic() >= deadline:
        timed_out = True
    if timed_out:
        _killpg(proc.pid)
    sel.close()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        try:
            f.close()
        except OSError:
            pass
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), timed_out

"""Run untrusted, model-written Python programs in a separate, contained process.

Isolation modes (`SandboxResult.isolation`, `isolation_mode()`):
- "namespaces+uid" (root in the initial user namespace): new mount, network, PID, IPC and UTS namespaces, and the
  program runs as a fresh, otherwise unused uid/gid drawn from a high range (`UID_BASE`), so RLIMIT_NPROC (counted
  per uid) binds and nothing of the caller's can be written, read or signalled through ownership.
- "userns" (an ordinary user, or root without mount privileges): the same namespaces inside a new *unprivileged user
  namespace* that maps only the caller's own uid. Set-up runs with the namespace's capabilities; the program is exec'd
  with none (its uid is not 0 inside), so it cannot undo the mounts below. RLIMIT_NPROC is counted per (user
  namespace, uid) since Linux 5.14, so the process limit covers the sandbox's own processes only: the caller's are
  neither counted nor limited. Root without mount privileges first drops to a fresh uid as above.
- "audit-hook" (weaker; opt-in only): where no namespace can be had, an audit hook (PEP 578) refuses sockets, ctypes
  and exec/spawn; native code could bypass it, and the program keeps the caller's uid, files and signals. It is
  never chosen silently: `run_python` raises `SandboxUnavailable`, saying why, unless the caller opts in with
  `allow_weak=True` or the environment variable ZAYA_SANDBOX_ALLOW_WEAK=1.

What the namespace modes give a program (both built by the helper `_INIT`, run as `python -I -S -B -c`):
- The whole host read-only (every mount bind-remounted read-only, keeping the flags a user namespace may not
  clear; a mount that cannot be made read-only fails the set-up); empty read-only tmpfs over the shared and home dirs
  (/var/tmp, /run, /home, /root, the caller's $HOME), with the interpreter's own install bound back (read-only) where
  it lives under one of them; a minimal /dev (null, zero, full, random, urandom: no terminal to inject keystrokes
  into, no hardware); a private, writable /tmp (a tmpfs of `max_disk_mb`, where a disk fill ends; also
  behind /dev/shm, for multiprocessing's semaphores) holding the work dir `/tmp/sandbox` (cwd, HOME, TMPDIR), gone
  with the namespace; a fresh /proc, read-only, that shows only the sandbox's processes (the caller's environment and
  pids are invisible, and no pid outside can be signalled); no network (a new network namespace has only a down
  loopback, so even 127.0.0.1 and the host's abstract unix sockets are unreachable), and a seccomp filter that
  refuses socket(AF_UNIX): a read-only mount does not stop connect() to a unix socket file the uid may write.
  The host's other files stay readable as the program's uid allows (in "userns" mode: the caller's uid).
- A tiny init (PID 1 of the new PID namespace) waits for the program; when the program ends or is stopped, PID 1
  exits and the kernel kills everything left in the namespace, setsid() daemons included, before `run_python`
  returns. Nothing is written to the host: the program's source reaches the helper through a memfd.
- Limits set in the program before exec: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_NPROC
  (processes and threads), RLIMIT_FSIZE (file size; SIGXFSZ restored to its default, which Python ignores, so the
  program is stopped rather than seeing EFBIG), RLIMIT_CORE=0, RLIMIT_NOFILE; no_new_privs. A wall-clock deadline and
  an output cap (`max_output_bytes` per stream) stop it from the outside.
- `killed_reason` names the limit that stopped the program: "wall_timeout", "cpu_time", "memory", "file_size",
  "disk_full", "processes", "open_files", "output_limit", else "signal:NAME" or "setup_error" (None: no limit hit).
- Clean environment (PATH, LANG, HOME, TMPDIR only), `python -I -S -B` (isolated mode, no site-packages, no .pyc),
  stdin fed through a pipe, stdout/stderr read concurrently.
- Interpreter: a fresh uid must be able to reach it; the venv's Python may live under a private home (/root is
  0700), so as root we pick the first candidate whose whole path is world-executable (override with env
  ZAYA_SANDBOX_PYTHON). An ordinary user runs its own interpreter.
- Cost: one extra interpreter start (the helper) and the namespace set-up per run; measured in the README.
"""
from __future__ import annotations

import os
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

__all__ = ["SandboxResult", "SandboxUnavailable", "run_python", "sandbox_python", "isolation_mode",
           "require_isolation", "namespace_error", "UID_BASE", "ALLOW_WEAK_ENV"]

UID_BASE = 1_500_000_000  # sandbox uids/gids are UID_BASE + random < 10**8: no real account lives up there
_UID_SPAN = 100_000_000
ALLOW_WEAK_ENV = "ZAYA_SANDBOX_ALLOW_WEAK"  # "1": run model code with the audit hook where no namespace can be had
_SANDBOX_DIR = "/tmp/sandbox"  # the program's private writable dir (a tmpfs) inside the mount namespace
NS_ROOT, NS_USER, WEAK, NONE = "namespaces+uid", "userns", "audit-hook", "none"
_NPROC_HELPERS = 2  # in "userns" mode the helper and PID 1 run as the sandbox's uid inside its user namespace


class SandboxUnavailable(RuntimeError):
    """No namespace isolation on this host and the weaker mode was not opted in to."""


@dataclass
class SandboxResult:
    ok: bool  # exited with status 0, no limit hit, no timeout
    returncode: int | None  # negative = killed by that signal (subprocess convention)
    stdout: str
    stderr: str
    timed_out: bool  # the wall-clock deadline fired
    killed_reason: str | None  # the limit that stopped it, see module docstring; None if none did
    wall_s: float
    isolation: str = ""  # "namespaces+uid" | "userns" | "audit-hook", see module docstring


# ---------------------------------------------------------------------------------------------- the helper (PID 1)
# Runs as `python -I -S -B -c _INIT <args>`: the process run_python starts ("outer") creates the namespaces and
# forks PID 1, which builds the mounts and forks the program. Outer stays in the caller's PID namespace, reports
# PID 1's pid and kills it on SIGUSR1 (deadline or output cap); only it ever signals PID 1 (its own unreaped child,
# so the pid cannot have been reused). Status lines go to `st_fd`: "pid1 N", "err STEP: WHY", "exit STATUS CPU FLAG".
_INIT = r'''
import os, sys
def _main():
    import ctypes, codecs, _signal
    a = sys.argv[1:]
    mode, py, boot, home = a[0], a[1], a[2], a[3]
    code_fd, st_fd, uid, gid, cpu, mem, fsize, nproc, disk = map(int, a[4:13])
    libc = ctypes.CDLL(None, use_errno=True)
    def say(msg):
        os.write(st_fd, (msg + "\n").encode("utf-8", "replace"))
    def fail(step, err=None):
        err = ctypes.get_errno() if err is None else err
        say(f"err {step}: {os.strerror(err)} (errno {err})")
        os._exit(125)
    state = [0, False]  # PID 1's pid, stop requested
    def stop(signum, frame):
        state[1] = True
        if state[0]:
            try:
                os.kill(state[0], 9)
            except OSError:
                pass
    _signal.signal(_signal.SIGUSR1, stop)
    chunks = []
    while True:
        b = os.read(code_fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    code = b"".join(chunks)
    os.close(code_fd)
    userns = mode == "userns"
    if userns and os.geteuid() == 0 and uid >= 0:
        try:  # root without mount privileges: never run model code as the caller's root, drop to the fresh uid
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError:  # root of a user namespace that maps no such uid: the program gets inside uid 1 below
            pass
    out_uid, out_gid = os.getuid(), os.getgid()
    NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
    flags = NEWNS | NEWUTS | NEWIPC | NEWPID | NEWNET | (NEWUSER if userns else 0)
    if libc.unshare(flags) != 0:
        fail("unshare(" + ("CLONE_NEWUSER|" if userns else "") + "CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWPID)")
    in_uid = out_uid or 1  # never uid 0 inside: exec then drops every capability the set-up had
    in_gid = out_gid or 1
    if userns:
        for f, s in (("setgroups", "deny"), ("uid_map", f"{in_uid} {out_uid} 1"), ("gid_map", f"{in_gid} {out_gid} 1")):
            try:
                with open(f"/proc/self/{f}", "w") as fh:
                    fh.write(s)
            except OSError as e:
                fail(f"write /proc/self/{f}", e.errno)
    nul = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)  # before the fork: PID 1 replaces our (shared) /dev
    pid = os.fork()
    if pid:  # outer: wait for PID 1 (its exit means every process of the namespace is gone)
        state[0] = pid
        say(f"pid1 {pid}")
        if state[1]:
            stop(0, None)
        for fd in (0, 1, 2):
            os.dup2(nul, fd)
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                st = 0
                break
        os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 137)
    # ---- PID 1 of the new namespace
    _signal.signal(_signal.SIGUSR1, _signal.SIG_IGN)
    os.set_inheritable(st_fd, False)
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGKILL if outer dies
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the program cannot ptrace or read us
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    KEEP_FLAGS = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024, "nodiratime": 2048,
                  "relatime": 1 << 21, "strictatime": 1 << 24}
    enc = lambda s: None if s is None else s.encode()
    def mount(src, tgt, fstype, fl, data=None):
        if libc.mount(enc(src), enc(tgt), enc(fstype), ctypes.c_ulong(fl), enc(data)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {tgt}")
    step = "mount /"
    try:
        mount(None, "/", None, REC | PRIVATE)  # our changes stay in our namespace
        with open("/proc/self/mountinfo", "rb") as fh:
            table = [ln.split() for ln in fh.read().splitlines()]
        for f in table:  # the whole host read-only (flags a user namespace has locked are kept as they were)
            mp, opts = codecs.escape_decode(f[4])[0].decode("utf-8", "surrogateescape"), f[5].decode().split(",")
            fl = REMOUNT | BIND | RDONLY
            for o in opts:
                fl |= KEEP_FLAGS.get(o, 0)
            step = f"remount {mp} read-only"
            try:
                mount(None, mp, None, fl)
            except OSError as e:  # fail closed, except where it cannot matter
                if not ("ro" in opts or mp == "/proc" or mp.startswith("/proc/")
                        or e.errno in (2, 13, 22, 116)):  # ENOENT, EACCES, EINVAL (not a mount here), ESTALE
                    raise
        real = os.path.realpath
        if not os.path.isdir("/tmp") or os.path.islink("/tmp"):
            raise OSError(20, "/tmp is not a directory")
        hide = ["/tmp", "/var/tmp", "/run", "/home", "/root"] + ([home] if home else [])
        hide = sorted({d for d in hide if d != "/" and os.path.isdir(d) and not os.path.islink(d) and real(d) == d},
                      key=len)
        hidden = []
        for d in hide:
            if not any(d.startswith(h + "/") for h in hidden):
                hidden.append(d)
        keep = {real(os.path.dirname(real(py))), real(sys.base_prefix), real(sys.base_exec_prefix)}
        keep_fds = {k: os.open(k, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for k in sorted(keep)
                    if any(k == h or k.startswith(h + "/") for h in hidden)}
        devs = ("null", "zero", "full", "random", "urandom")
        dev_fds = {n: os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC) for n in devs if os.path.exists(f"/dev/{n}")}
        for d in hidden:
            step = f"hide {d}"
            if d == "/tmp":  # the private, writable /tmp: everything the program writes lands here, `disk` bytes
                mount("tmpfs", d, "tmpfs", NOSUID | NODEV, f"size={disk},nr_inodes=4096,mode=1777")
            else:
                mount("tmpfs", d, "tmpfs", NOSUID | NODEV, "size=64k,nr_inodes=256,mode=755")
        for k, fd in keep_fds.items():  # the interpreter's own install stays visible (read-only: its mount is)
            step = f"keep {k}"
            os.makedirs(k, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", k, None, BIND | REC)
            os.close(fd)
        step = "private work dir"
        os.mkdir("/tmp/sandbox", 0o700)
        fd = os.open("/tmp/sandbox/main.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, code)
        os.close(fd)
        if not userns:
            os.chown("/tmp/sandbox", uid, gid)
            os.chown("/tmp/sandbox/main.py", uid, gid)
        step = "minimal /dev"  # no terminals (TIOCSTI), no hardware: only the harmless character devices
        mount("tmpfs", "/dev", "tmpfs", NOSUID | NOEXEC, "size=64k,nr_inodes=64,mode=755")
        for n, fd in dev_fds.items():
            os.close(os.open(f"/dev/{n}", os.O_WRONLY | os.O_CREAT, 0o666))
            mount(f"/proc/self/fd/{fd}", f"/dev/{n}", None, BIND)
            os.close(fd)
        for n, t in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
            os.symlink(t, f"/dev/{n}")
        os.mkdir("/tmp/.shm")  # POSIX shared memory and semaphores (multiprocessing), in the same private tmpfs
        os.chmod("/tmp/.shm", 0o1777)
        os.mkdir("/dev/shm")
        mount("/tmp/.shm", "/dev/shm", None, BIND)
        mount(None, "/dev", None, REMOUNT | BIND | RDONLY | NOSUID | NOEXEC)
        for d in hidden:
            if d != "/tmp":
                step = f"read-only {d}"
                mount(None, d, None, REMOUNT | BIND | RDONLY | NOSUID | NODEV)
        step = "mount /proc"
        try:
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC | RDONLY)
        except OSError:  # e.g. a container that masks parts of /proc refuses a fresh proc: show none at all
            mount("tmpfs", "/proc", "tmpfs", NOSUID | NODEV | NOEXEC | RDONLY, "size=4k,mode=555")
        os.chdir("/")
    except OSError as e:
        fail(step, e.errno)
    prog = os.fork()
    if prog == 0:  # the program: drop privileges, set limits, exec
        step = "exec"
        try:
            import resource as R
            if not userns:
                step = "setuid"
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            step = "seccomp"
            if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS (also required for the filter)
                fail("no_new_privs")
            # Filter: socket(AF_UNIX, ...) fails with EACCES (a read-only mount does not stop connect() to a unix
            # socket file the uid may write, e.g. one the caller listens on); foreign-ABI syscalls fail with EPERM.
            arch = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198), "riscv64": (0xC00000F3, 198),
                    "ppc64le": (0xC0000015, 326), "s390x": (0x80000016, 359)}.get(os.uname().machine)
            if arch is None:
                fail(f"seccomp: no filter for {os.uname().machine}", 95)
            arg0 = 16 if sys.byteorder == "little" else 20
            ins = [(0x20, 0, 0, 4), (0x15, 1, 0, arch[0]), (0x06, 0, 0, 0x50001), (0x20, 0, 0, 0),
                   (0x35, 0, 1, 0x40000000), (0x06, 0, 0, 0x50001), (0x15, 0, 3, arch[1]), (0x20, 0, 0, arg0),
                   (0x15, 0, 1, 1), (0x06, 0, 0, 0x5000D), (0x06, 0, 0, 0x7FFF0000)]
            class F(ctypes.Structure):
                _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                            ("k", ctypes.c_uint)]
            class P(ctypes.Structure):
                _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(F))]
            filt = (F * len(ins))(*[F(*i) for i in ins])
            prog_ = P(len(ins), filt)
            if libc.prctl(22, 2, ctypes.byref(prog_), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
                fail("seccomp")
            step = "chdir"
            os.chdir("/tmp/sandbox")
            os.umask(0o077)
            step = "setrlimit"
            R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at soft, SIGKILL at hard
            R.setrlimit(R.RLIMIT_AS, (mem, mem))
            R.setrlimit(R.RLIMIT_FSIZE, (fsize, fsize))
            R.setrlimit(R.RLIMIT_CORE, (0, 0))
            R.setrlimit(R.RLIMIT_NOFILE, (64, 64))
            R.setrlimit(R.RLIMIT_NPROC, (nproc, nproc))
            step = "exec"
            os.execve(py, [py, "-I", "-S", "-B", "-c", boot], dict(os.environ))
        except OSError as e:
            fail(step, e.errno)
        os._exit(125)
    for fd in (0, 1, 2):
        os.dup2(nul, fd)
    st, ru = 0, None
    while True:  # reap everything re-parented to us until the program itself ends
        try:
            p, s, r = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if p == prog:
            st, ru = s, r
            break
    flag = "-"
    try:
        v = os.statvfs("/tmp")
        if v.f_bavail * v.f_frsize < 65536 or v.f_favail == 0:
            flag = "disk_full"
    except OSError:
        pass
    say(f"exit {st} {(ru.ru_utime + ru.ru_stime) if ru else 0.0:.3f} {flag}")
    os._exit(0)
_main()
'''

# Inside the sandbox: restore SIGXFSZ (Python starts with it ignored, which turns a file-size limit into a silent
# EFBIG) and run main.py as __main__.
_BOOT = r"""
def _boot():
    import _signal, sys, __main__
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
    sys.argv[:] = ["main.py"]
    with open("main.py", encoding="utf-8") as f:
        code = compile(f.read(), "main.py", "exec")
    g = __main__.__dict__
    del g["_boot"]
    g["__file__"] = "main.py"
    exec(code, g)
_boot()
"""

# The weak fallback (opt-in only): an audit hook installed before the program runs.
_AUDIT_BOOTSTRAP = r"""
import os, sys, _signal, resource as R
_signal.signal(_signal.SIGXFSZ, _signal.SIG_DFL)
if len(sys.argv) > 1:  # limits: cpu_s memory_bytes file_bytes max_procs (the process count only as an ordinary user)
    _c, _m, _f, _p = map(int, sys.argv[1:5])
    R.setrlimit(R.RLIMIT_CPU, (_c, _c + 1))
    R.setrlimit(R.RLIMIT_AS, (_m, _m))
    R.setrlimit(R.RLIMIT_FSIZE, (_f, _f))
    R.setrlimit(R.RLIMIT_CORE, (0, 0))
    R.setrlimit(R.RLIMIT_NOFILE, (64, 64))
    if os.getuid() != 0:
        R.setrlimit(R.RLIMIT_NPROC, (_p, _p))
    sys.argv[:] = ["main.py"]
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


def _root_in_initial_userns() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- mode selection
_PROBE: dict[int, tuple[str | None, str]] = {}  # euid -> (namespace mode or None, why none)


def _probe() -> tuple[str | None, str]:
    """Which namespace mode works here, tried for real once per process (one trivial program, ~50 ms)."""
    key = os.geteuid()
    if key not in _PROBE:
        if sys.platform != "linux":
            _PROBE[key] = (None, f"namespaces are Linux-only (this is {sys.platform})")
        else:
            why = []
            modes = [NS_ROOT, NS_USER] if _root_in_initial_userns() else [NS_USER]
            for m in modes:
                try:
                    r = _run_ns("pass", "", m, 10.0, 2, 256, 4, 1, 1, 1 << 16)
                except (OSError, RuntimeError) as e:
                    why.append(f"{m}: {e}")
                    continue
                if r.ok:
                    _PROBE[key] = (m, "")
                    break
                why.append(f"{m}: {(r.stderr or r.killed_reason or '').strip()[-300:]}")
            else:
                _PROBE[key] = (None, "; ".join(why))
    return _PROBE[key]


def _weak_allowed(allow_weak: bool | None) -> bool:
    if allow_weak is not None:
        return bool(allow_weak)
    return os.environ.get(ALLOW_WEAK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def namespace_error() -> str | None:
    """Why no namespace isolation can be had here (None when it can)."""
    mode, why = _probe()
    return None if mode else why


def isolation_mode(allow_weak: bool | None = None) -> str:
    """The containment `run_python` uses here: "namespaces+uid" (root), "userns" (unprivileged user namespace),
    "audit-hook" (no namespace, weaker mode opted in) or "none" (no namespace: `run_python` refuses)."""
    mode, _ = _probe()
    return mode or (WEAK if _weak_allowed(allow_weak) else NONE)


def require_isolation(allow_weak: bool | None = None, what: str = "") -> str:
    """The mode `run_python` will use here; raises `SandboxUnavailable` (why, and how to fix or opt in) where it
    would refuse. For callers that want to fail before, not during, a long run (e.g. an RL stage with code rewards)."""
    mode = isolation_mode(allow_weak)
    if mode == NONE:
        raise SandboxUnavailable((f"{what}: " if what else "") + _unavailable_message(namespace_error() or ""))
    return mode


def _unavailable_message(why: str) -> str:
    return ("zaya sandbox: refusing to run model-written code: no namespace isolation is available on this host ("
            f"{why}). The fallback, an audit hook, does not stop native code from writing or deleting your files, "
            "reading your secrets or killing your processes. To fix: enable unprivileged user namespaces (e.g. "
            "`sysctl -w kernel.unprivileged_userns_clone=1`, `sysctl -w user.max_user_namespaces=15000`, or on "
            "Ubuntu 24.04+ `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`; in a container, allow the "
            "unshare syscall), or run as root. To run anyway with the weaker audit-hook containment, set "
            f"{ALLOW_WEAK_ENV}=1 or pass allow_weak=True to run_python.")


# ---------------------------------------------------------------------------------------------- running
def run_python(code: str, stdin: str = "", timeout_s: float = 5.0, cpu_s: int = 4, memory_mb: int = 512,
               max_procs: int = 16, max_file_mb: int = 8, max_output_bytes: int = 1 << 20, max_disk_mb: int = 32,
               allow_weak: bool | None = None) -> SandboxResult:
    """Run the Python program `code` with `stdin` under the limits above; never raises for anything the program does.

    Limits: `timeout_s` wall seconds (whole process tree SIGKILLed), `cpu_s` CPU seconds, `memory_mb` address
    space per process, `max_procs` processes and threads of the program, `max_file_mb` per written file,
    `max_disk_mb` for everything it writes (its private tmpfs), `max_output_bytes` of each of stdout and stderr
    (more stops it). Raises `SandboxUnavailable` where no namespace isolation can be had, unless `allow_weak`
    (or env ZAYA_SANDBOX_ALLOW_WEAK=1) accepts the weaker audit-hook mode.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be str, got {type(code).__name__}")
    if min(timeout_s, cpu_s, memory_mb, max_procs, max_file_mb, max_disk_mb, max_output_bytes) <= 0:
        raise ValueError("run_python: timeout_s, cpu_s, memory_mb, max_procs, max_file_mb, max_disk_mb and "
                         "max_output_bytes must be positive")
    mode, why = _probe()
    if mode is None:
        if not _weak_allowed(allow_weak):
            raise SandboxUnavailable(_unavailable_message(why))
        return _run_weak(code, stdin, timeout_s, int(max(1, cpu_s)), memory_mb, max_procs, max_file_mb,
                         max_output_bytes)
    return _run_ns(code, stdin, mode, timeout_s, int(max(1, cpu_s)), memory_mb, max_procs, max_file_mb, max_disk_mb,
                   max_output_bytes)


def _fresh_uid() -> int:
    return UID_BASE + secrets.randbelow(_UID_SPAN)


def _clean_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": _SANDBOX_DIR, "TMPDIR": _SANDBOX_DIR}


def _run_ns(code: str, stdin: str, mode: str, timeout_s: float, cpu_s: int, memory_mb: int, max_procs: int,
            max_file_mb: int, max_disk_mb: int, max_output_bytes: int) -> SandboxResult:
    t0 = time.monotonic()
    root = os.geteuid() == 0
    uid = _fresh_uid() if root else -1
    py = sandbox_python()
    nproc = max_procs + (_NPROC_HELPERS if mode == NS_USER else 0)
    code_fd = os.memfd_create("zaya_sandbox_main", os.MFD_CLOEXEC)
    st_r, st_w = os.pipe()
    try:
        os.write(code_fd, code.encode("utf-8", "surrogatepass"))
        os.lseek(code_fd, 0, os.SEEK_SET)
        home = os.path.expanduser("~")
        argv = [py, "-I", "-S", "-B", "-c", _INIT, mode, py, _BOOT, home if os.path.isabs(home) else "",
                str(code_fd), str(st_w), str(uid), str(uid), str(cpu_s), str(int(memory_mb) << 20),
                str(int(max_file_mb) << 20), str(nproc), str(int(max_disk_mb) << 20)]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=_clean_env(), start_new_session=True, close_fds=True,
                                    pass_fds=(code_fd, st_w), cwd="/")
        except OSError as e:
            return SandboxResult(False, None, "", f"sandbox setup failed: {e}", False, "setup_error",
                                 time.monotonic() - t0, mode)
        os.close(st_w)
        st_w = -1
        os.close(code_fd)
        code_fd = -1

        def stop() -> None:  # outer kills PID 1 (its own child) on SIGUSR1
            try:
                proc.send_signal(signal.SIGUSR1)
            except OSError:
                pass

        out, err, status, timed_out, flooded = _communicate(proc, stdin.encode("utf-8", "replace"), t0 + timeout_s,
                                                            max_output_bytes, st_r, stop)
        rc_outer = _wait_or_kill(proc, 5.0)
    finally:
        for fd in (code_fd, st_w, st_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
    wall = time.monotonic() - t0
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    lines = status.decode("utf-8", "replace").splitlines()
    errs = [ln[4:] for ln in lines if ln.startswith("err ")]
    exits = [ln.split() for ln in lines if ln.startswith("exit ")]
    if errs or (not exits and not timed_out and not flooded):
        why = errs[0] if errs else f"the sandbox helper ended with status {rc_outer} before the program did"
        return SandboxResult(False, None, stdout, (stderr + "\n" if stderr else "") + f"sandbox setup failed: {why}",
                             timed_out, "setup_error", wall, mode)
    rc, cpu_used, flag = None, 0.0, "-"
    if exits:
        rc = os.waitstatus_to_exitcode(int(exits[0][1]))
        cpu_used, flag = float(exits[0][2]), exits[0][3]
    reason = _reason(rc, timed_out, flooded, cpu_used, cpu_s, stderr, flag == "disk_full")
    return SandboxResult(rc == 0 and reason is None, rc, stdout, stderr, timed_out, reason, wall, mode)


def _reason(rc: int | None, timed_out: bool, flooded: bool, cpu_used: float, cpu_s: int, stderr: str,
            disk_full: bool) -> str | None:
    """Which limit stopped the program. Signals are certain; limits Python reports as exceptions (memory, process
    count, open files, disk) are read from the last line of the uncaught exception's traceback."""
    if timed_out:
        return "wall_timeout"
    if flooded:
        return "output_limit"
    if rc is None or rc == 0:
        return None
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_s - 0.05):
            return "cpu_time"
        if sig == signal.SIGXFSZ:
            return "file_size"
        return f"signal:{signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_ else f"signal:{sig}"
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if last.startswith("MemoryError") or "[Errno 12]" in last or "Cannot allocate memory" in last:
        return "memory"
    if disk_full or "[Errno 28]" in last or "No space left on device" in last:
        return "disk_full"
    if "[Errno 27]" in last or "File too large" in last:
        return "file_size"
    if "[Errno 11]" in last or "can't start new thread" in last:
        return "processes"
    if "[Errno 24]" in last or "Too many open files" in last:
        return "open_files"
    return None


def _wait_or_kill(proc: subprocess.Popen, grace_s: float) -> int:
    """Reap the helper. It exits right after PID 1, whose exit the kernel completes only once every process of
    the namespace is gone; if it is stuck, kill its whole process group (backstop)."""
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        return proc.wait()


# ---------------------------------------------------------------------------------------------- weak fallback
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
    """SIGKILL every process owned by `uid` (one kill(-1) issued *as* that uid, which Linux skips itself for)."""
    deadline = time.monotonic() + wait_s
    while _uid_procs(uid):
        try:
            subprocess.run([sandbox_python(), "-I", "-S", "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
                           user=uid, group=uid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, cwd="/")
        except (OSError, subprocess.SubprocessError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run_weak(code: str, stdin: str, timeout_s: float, cpu_s: int, memory_mb: int, max_procs: int,
              max_file_mb: int, max_output_bytes: int) -> SandboxResult:
    """The opt-in fallback: own uid (a fresh one as root), audit hook, rlimits, process-group kill."""
    t0 = time.monotonic()
    uid = _fresh_uid() if _root_in_initial_userns() else None
    workdir = tempfile.mkdtemp(prefix="zaya_sbx_")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        try:
            argv = [sandbox_python(), "-I", "-S", "-B", "-c", _AUDIT_BOOTSTRAP, str(cpu_s), str(int(memory_mb) << 20),
                    str(int(max_file_mb) << 20), str(max_procs)]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=workdir, start_new_session=True, close_fds=True, umask=0o077, **ids)
        except (OSError, subprocess.SubprocessError) as e:
            return SandboxResult(False, None, "", f"sandbox setup failed: {e}", False, "setup_error",
                                 time.monotonic() - t0, WEAK)
        out, err, _, timed_out, flooded = _communicate(proc, stdin.encode("utf-8", "replace"), t0 + timeout_s,
                                                       max_output_bytes, None, lambda: _killpg(proc.pid))
        _killpg(proc.pid)  # the program is its session leader: this kills whatever stayed in its group
        rc, cpu_used = _reap(proc)
        if uid is not None:
            _kill_uid(uid)
        wall = time.monotonic() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stderr = err.decode("utf-8", "replace")
    reason = _reason(rc, timed_out, flooded, cpu_used, cpu_s, stderr, False)
    return SandboxResult(rc == 0 and reason is None, rc, out.decode("utf-8", "replace"), stderr, timed_out, reason,
                         wall, WEAK)


def _reap(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for the program with wait4 so we also get its CPU time (tells a CPU-limit SIGKILL from others)."""
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except ChildProcessError:  # already reaped by Popen
        return proc.wait(), 0.0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime


def _communicate(proc: subprocess.Popen, data: bytes, deadline: float, cap: int, status_fd: int | None,
                 stop) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Feed stdin and read stdout/stderr (and the helper's status pipe) until the program ends, the deadline
    passes or a stream exceeds `cap` bytes; in the last two cases `stop()` ends the program.
    Returns (stdout, stderr, status, timed_out, flooded)."""
    sel = selectors.DefaultSelector()
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    status = bytearray()
    for fd in (out_fd, err_fd) + ((status_fd,) if status_fd is not None else ()):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    if data:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pending = memoryview(data)
    timed_out = flooded = False
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            timed_out = proc.poll() is None
            break
        if proc.poll() is not None:
            # the helper is gone; descendants may still hold the pipes for a moment
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
            chunk = _read_some(fd)
            if chunk is None:
                continue
            if not chunk:
                sel.unregister(fd)
                continue
            if fd == status_fd:
                status += chunk
                continue
            buf = bufs[fd]
            room = cap - len(buf)
            buf += chunk[:max(room, 0)]
            if len(chunk) > room:
                flooded = True
        if flooded:
            break
    if proc.poll() is None and not timed_out and not flooded and time.monotonic() >= deadline:
        timed_out = True
    if timed_out or flooded:
        stop()
        if status_fd is not None:  # the helper's last words (PID 1's exit line, if the program got that far)
            _drain(status_fd, status, proc)
    elif status_fd is not None:
        _drain(status_fd, status, proc)
    sel.close()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        try:
            f.close()
        except OSError:
            pass
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(status), timed_out, flooded


def _read_some(fd: int) -> bytes | None:
    """Up to 64 KiB from a non-blocking pipe: None when nothing is there yet, b"" at its end (or on an error)."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _drain(fd: int, into: bytearray, proc: subprocess.Popen, wait_s: float = 5.0) -> None:
    """Read the status pipe until every writer has closed it (the helper and PID 1 exited) or `wait_s` passes."""
    end = time.monotonic() + wait_s
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while time.monotonic() < end:
            if not sel.select(timeout=max(0.0, min(0.1, end - time.monotonic()))):
                continue
            chunk = _read_some(fd)
            if chunk is None:
                continue
            if not chunk:
                break
            into += chunk
    finally:
        sel.close()

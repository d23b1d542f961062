"""Where a run came from: git state, versions, device, host, times and command line (style.md principle 12).

Notable features:
- `git_state` records the commit and whether the tree was dirty (tracked changes or untracked files), or None
  outside a git checkout / before the first commit, so a run is never blocked by missing git.
- `package_versions` reads installed distribution metadata (no imports of torch & co), so it is cheap and also
  lists packages that failed to import.
- `device_info` names the CPU (from /proc/cpuinfo or platform), the CUDA devices torch sees, and keeps the raw
  `nvidia-smi` output when the tool exists (modded-nanogpt logs it with every record).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["git_state", "package_versions", "device_info", "collect_provenance", "now_iso", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
# the stack a result depends on; a missing one is recorded as None
PACKAGES = ("zaya-repro", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
            "safetensors", "triton", "numpy", "reasoning-gym", "math-verify", "papermill", "nbclient", "ipykernel",
            "matplotlib", "pyyaml")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 10.0) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def git_state(repo: str | Path = REPO_ROOT) -> dict[str, Any]:
    """{'commit': sha or None, 'branch': name or None, 'dirty': bool or None, 'changed': first changed paths}."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=Path(repo))
    status = _run(["git", "status", "--porcelain"], cwd=Path(repo))
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=Path(repo))
    changed = [line[3:] for line in status.splitlines()] if status is not None else None
    return {
        "commit": commit.strip() if commit else None,
        "branch": branch.strip() if branch else None,
        "dirty": bool(changed) if changed is not None else None,
        "changed": changed[:50] if changed else [],
    }


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """CPU model and count, memory, torch's view of accelerators and what `pick_device` chooses, nvidia-smi output."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    try:
        import torch

        from zaya_lib.utils import pick_device

        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
        dev, dt = pick_device(device, dtype)
        info["resolved_device"], info["resolved_dtype"] = str(dev), str(dt).replace("torch.", "")
    except Exception as e:  # provenance must never stop a run; record why the device is unknown
        info["torch_error"] = f"{type(e).__name__}: {e}"
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = _run(["nvidia-smi"])
    return info


def collect_provenance(params_file: str | Path, device: str = "auto", dtype: str = "auto") -> dict[str, Any]:
    """Everything except the per-notebook results, which the runner adds as it goes."""
    return {
        "started": now_iso(),
        "finished": None,
        # orig_argv keeps `-m zaya_lib` (sys.argv[0] would be the path of __main__.py)
        "command": list(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
        "params_file": str(params_file),
        "git": git_state(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "packages": package_versions(),
        "device": device_info(device, dtype),
        "hostname": socket.gethostname(),
        "env": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS",
                                           "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }

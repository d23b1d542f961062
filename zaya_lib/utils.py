"""Small shared helpers: headless-friendly progress bars, atomic file writes, seeding, device choice.

Notable features:
- `progress` is tqdm when a person watches a terminal and silent under papermill/CI (ZAYA_PROGRESS=0 or no TTY),
  so headless logs are not flooded with carriage-return spam.
- `atomic_write_*` write to a temporary file in the target folder and `os.replace` it: a reader (or a crash) never
  sees a half-written file; `atomic_dir` does the same for a whole folder (tokenizers, checkpoints).
"""
from __future__ import annotations

import json
import os
import random
import sys
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["progress", "atomic_write_text", "atomic_write_json", "atomic_path", "atomic_dir", "seed_everything",
           "pick_device", "progress_enabled"]


def progress_enabled() -> bool:
    """True when progress bars should draw: ZAYA_PROGRESS=1 forces them, =0 silences them; else only on a TTY."""
    flag = os.environ.get("ZAYA_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "False", "")
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """tqdm that disables itself in headless runs (papermill, CI). Same arguments as `tqdm.tqdm`."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared and read
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success it takes `path`'s place (an existing folder is moved
    aside first, since `os.replace` cannot overwrite a non-empty one, and deleted after), on error it is removed. A
    reader sees the old folder or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "dir")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto", dtype: str = "auto"):
    """Resolve `device`/`dtype` parameters: auto picks CUDA, then MPS, then CPU; bf16 where supported, else fp32.

    Returns (torch.device, torch.dtype).
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            dt = torch.bfloat16
        else:
            dt = torch.float32
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)} or 'auto'")
        dt = names[dtype]
    return dev, dt

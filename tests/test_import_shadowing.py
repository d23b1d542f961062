"""The repository's `kernels/` folder (import name `zaya_kernels`) never stands in for an installed `kernels` package.

transformers >= 5.24 requires PyPI's `kernels` and imports it whenever `transformers.modeling_utils` loads. With the
repository root on sys.path (pytest and `python -m` from the root, a notebook started there) Python finds our folder
first; kernels/__init__.py then steps aside (see its docstring). Each case runs in fresh interpreters from the root,
from notebooks/ and from elsewhere, with a stand-in `kernels` package installed ahead of site-packages and without it
(whatever the environment has: none with transformers 5.23, PyPI's with 5.24+).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json
import transformers.modeling_utils
import trl
import zaya_lib
from zaya_lib.model import ZayaForCausalLM
import zaya_kernels
from transformers.utils.import_utils import is_kernels_available
out = {"zaya_kernels_file": zaya_kernels.__file__, "zaya_kernels_api": hasattr(zaya_kernels, "cca_qk_prep"),
       "trl": hasattr(trl, "GRPOConfig"), "kernels_available": bool(is_kernels_available())}
try:
    import kernels
    out["kernels_file"] = getattr(kernels, "__file__", None)
    out["kernels_stand_in"] = getattr(kernels, "STAND_IN", False)
    out["kernels_attrs"] = sorted(a for a in vars(kernels) if not a.startswith("__"))[:5]
except ImportError:
    out["kernels_file"] = "missing"
print(json.dumps(out))
"""


def _installed_kernels() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.parametrize("stand_in", [False, True], ids=["as-installed", "stand-in"])
def test_imports_from_anywhere(stand_in, tmp_path):
    if stand_in and _installed_kernels():
        pytest.skip("PyPI's kernels is installed: the as-installed case already covers an installed package")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if stand_in:  # a regular package named `kernels`, installed ahead of site-packages (what PyPI's would be)
        pkg = tmp_path / "site" / "kernels"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text('STAND_IN = True\n__version__ = "0.0.1"\n')
        env["PYTHONPATH"] = str(tmp_path / "site")
    places = {"root": ROOT, "notebooks": ROOT / "notebooks", "elsewhere": tmp_path}
    procs = {where: subprocess.Popen([sys.executable, "-c", PROBE], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for where, cwd in places.items()}
    for where, proc in procs.items():  # the three interpreters start together: ~5 s of imports each
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (where, stderr[-3000:])
        out = json.loads(stdout.strip().splitlines()[-1])
        _check(where, stand_in, out)


def _check(where: str, stand_in: bool, out: dict) -> None:
    assert out["zaya_kernels_api"] and out["trl"], (where, out)
    assert Path(out["zaya_kernels_file"]).resolve() == ROOT / "kernels" / "__init__.py", (where, out)
    kfile = out["kernels_file"]
    if stand_in:
        assert out["kernels_stand_in"], (where, out)
    elif _installed_kernels():  # PyPI's package, from site-packages, and transformers sees it
        assert kfile not in (None, "missing") and not Path(kfile).resolve().is_relative_to(ROOT), (where, out)
        assert out["kernels_available"], (where, out)
    else:  # none installed: absent, or (root on sys.path) an empty module with no file, as a namespace package
        if where == "root":
            assert kfile is None and out["kernels_attrs"] == [], (where, out)
        else:
            assert kfile == "missing", (where, out)
        assert not out["kernels_available"], (where, out)

"""Every Triton kernel compiles for an H100 (sm_90) with the launchers' block sizes, on this CPU-only machine.

The CPU interpreter accepts code and shapes a GPU rejects (environment.md §2); this runs Triton's real compiler down
to a cubin (ptxas ships in the triton wheel), so GPU-illegal kernels fail here without a GPU. ~1 minute: slow."""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_all_kernels_compile_for_sm90(tmp_path):
    # run in a fresh process: the kernels must be decorated with the interpreter OFF
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "zaya_kernels.aot_check", "--arch", "90"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("OK", "FAIL"))]
    assert proc.returncode == 0 and len(lines) == 21 and all(ln.startswith("OK") for ln in lines), \
        proc.stdout[-3000:] + proc.stderr[-3000:]

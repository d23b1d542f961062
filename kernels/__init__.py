"""zaya_kernels: Triton kernels for ZAYA1's CCA attention and MoE experts (folder `kernels/`, import name `zaya_kernels`).

One folder per op, each with README.md (math and shapes), reference.py (pure PyTorch) and <op>.py (Triton kernels,
launchers, autograd.Function, public function):
- `cca_qk_prep`        fused q/k preparation: causal convs, qk-mean skips, L2 norm * sqrt(d), key temperature, RoPE.
- `latent_attention`   flash-style causal GQA attention in the compressed latent (+ `latent_attention_decode`).
- `moe_experts`        top-1 MoE: sort by expert, grouped SwiGLU GEMMs over stacked weights, weighted un-permute.
Also `testing` (fla/mamba-style comparison helpers) and `aot_check` (compile every kernel for a GPU on a machine
without one: `TRITON_INTERPRET=0 python -m zaya_kernels.aot_check`).

Without a CUDA device the kernels can only run in Triton's CPU interpreter, which must be switched on before any
`@triton.jit` decoration. So, on a machine with no CUDA, importing this package sets TRITON_INTERPRET=1 unless the
variable is already set (environment.md §2). Relative imports only: the package works under any import name but one.

That one is `kernels`. Whenever the repository root is on sys.path (pytest, `python -m` or a notebook started at the
root) Python finds this folder as the top-level package `kernels`, ahead of the installed PyPI package of that name,
which transformers >= 5.24 requires and imports. So, imported as `kernels`, this file steps aside before anything
else runs: it loads the next `kernels` on sys.path in its place (sys.modules["kernels"] becomes that package), or,
when none is installed, stays an empty module without a file or version, as a namespace package would, which
transformers reads as "not installed" (tests/test_import_shadowing.py checks both, from the root and elsewhere).
"""
if __name__ == "kernels":  # reached through the repository root on sys.path; not our import name
    def _step_aside() -> bool:
        """Load the next `kernels` on sys.path that is not this folder (or another checkout of it) as
        sys.modules["kernels"]; False if there is none."""
        import importlib.machinery
        import importlib.util
        import os
        import sys

        path = list(sys.path)
        while True:
            spec = importlib.machinery.PathFinder.find_spec("kernels", path)
            if spec is None:
                return False
            found = os.path.dirname(spec.origin or "")
            if not (os.path.isfile(os.path.join(found, "aot_check.py")) and os.path.isdir(os.path.join(found, "cca_qk"))):
                break
            found = os.path.realpath(found)  # this folder (or a copy of it): leave its parent out and look again
            rest = [p for p in path if os.path.realpath(os.path.join(p or os.curdir, "kernels")) != found]
            if len(rest) == len(path):
                return False
            path = rest
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import system returns what sys.modules holds once this file has run
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["kernels"]
            raise
        return True

    if not _step_aside():  # no other `kernels` installed: look like the namespace package an __init__-less folder is
        del __file__
        __path__ = []
    del _step_aside
else:
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from .cca_qk import cca_qk_prep, cca_qk_prep_ref
    from .latent_attention import (latent_attention, latent_attention_decode, latent_attention_decode_ref,
                                   latent_attention_ref)
    from .moe_experts import moe_experts, moe_experts_ref

    __all__ = ["cca_qk_prep", "cca_qk_prep_ref", "latent_attention", "latent_attention_decode", "latent_attention_ref",
               "latent_attention_decode_ref", "moe_experts", "moe_experts_ref"]

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
variable is already set (environment.md §2). Relative imports only: the package works under any import name.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cca_qk import cca_qk_prep, cca_qk_prep_ref  # noqa: E402
from .latent_attention import (latent_attention, latent_attention_decode, latent_attention_decode_ref,  # noqa: E402
                               latent_attention_ref)
from .moe_experts import moe_experts, moe_experts_ref  # noqa: E402

__all__ = ["cca_qk_prep", "cca_qk_prep_ref", "latent_attention", "latent_attention_decode", "latent_attention_ref",
           "latent_attention_decode_ref", "moe_experts", "moe_experts_ref"]

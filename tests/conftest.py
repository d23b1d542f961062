"""Test-wide setup: offline hub, quiet progress bars, deterministic small thread pools, and the Triton interpreter
on machines without CUDA (it must be set before any kernel is decorated, so it happens here, first)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ZAYA_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        # fp32 references must be fp32: cuDNN convolutions default to TF32 on a GPU (~3e-4 relative error), which
        # the kernels' exact fp32 paths are compared against at 1e-4
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    # One intra-op thread: the test models are tiny, and with two threads every small op pays a barrier (and on a
    # busy 2-core machine spins against other processes: measured up to 15x slower).
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass

import pytest


@pytest.fixture
def rng_seed():
    import torch

    torch.manual_seed(0)
    return 0

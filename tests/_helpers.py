"""Helpers shared by the test modules (imported as `_helpers`: pytest puts tests/ on the path).

- Kernel tests: importing this module first sets TRITON_INTERPRET=1 without CUDA (it must be set before the kernels
  are decorated; tests/conftest.py does it too, this keeps a kernel module runnable on its own), and gives the device
  and the half-precision dtypes it supports.
- `FUZZ_TEXT`: arbitrary text rich in the answer format's markers, for fuzzing extractors, judges and rewards.
- `problem_tokenizer` and `tiny_model`: a small tokenizer trained on worked problems, and a seeded `debug`-preset
  model sized to a tokenizer.
- `random_debug_model`: a `debug`-preset model with every weight, key temperature and balancing bias at random
  non-default values (parity and equality tests, where default values would hide a wrong term).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # bf16 dots are broken in the interpreter

_fuzz_alphabet = st.sampled_from(list("{}\\$<>/ab01 .,=") + ["\\boxed{", "</think>", "<think>", "<answer>", "</answer>",
                                                         "<|end|>", "\\frac", "```python\n", "```"])
FUZZ_TEXT = st.one_of(st.text(max_size=300), st.lists(_fuzz_alphabet, max_size=60).map("".join))


def problem_tokenizer(problems: Sequence, extra: Iterable[str] = (), vocab_size: int = 400):
    """A byte-level BPE (`zaya_lib.data.tokenizer`) trained on worked problems (question + gold response, as
    `zaya_lib.data.tasks` writes them) and any `extra` texts."""
    from zaya_lib.data.tokenizer import train_tokenizer

    return train_tokenizer([p.question + " " + p.response() for p in problems] + list(extra), vocab_size=vocab_size)


def tiny_model(tok, seed: int | None = 0, **overrides):
    """A `debug`-preset ZayaForCausalLM sized to `tok` (its vocabulary, `<pad>`, `<bos>` and `<|end|>` as EOS), with
    the global RNG seeded by `seed` first (None: drawn from the RNG as it stands)."""
    from zaya_lib.config import get_config
    from zaya_lib.model import ZayaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    return ZayaForCausalLM(get_config("debug", **(kw | overrides)))


def random_debug_model(seed: int = 0, **cfg):
    """`debug` preset (config overrides `cfg`), every weight, bias, key temperature and balancing bias set to random
    non-default values, in train mode."""
    from zaya_lib.config import get_config
    from zaya_lib.model import ZayaForCausalLM

    torch.manual_seed(seed)
    m = ZayaForCausalLM(get_config("debug", **cfg))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1.0 if ("scale" in name or "norm" in name) else 0.0) + 0.1 * torch.randn_like(p))
        for layer in m.model.layers:
            layer.self_attn.qk_norm.temp.copy_(torch.linspace(0.7, 1.6, layer.self_attn.qk_norm.temp.numel()))
        for r in m.routers():
            r.balancing_biases[:-1] = 0.05 * torch.randn(r.E)
    return m.train()

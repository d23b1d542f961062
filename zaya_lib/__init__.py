"""zaya-repro: a notebook-driven reproduction of the ZAYA1-8B technical report.

Public names are imported lazily, so `python -m zaya_lib validate` answers in milliseconds without loading torch.
"""
from __future__ import annotations

__all__ = ["ZayaConfig", "get_config", "PRESETS", "ZayaForCausalLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("ZayaConfig", "get_config", "PRESETS"):
        from . import config

        return getattr(config, name)
    if name == "ZayaForCausalLM":
        from .model import ZayaForCausalLM

        return ZayaForCausalLM
    raise AttributeError(f"module 'zaya_lib' has no attribute {name!r}")

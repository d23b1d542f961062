"""zaya-repro: a notebook-driven reproduction of the ZAYA1-8B technical report."""
from .config import PRESETS, ZayaConfig, get_config

__all__ = ["ZayaConfig", "get_config", "PRESETS"]
__version__ = "0.1.0"

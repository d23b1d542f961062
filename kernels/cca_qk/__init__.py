"""Fused CCA q/k preparation (see README.md)."""
from .cca_qk import cca_qk_prep
from .reference import cca_qk_prep_ref, rope_cos_sin

__all__ = ["cca_qk_prep", "cca_qk_prep_ref", "rope_cos_sin"]

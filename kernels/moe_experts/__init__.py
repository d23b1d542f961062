"""Top-1 MoE experts: permutation, grouped SwiGLU GEMMs, weighted un-permutation (see README.md)."""
from .moe_experts import moe_experts
from .reference import moe_experts_ref

__all__ = ["moe_experts", "moe_experts_ref"]

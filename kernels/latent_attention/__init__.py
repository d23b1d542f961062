"""Latent causal GQA attention, flash-style, plus the decode kernel (see README.md)."""
from .latent_attention import latent_attention, latent_attention_decode
from .reference import latent_attention_decode_ref, latent_attention_ref

__all__ = ["latent_attention", "latent_attention_decode", "latent_attention_ref", "latent_attention_decode_ref"]

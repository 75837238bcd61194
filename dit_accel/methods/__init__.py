"""Attention methods: what replaces a DiT's attention computation."""

from .base import AttentionMethod
from .dense import Dense

METHODS = {"Dense": Dense}
"""Method name -> class, for every method this version provides."""

__all__ = ["METHODS", "AttentionMethod", "Dense"]

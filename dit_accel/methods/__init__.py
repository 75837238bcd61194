"""Attention methods: what replaces a DiT's attention computation."""

from .base import AttentionMethod
from .dense import Dense
from .sparse import Neighborhood, TemporalSparse

METHODS = {"Dense": Dense, "Neighborhood": Neighborhood, "TemporalSparse": TemporalSparse}
"""Method name -> class, for every method this version provides."""

__all__ = ["METHODS", "AttentionMethod", "Dense", "Neighborhood", "TemporalSparse"]

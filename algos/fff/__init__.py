"""FFF-replace: dense feed-forward blocks become Fast FeedForward trees (Belcak & Wattenhofer 2023)."""

from algos.fff.algorithm import FFFReplace, apply_fff
from algos.fff.tree import FFF

__all__ = ["FFF", "FFFReplace", "apply_fff"]

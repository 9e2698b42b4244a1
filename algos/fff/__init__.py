"""FFF-replace: dense feed-forward blocks become Fast FeedForward trees (Belcak & Wattenhofer 2023)."""

from algos.fff.algorithm import FFFReplace, FFFSurgery, apply_fff
from algos.fff.config import FFFConfig
from algos.fff.quantized import QuantizedFFF
from algos.fff.training import FFFTraining
from algos.fff.tree import FFF

__all__ = ["FFF", "FFFConfig", "FFFReplace", "FFFSurgery", "FFFTraining", "QuantizedFFF", "apply_fff"]

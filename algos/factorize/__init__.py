"""Factorize: split large Linear / Conv layers into two low-rank layers that start from the trained weights."""

from algos.factorize.algorithm import Factorize, FactorizeSurgery, apply_factorization
from algos.factorize.config import FactorizeConfig
from algos.factorize.layers import FactorizedConv1d, FactorizedConv2d, FactorizedLinear

__all__ = ["Factorize", "FactorizeConfig", "FactorizeSurgery", "apply_factorization", "FactorizedLinear",
           "FactorizedConv1d", "FactorizedConv2d"]

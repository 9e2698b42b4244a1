"""FNet-mixing: swap self-attention for parameter-free Fourier token mixing (Lee-Thorp et al. 2021)."""

from algos.fnet.adapters import FourierBertAttention, FourierSelfAttention, FourierSeqAttention
from algos.fnet.algorithm import FNetMixing, FNetSurgery, apply_fnet_mixing
from algos.fnet.config import FNetConfig
from algos.fnet.mixing import FourierMixing

__all__ = ["FNetMixing", "apply_fnet_mixing", "FNetConfig", "FNetSurgery", "FourierMixing", "FourierBertAttention",
           "FourierSelfAttention", "FourierSeqAttention"]

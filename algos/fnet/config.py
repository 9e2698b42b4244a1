"""FNet-mixing's settings: one frozen dataclass, checked once on construction."""

from __future__ import annotations

from dataclasses import dataclass

from algos.fnet.handlers import Role
from algos.fnet.mixing import mixing_argument_problem
from algos.surgery.config import SurgeryConfig, setting

# scope -> the roles of the self-attention it mixes (cross-attention never)
SCOPES = {"encoder": frozenset({Role.ENCODER}), "decoder": frozenset({Role.DECODER}),
          "all": frozenset({Role.ENCODER, Role.DECODER})}


@dataclass(frozen=True)
class FNetConfig(SurgeryConfig):
    algorithm = "FNetMixing"

    impl: str = setting("fft", "'fft' (paper), 'rfft' (half spectrum, same result), 'dft' (two real GEMMs; needed "
                               "for causal)")
    causal: bool = setting(False, "output t depends on inputs up to t only (masked DFT); for decoders and prefix-LMs")
    scope: str = setting("encoder", "which self-attention is mixed: 'encoder' (an encoder-decoder keeps its "
                                    "decoder), 'decoder' or 'all' (both need causal=True); out-of-scope ones are "
                                    "skipped")
    padding: str = setting("ignore", "'ignore' (paper) or 'mask': padded positions zeroed, mixing at the fixed "
                                     "max_length")
    norm: str | None = setting(None, "'backward' (paper) or 'ortho'; None: 'backward' for post-LN blocks (BERT, "
                                     "BART, norm_first=False), 'ortho' for pre-LN ones (ViT, T5, GPT-2)")
    keep_attention_layers: list[int] | float | None = setting(
        None, "indices among the in-scope self-attention layers kept as attention (negative from the end; [-2, -1] "
              "is FNet-Hybrid), or a float: that share of the last layers")
    max_length: int | None = setting(None, "the fixed mixing length for padding='mask' and causal; default: the HF "
                                           "config's max_position_embeddings")
    dropout: float = setting(0.0, "dropout on the mixing output (0, as FNet)")
    gate: bool = setting(False, "a learned per-channel gate g (starts at 0) and shift b on the mixing output, "
                                "g * mix(x) + b; b starts at the replaced attention's mean output over the "
                                "calibration tokens (0 without calibration, or for nn.MultiheadAttention): for "
                                "pretrained models that are healed after surgery")

    def check(self) -> None:
        problem = mixing_argument_problem(impl=self.impl, causal=self.causal, norm=self.norm, padding=self.padding,
                                          max_length=self.max_length)
        if problem is not None:
            raise self.error(problem)
        if self.scope not in SCOPES:
            raise self.error(f"scope={self.scope!r} is not one of {', '.join(map(repr, SCOPES))}.")
        if Role.DECODER in self.mixed_roles and not self.causal:
            raise self.error(f"scope={self.scope!r} mixes decoder self-attention, which must not look ahead; pass "
                             f"causal=True (with impl='dft'), or scope='encoder'.")
        keep = self.keep_attention_layers
        if keep is not None and not (isinstance(keep, float) and 0 <= keep < 1) and not (
                isinstance(keep, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in keep)):
            raise self.error(f"keep_attention_layers={keep!r} must be a list of layer indices (negative count from "
                             f"the last) or a float in [0, 1) (the share of last layers kept).")
        if not isinstance(self.gate, bool):
            raise self.error(f"gate={self.gate!r} must be True or False.")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise self.error(f"dropout={self.dropout!r} must be in [0, 1).")

    @property
    def calibration_needed(self) -> int:
        """gate=True reads 8 batches for the shift's starting value (a mean needs few); otherwise none."""
        return 8 if self.gate else 0

    @property
    def mixed_roles(self) -> frozenset[Role]:
        return SCOPES[self.scope]

    @property
    def fixed_length(self) -> bool:
        """Mixing at a fixed length (``max_length``)."""
        return self.causal or self.padding == "mask"

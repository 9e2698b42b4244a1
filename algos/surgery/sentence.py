"""sentence-transformers: a ``SentenceTransformer`` whose transformer a surgery rewrote saves and loads with its
surgery. Needs the ``sentence-transformers`` package (installed with the ``heal`` extra).

``save_sentence_transformer(model, directory)`` saves as sentence-transformers does, with the first module's class
set to ``SurgeredTransformer``: its ``save`` adds the surgery record and weights (``algos.save_pretrained``) beside
the Hugging Face files, and ``modules.json`` names it, so that ``SentenceTransformer(directory)`` (with ``algos``
installed) calls its ``load``, which builds the model from the HF config as before surgery and rebuilds the surgery
(``algos.from_pretrained``), which loads every saved weight strictly (transformers' own report of the weights the
base model does not know is silenced for that step).
"""

from __future__ import annotations

import os
from pathlib import Path

import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.models import Transformer

from algos.surgery.pretrained import PretrainedError, from_pretrained, save_pretrained


class SurgeredTransformer(Transformer):
    """sentence-transformers' ``Transformer`` module holding a surgered HF model."""

    def save(self, output_path: str, *args, **kwargs) -> None:
        super().save(output_path, *args, **kwargs)
        save_pretrained(self.auto_model, output_path, overwrite=True)  # the record, and weights we can check

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> SurgeredTransformer:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # not the surgered weights it skips: from_pretrained loads them
        try:
            module = super().load(model_name_or_path, subfolder=subfolder, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        from_pretrained(module.auto_model, Path(model_name_or_path) / subfolder)
        return module


def save_sentence_transformer(model: SentenceTransformer, directory: str | os.PathLike, *,
                              overwrite: bool = False) -> Path:
    """Save ``model`` (its first module a ``Transformer`` whose HF model a surgery rewrote) so that
    ``SentenceTransformer(directory)`` loads it, surgery included; returns the directory."""
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise PretrainedError(f"save_sentence_transformer: {str(directory)!r} is not empty; pass overwrite=True")
    first = model[0]
    if not isinstance(first, Transformer):
        raise PretrainedError(f"save_sentence_transformer: the first module is a {type(first).__name__}, not "
                              f"sentence-transformers' Transformer")
    if type(first) is Transformer:
        first.__class__ = SurgeredTransformer  # same state, our save / load
    model.save(str(directory))
    return directory

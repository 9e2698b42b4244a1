"""``algos export RUN_DIR_OR_CHECKPOINT OUT_DIR``: a Composer checkpoint of a run with surgery -> a directory of
safetensors weights and the JSON surgery record (``algos.save_pretrained``), which loads anywhere with
``algos.from_pretrained`` without unpickling anything.

The base model is built from the run's resolved ``config.yaml`` (the run directory's, or the one above the
checkpoint's ``checkpoints/`` folder), the checkpoint loads into it with ``algos.load_model`` (a Composer checkpoint
is a pickle: export only runs you trust; this is the one step that reads it), and the network inside the Composer
model is saved (the HF model, or the module a ``ComposerClassifier`` wraps), so that it loads into that network
built as before surgery. An HF model's tokenizer, kept in the checkpoint, is saved beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from composer.models import ComposerClassifier, HuggingFaceModel
from torch import nn

from algos.run.build import build
from algos.run.config import load_config
from algos.run.registry import ConfigError
from algos.surgery.pretrained import PretrainedError, save_pretrained
from algos.surgery.resume import load_model


def export(source: str, out: str, *, overwrite: bool = False) -> Path:
    """Write ``source``'s trained, surgered network to ``out``; returns ``out``."""
    path = Path(source)
    if path.is_dir():
        run_dir, checkpoint = path, path / "checkpoints" / "latest-rank0.pt"
    elif path.is_file():
        run_dir, checkpoint = path.parent.parent, path
    else:
        raise ConfigError(f"{source!r} is neither a run directory nor a checkpoint file")
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{str(config_file)!r} is missing; export needs the run's resolved config to build "
                          f"its model (a run directory made by algos run, or a checkpoint inside its checkpoints/)")
    if not checkpoint.exists():
        raise ConfigError(f"{str(checkpoint)!r} does not exist; the run has saved no checkpoint yet")
    model = build(load_config([str(config_file)]), for_training=False).model
    load_model(model, checkpoint)
    network = network_of(model)
    try:
        directory = save_pretrained(network, out, overwrite=overwrite)
    except PretrainedError as error:
        raise ConfigError(str(error)) from None
    if isinstance(model, HuggingFaceModel):
        save_checkpoint_tokenizer(checkpoint, directory)
    return directory


def save_checkpoint_tokenizer(checkpoint: Path, directory: Path) -> bool:
    """Write the tokenizer a Composer checkpoint of an HF model holds into ``directory`` (``AutoTokenizer`` then
    loads it from there), if it holds one; the run's tokenizer, not one rebuilt now: a WordPiece tokenizer trained
    again on the same text can differ (see ``algos.run.data.text``). Returns whether one was written."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)  # load_model has read it already
    hf_state = saved.get("state", {}).get("integrations", {}).get("huggingface", {})
    if not hf_state.get("tokenizer"):
        return False
    HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=str(directory))
    return True


def network_of(model: nn.Module) -> nn.Module:
    """The network a Composer model wraps (HF model, or a ComposerClassifier's module); else the model itself."""
    if isinstance(model, HuggingFaceModel):
        return model.model
    if isinstance(model, ComposerClassifier):
        return model.module
    return model

"""Composer's Trainer built from a ``Built`` run, with its errors translated: an algorithm's ``AlgorithmError`` at
INIT (a surgery's, self-distillation's) and Composer's own argument checks become one-line ``ConfigError``s naming
the key; anything else keeps its traceback."""

from __future__ import annotations

import contextlib

from composer import Trainer

from algos.run.build import Built
from algos.run.registry import ConfigError
from algos.surgery.errors import AlgorithmError


class ClosingTrainer(Trainer):
    """Composer's Trainer, closed at once when its construction fails part-way. Otherwise what Event.INIT started
    stays open until the garbage collector reaches the half-built Trainer: its wandb run stays the process's current
    run (the next ``wandb.init`` returns it instead of starting one), and its late close finishes whichever wandb run
    is current by then."""

    def __init__(self, **kwargs):
        try:
            super().__init__(**kwargs)
        except BaseException:
            if hasattr(self, "engine"):
                with contextlib.suppress(Exception):
                    self.close()
            raise


def raised_by_composer(error: BaseException) -> bool:
    """Did Composer itself raise ``error`` (its checks of Trainer arguments), rather than code it called?"""
    traceback = error.__traceback__
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame.f_globals.get("__name__", "").startswith("composer.")


def build_trainer(built: Built, kwargs: dict) -> Trainer:
    """The Trainer; an algorithm's ``AlgorithmError`` at INIT and Composer's own argument checks become one-line
    ConfigErrors naming the key, and a resumed run with nothing left to train is refused. Any other exception (a
    bug, in a converter or anywhere) keeps its traceback."""
    try:
        trainer = ClosingTrainer(**kwargs)
    except AlgorithmError as error:
        where = next((f"algorithms.{key}" for key, algorithm in zip(built.algorithm_keys, built.algorithms, strict=True)
                      if getattr(algorithm, "name", None) == error.algorithm), "algorithms")
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None
    except (ValueError, TypeError) as error:
        if not raised_by_composer(error):
            raise
        raise ConfigError(f"trainer: {str(error).splitlines()[0]}") from None
    state = trainer.state
    end = state.max_duration
    if built.resume and end is not None and state.timestamp.get(end.unit) >= end:
        trainer.close()
        raise ConfigError(f"run.resume=true: {built.name!r} has already trained for its max_duration "
                          f"({end.value}{end.unit.value}); set a longer trainer.max_duration to train on")
    return trainer

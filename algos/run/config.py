"""Run configuration: YAML files merged left to right with omegaconf, then ``key=value`` overrides.

A base YAML describes a whole run; recipe YAMLs are fragments merged on top (usually an ``algorithms:`` entry).
An override may also add a key (``trainer.eval_subset_num_batches=1``): every section's keys are checked
against what its builder takes when the run is built, so a typo is still an error naming the valid keys. An
override whose value is a mapping replaces that key's whole mapping (``"data={name: synthetic}"`` swaps the dataset
without inheriting the old dataset's keys); any other value is merged in.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from algos.run.registry import ConfigError

SECTIONS = ("run", "model", "data", "optimizer", "scheduler", "algorithms", "trainer", "loggers", "callbacks")
# Present in every config, so that overrides such as run.name=... or run.overwrite=true always have a key to set.
DEFAULTS = {"run": {"name": None, "dir": None, "overwrite": False, "resume": False, "seed": 0, "device": "auto"},
            "algorithms": {}, "loggers": {}, "callbacks": {}}


def load_config(paths: list[str], overrides: list[str] = ()) -> DictConfig:
    """Merge the YAML files in order, apply dotlist ``overrides``, check the top-level sections."""
    if not paths:
        raise ConfigError("no config given: pass a base YAML (see yamls/) and optionally recipes (see recipes/)")
    layers = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except yaml.MarkedYAMLError as error:  # a syntax error: where, and the parser's one-line problem
            raise ConfigError(_yaml_syntax_error(path, error)) from None
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
            raise ConfigError(f"{path}: not a valid YAML mapping ({str(error).splitlines()[0]})") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of sections, got a {type(loaded).__name__}")
        layers.append(loaded)
    config = OmegaConf.merge(OmegaConf.create(DEFAULTS), *layers)
    _check_sections(config, " + ".join(paths))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not key=value (e.g. trainer.max_duration=2ep)")
        key, value = override.split("=", 1)
        if "." not in key and key not in SECTIONS:
            raise ConfigError(f"override {override!r}: unknown section {key!r}; valid: {', '.join(SECTIONS)}")
        mapping = _as_mapping(value)
        try:
            if mapping is not None:
                OmegaConf.update(config, key, mapping, merge=False)
            else:
                config.merge_with_dotlist([override])
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {override!r}: {str(error).splitlines()[0]}") from None
    _check_sections(config, "overrides")
    return config


HEADER_KEYS = {"base": "the base YAML the recipe is made for and tested on (tests/run/test_runner.py)",
               "smoke": "overrides that shorten the recipe's two-batch smoke test (e.g. fewer fit steps)"}


def recipe_header(path: str | Path) -> dict[str, str]:
    """The ``# key: value`` lines of a recipe's top comment whose key is in ``HEADER_KEYS``: what a recipe says about
    itself (``# base: yamls/minilm_sentences.yaml``) without being part of the run's config."""
    header = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].strip().partition(":")
        if key in HEADER_KEYS and value.strip():
            header[key] = value.strip()
    return header


def _yaml_syntax_error(path: str, error: yaml.MarkedYAMLError) -> str:
    """E.g. ``base.yaml:4:8: YAML syntax error: did not find expected ',' or ']' (while parsing a flow sequence at
    3:10)``."""
    mark = error.problem_mark or error.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    context = ""
    if error.context and error.problem:
        at = f" at {error.context_mark.line + 1}:{error.context_mark.column + 1}" if error.context_mark else ""
        context = f" ({error.context}{at})"
    return f"{where}: YAML syntax error: {error.problem or error.context}{context}"


def _as_mapping(value: str) -> dict | None:
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _check_sections(config: DictConfig, where: str) -> None:
    unknown = [key for key in config if key not in SECTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SECTIONS)}")


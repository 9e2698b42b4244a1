"""Config merging, overrides and registries: the errors a user sees before any training starts."""

import pytest

from algos.run.config import load_config
from algos.run.registry import ConfigError, Registry


@pytest.fixture
def yamls(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  name: mlp\n  hidden: 64\ntrainer:\n  max_duration: 3ep\n  seed: 0\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("algorithms:\n  factorize:\n    rank: 0.25\nmodel:\n  hidden: 128\n")
    return base, recipe


def test_merge_left_to_right_then_overrides(yamls):
    base, recipe = yamls
    config = load_config([str(base), str(recipe)], ["trainer.max_duration=1ep", "algorithms.factorize.rank=16"])
    assert config.model.hidden == 128 and config.model.name == "mlp"
    assert config.trainer.max_duration == "1ep" and config.algorithms.factorize.rank == 16


def test_mapping_override_replaces_the_section_and_new_keys_can_be_added(yamls):
    base, recipe = yamls
    config = load_config([str(base), str(recipe)], ["model={name: vit, depth: 2}", "trainer.precision=fp32"])
    assert dict(config.model) == {"name": "vit", "depth": 2}  # hidden is not inherited from the old model
    assert config.trainer.precision == "fp32" and config.trainer.seed == 0
    assert config.run.overwrite is False and config.algorithms.factorize.rank == 0.25  # defaults + recipe kept


def test_config_errors_name_the_key_or_file(yamls, tmp_path):
    base, _ = yamls
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        load_config([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match=r"unknown section 'modle'; valid: run, model"):
        load_config([str(base)], ["modle=3"])
    with pytest.raises(ConfigError, match=r"overrides: unknown section\(s\) 'modle'"):
        load_config([str(base)], ["modle.name=mlp"])
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config([str(base)], ["trainer.max_duration"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  name: mlp\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) 'modle'; valid: run, model, data"):
        load_config([str(bad)])


def test_registry_errors_list_the_choices():
    models = Registry("model")

    @models.register("mlp")
    def mlp(*, hidden: int = 32, depth: int = 2):
        return ("mlp", hidden, depth)

    @models.register("needs")
    def needs(*, spec, size: int):
        if size < 0:
            raise ValueError("size must be >= 0")
        return spec, size

    assert models.build("mlp", {"hidden": 8}, "model") == ("mlp", 8, 2)
    with pytest.raises(ConfigError, match="model: unknown model 'resnet'; registered: mlp, needs"):
        models.build("resnet", {}, "model")
    with pytest.raises(ConfigError, match=r"^model: unknown key\(s\) 'width'; valid: hidden, depth$"):
        models.build("mlp", {"width": 3}, "model")
    with pytest.raises(ConfigError, match=r"^model.hidden: expected int, got '64' \(str\)$"):
        models.build("mlp", {"hidden": "64"}, "model")
    assert models.build("needs", {"size": 2}, "model", spec="S") == ("S", 2)
    with pytest.raises(ConfigError, match=r"^model: missing key\(s\) 'size' \(no default\)$"):  # spec is context
        models.build("needs", {}, "model", spec="S")
    with pytest.raises(ConfigError, match=r"^model \(needs\): size must be >= 0$"):
        models.build("needs", {"size": -1}, "model", spec="S")
    with pytest.raises(ValueError, match="already registered"):
        models.register("mlp", mlp)


@pytest.mark.parametrize("text, message", [
    ("model:\n  name: mlp\n  width: [1, 2\ntrainer:\n  x: 1\n",
     r"bad.yaml:4:8: YAML syntax error: did not find expected ',' or ']' \(while parsing a flow sequence at 3:10\)$"),
    ("model:\n\tname: mlp\n", r"bad.yaml:2:1: YAML syntax error: found character that cannot start any token"),
    ("model: name: mlp\n", r"bad.yaml:1:12: YAML syntax error: mapping values are not allowed in this context$"),
])
def test_yaml_syntax_errors_are_one_line_with_file_line_and_column(text, message, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=f"^{tmp_path}/{message}") as error:
        load_config([str(bad)])
    assert "\n" not in str(error.value)

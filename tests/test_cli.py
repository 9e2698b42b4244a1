import pytest

from algos.cli import main, parse


def test_unknown_command_names_the_choices():
    with pytest.raises(SystemExit, match="unknown command .bogus.. Commands: run: .*compare: .*inspect: .*demo: "):
        main(["bogus"])


def test_options_and_overrides_in_any_order():
    args = parse("compare", ["base.yaml", "--out", "X", "trainer.max_duration=2ba", "recipe.yaml", "--overwrite",
                             "model.width=8"])
    assert args.paths == ["base.yaml", "recipe.yaml"] and args.out == "X" and args.overwrite
    assert args.overrides == ["trainer.max_duration=2ba", "model.width=8"]
    args = parse("run", ["run.resume=true", "base.yaml"])
    assert args.paths == ["base.yaml"] and args.overrides == ["run.resume=true"]


def test_demo_trains_and_resumes_bit_exact(tmp_path, capsys):
    main(["demo", "--epochs", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "module.3                       Linear -> FactorizedLinear  65,792 -> 16,640" in out
    assert "rank=32, rel_error=" in out
    assert "architecture after load: ['Flatten', 'Linear', 'ReLU', 'FactorizedLinear', 'ReLU', 'Linear']" in out
    assert "weights bit-identical to the uninterrupted run: True" in out

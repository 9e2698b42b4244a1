import pytest

from algos.cli import main


def test_unknown_command_names_the_choices():
    with pytest.raises(SystemExit, match="unknown command .bogus.. Commands: run: .*compare: .*inspect: .*demo: "):
        main(["bogus"])


def test_demo_trains_and_resumes_bit_exact(tmp_path, capsys):
    main(["demo", "--epochs", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "module.3                       Linear -> FactorizedLinear  65,792 -> 16,640" in out
    assert "rank=32, rel_error=" in out
    assert "architecture after load: ['Flatten', 'Linear', 'ReLU', 'FactorizedLinear', 'ReLU', 'Linear']" in out
    assert "weights bit-identical to the uninterrupted run: True" in out

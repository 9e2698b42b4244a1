"""The runner end to end: every shipped YAML and recipe trains two batches (data overridden to synthetic), bad input
fails before training without touching existing runs, the run directory holds what the summary says, wandb's
offline run holds the surgery report, ``inspect`` reports without training, ``compare`` writes its table and plot,
and a 2-process DDP run works through Composer's launcher."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from PIL import Image

from algos.cli import main
from algos.run.compare import comparison_table
from algos.run.config import load_config, recipe_header
from algos.run.inspection import inspect_config
from algos.run.registry import ConfigError
from algos.run.rundir import run_lock
from algos.run.runner import run
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted(p.name for p in (ROOT / "yamls").glob("*.yaml"))
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
SYNTHETIC = "data={name: synthetic, batch_size: 2, num_samples: 8, seq_len: 32}"
TWO_BATCHES = ["trainer.max_duration=2ba", "trainer.eval_interval=2ba", "trainer.eval_subset_num_batches=1",
               "trainer.progress_bar=false", "trainer.precision=fp32", "trainer.save_interval=2ba"]
# BERT-base is cut to 4 narrow layers for CI (a 110M-parameter checkpoint takes longer to write than to train two
# batches); the GLUE baseline fine-tunes a hub checkpoint, so offline the same run starts from that config instead.
SMALL_BERT = "{num_hidden_layers: 4, hidden_size: 64, num_attention_heads: 2, intermediate_size: 256}"
OFFLINE_MODEL = {"bert_base_mlm.yaml": [f"model.config={SMALL_BERT}"],
                 "bert_glue.yaml": [f"model={{name: bert_classifier, config: {SMALL_BERT}, num_labels: 2}}"]}
# Each recipe on the baseline its header names (`# base: ...`; the quick-start compare test covers the digits pairs),
# with its header's `# smoke: ...` overrides.
RECIPE_BASE = {r: Path(recipe_header(ROOT / "recipes" / r).get("base", "")).name for r in RECIPES}
# The seq2seq / prefix-LM runs keep their own offline data (span corruption of Python's docs, built in a second),
# with a short timed generation.
REAL_DATA = {"bart_span_corruption.yaml", "gpt2_prefix_lm.yaml"}
# Bases of the largest models (ResNet-50, BERT-base MLM, BART-base, GPT-2) and of the pretrained MiniLM (its recipes
# load and fit a real 22M-parameter encoder): their smoke runs take seconds each, so
# `make test-fast` leaves them out; the other bases still smoke-test every algorithm.
SLOW_BASES = {"resnet50_imagenet.yaml", "bert_base_mlm.yaml", "bart_span_corruption.yaml", "gpt2_prefix_lm.yaml",
              "minilm_sentences.yaml"}


def smoke_config(files, tmp_path, *extra):
    base = Path(files[0]).name
    paths = [str(ROOT / ("yamls" if i == 0 else "recipes") / f) for i, f in enumerate(files)]
    data = ["data.batch_size=2", "run.generate_tokens=4"] if base in REAL_DATA else [SYNTHETIC]
    overrides = [item for name in files[1:] for item in recipe_header(ROOT / "recipes" / name).get("smoke", "").split()]
    return load_config(paths, [*data, *TWO_BATCHES, *OFFLINE_MODEL.get(base, []), *overrides, "run.name=t",
                               f"run.dir={tmp_path / 'run'}", *extra])


def test_every_recipe_names_its_base_in_its_header():
    assert set(RECIPE_BASE.values()) <= set(YAMLS), RECIPE_BASE
    assert {"digits_mlp.yaml", "digits_vit.yaml", "resnet56_cifar10.yaml", "resnet50_imagenet.yaml",
            "bert_base_mlm.yaml", "bert_glue.yaml", "vit_cifar10.yaml"} <= set(YAMLS)
    for path in [*(ROOT / "yamls").glob("*.yaml"), *(ROOT / "recipes").glob("*.yaml")]:
        assert path.read_text().startswith("# "), f"{path.name} must say what it is for in a top comment"


@pytest.mark.parametrize("files", [pytest.param(files, marks=[pytest.mark.slow] if files[0] in SLOW_BASES else [])
                                   for files in [[y] for y in YAMLS] + [[RECIPE_BASE[r], r] for r in RECIPES]],
                         ids=lambda files: "+".join(f.removesuffix(".yaml") for f in files))
def test_shipped_yaml_trains_two_batches(files, tmp_path):
    summary = run(smoke_config(files, tmp_path), quiet=True)
    assert summary["batches"] == 2 and summary["final_train_loss"] is not None
    assert summary["metrics"] and summary["parameters"] > 0 and summary["checkpoint_bytes"] > 0
    generative = files[0] in REAL_DATA
    assert (summary["generate_ms_per_token"] is not None) == generative
    if generative:
        assert summary["generate_ms_per_token"] > 0 and "LanguageCrossEntropy" in summary["metrics"]
    recipe_algorithms = list(load_config([str(ROOT / "recipes" / files[1])]).algorithms) if len(files) > 1 else []
    recipe_algorithms = [key for key in recipe_algorithms if key != "self_distillation"]  # a loss, no surgery
    assert len(summary["surgery"]) == len(recipe_algorithms)
    assert all(report["totals"]["replaced"] > 0 for report in summary["surgery"])
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["name"] == "t" and (tmp_path / "run" / "config.yaml").is_file()


def test_cifar10_mlp_with_fff_trains_two_batches_and_without_data_stops_in_one_line(tmp_path):
    """The FF vs FFF classifier comparison (issue 17): the flattened-CIFAR-10 MLP with recipes/fff.yaml trains on
    synthetic images; the YAML as shipped, with no CIFAR-10 on disk and no download, stops before training."""
    summary = run(smoke_config(["cifar10_mlp.yaml", "fff.yaml"], tmp_path), quiet=True)
    assert summary["batches"] == 2 and summary["surgery"][0]["totals"]["replaced"] == 2
    config = load_config([str(ROOT / "yamls" / "cifar10_mlp.yaml")],
                         [f"data.root={tmp_path / 'nothing'}", f"run.dir={tmp_path / 'offline'}", "loggers={}"])
    with pytest.raises(ConfigError, match=r"CIFAR-10 not found there .*set data.download=true") as error:
        run(config, quiet=True)
    assert "\n" not in str(error.value) and not (tmp_path / "offline").exists()


def test_run_directory_wandb_report_and_no_overwrite(tmp_path, capsys):
    config = smoke_config(["digits_mlp.yaml", "fff.yaml"], tmp_path, "data={name: digits, batch_size: 32}",
                          "model.width=32", "model.hidden=64", "algorithms.fff.min_width=0")
    summary = run(config)
    out = capsys.readouterr().out
    assert "summary of 't' (2 batches)" in out and "FFFReplace surgery" in out and "train samples/s" in out
    run_dir = tmp_path / "run"
    assert load_config([str(run_dir / "config.yaml")]).algorithms.fff.depth == 5  # resolved config saved
    assert "FFFReplace surgery" in (run_dir / "surgery_report.txt").read_text()
    assert summary["surgery"][0]["totals"]["replaced"] == 2
    tables = list(run_dir.glob("wandb/offline-run-*/files/media/table/surgery/FFFReplace_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][0] == "module" and table["data"][0][0] == "module.mlps.0"
    # a second run into the same directory is refused before anything is built or written
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(ConfigError, match=r"run.dir '.*run' already exists; set run.overwrite=true"):
        run(config)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    config.run.overwrite = True
    run(config, quiet=True)
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1  # replaced, not added to


@pytest.mark.parametrize("extra, message", [
    (["model.widht=3"], r"^model: unknown key\(s\) 'widht'; valid: image_shape, width, hidden, blocks, num_classes$"),
    (["model.width=wide"], r"^model.width: expected int, got 'wide' \(str\)$"),
    (["model.name=resnet_56"], r"^model: unknown model 'resnet_56'; registered: bert_classifier, bert_mlm, "),
    (["algorithms={fnet: {}}"], r"^algorithms.fnet: FNetMixing: no .*MultiheadAttention module selected "),
    (["algorithms={fnet: {strict: false}}"], r"^algorithms.fnet: FNetMixing finds nothing to rewrite in model 'mlp'"),
    (["algorithms={fff: {depth: -2}}"], r"^algorithms.fff \(fff\): FFFReplace: depth=-2"),
    (["data={name: cifar10}"], r"^data.name='cifar10' gives 10 classes of \(3, 32, 32\) images; the model takes "
                               r"10 classes of \(1, 8, 8\)"),
    (["model.image_shape=[3, 32, 32]", "data={name: cifar10, root: /nonexistent}"],
     r"^data.root='/nonexistent': CIFAR-10 not found there"),
    (["trainer.optimizers=1"], r"^trainer: optimizers set by the runner"),
    (["trainer.max_duration=forever"], r"^trainer.max_duration='forever' is not a Composer time: write a number and a "
                                       r"unit \(ba, ep, sp, tok, dur, sec, iter\), e.g. 2ep, 100ba, 0.5dur$"),
    (["trainer.max_duration=0ba"], r"^trainer.max_duration='0ba': no training would happen; give a duration above 0"),
    (["algorithms={self_distillation: {layers: [x], hidden_weight: 1.0}}"],
     r"^algorithms.self_distillation: SelfDistillation: layers=\['x'\] names no module of the teacher.$"),
    (["algorithms={self_distillation: {layers: [x], hidden_weight: 0.0}}"],
     r"^algorithms.self_distillation.*: SelfDistillation: layers=\['x'\] has no effect with hidden_weight=0 "),
    (["trainer.eval_interval=1.5ep"], r"^trainer.eval_interval='1.5ep' is not a Composer time \(value 1.5 is not an "
                                      r"integer. Units TimeUnit.EPOCH require integer values\): write a number"),
    (["trainer.save_interval=often"], r"^trainer.save_interval='often' is not a Composer time"),
    (["scheduler.t_warmup=soon"], r"^scheduler.t_warmup='soon' is not a Composer time"),
    (["optimizer={name: adam, lr: abc}"], r"^optimizer.lr: expected float, got 'abc' \(str\)$"),
    (["trainer.progress_bar=maybe"], r"^trainer.progress_bar: expected bool, got 'maybe' \(str\)$"),
    (["trainer.load_path=/nonexistent/ep1.pt"], r"^trainer.load_path='/nonexistent/ep1.pt': no such checkpoint file$"),
    (["trainer.autoresume=true"], r"^trainer.autoresume: the runner resumes with run.resume=true"),
    (["run.overwrite=yes please"], r"^run.overwrite='yes please'; expected true or false$"),
    (["run.colour=red"],
     r"^run: unknown key\(s\) 'colour'; valid: name, dir, overwrite, resume, seed, device, generate_tokens$"),
    (["run.generate_tokens=-1"], r"^run.generate_tokens=-1; expected an int >= 0$"),
    (["optimizer={lr: 0.1}"], r"^optimizer.name is missing"),
])
def test_bad_input_is_one_line_before_training(extra, message, tmp_path, monkeypatch):
    config = smoke_config(["digits_mlp.yaml"], tmp_path, "model.width=32", "model.hidden=64", *extra)  # with wandb

    def no_wandb(**kwargs):
        raise AssertionError("a wandb run started before the config was checked")

    monkeypatch.setattr(wandb, "init", no_wandb)
    with pytest.raises(ConfigError, match=message) as error:
        run(config, quiet=True)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing written, no run directory left behind


def test_cli_reports_config_errors_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^algos run: config file 'nope.yaml' does not exist$"):
        main(["run", "nope.yaml"])


def test_inspect_reports_without_training(tmp_path, capsys):
    main(["inspect", str(ROOT / "yamls/bert_base_mlm.yaml"), str(ROOT / "recipes/fnet_hybrid.yaml"),
          f"model.config={SMALL_BERT}", SYNTHETIC])
    out = capsys.readouterr().out
    assert "FNetMixing surgery" in out
    for layer in (0, 1):
        assert re.search(rf"layer.{layer}.attention +BertAttention -> FourierBertAttention", out)
    for layer in (2, 3):  # the last two keep attention
        assert re.search(rf"layer.{layer}.attention +BertAttention +skipped: kept as attention", out)
    assert "total (2 replaced" in out and "model 'bert_base_mlm+fnet_hybrid':" in out
    config = smoke_config(["resnet50_imagenet.yaml"], tmp_path, "model.image_size=64")
    text = inspect_config(config)
    assert "no surgery algorithm in this config" in text and "LabelSmoothing" in text
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compare_quick_start_writes_table_json_csv_and_plot(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    files = [str(ROOT / f) for f in ("yamls/digits_mlp.yaml", "recipes/factorize.yaml", "recipes/fff.yaml",
                                     "yamls/digits_vit.yaml", "recipes/fnet.yaml")]
    main(["compare", *files, *TWO_BATCHES, "--out", str(out_dir), "trainer.max_duration=4ba",  # options anywhere
          "model.num_classes=10"])
    printed = capsys.readouterr().out
    names = ["digits_mlp", "digits_mlp+factorize", "digits_mlp+fff", "digits_vit", "digits_vit+fnet"]
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["name"] for r in results] == names
    assert [r["speedup"] for r in results][0] == 1.0 and results[3]["speedup"] == 1.0
    assert [len(r["surgery"]) for r in results] == [0, 1, 1, 0, 1]
    assert results[1]["surgery"][0]["replaced"][0]["new_type"] == "FactorizedLinear"  # applied at 0.5dur
    table = (out_dir / "results.md").read_text()
    assert table == comparison_table(results) + "\n" and all(f"| {name} " in table for name in names)
    assert table in printed  # (lost when an earlier test left a wandb run open: see conftest.py)
    assert all(r["batches"] == 4 for r in results)  # the override after --out applied
    assert results[0]["time_to_quality"] is None and results[3]["time_to_quality"] is None  # the baselines
    assert all(r["time_to_quality"]["metric"] == "MulticlassAccuracy" for r in (results[1], results[2], results[4]))
    assert all(len(r["training_seconds"]["eval"]) == len(r["history"]["eval"]) == 2 for r in results)
    assert "| speed-up at matched MulticlassAccuracy " in table.splitlines()[0]
    csv_lines = (out_dir / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,group,samples_per_s") and len(csv_lines) == 6
    assert csv_lines[0].endswith("speedup_at_matched_quality,seconds_to_baseline_quality")
    with Image.open(out_dir / "compare.png") as image:
        assert image.size[0] > 1000 and len(image.getcolors(1 << 20)) > 50  # a drawn figure, not a blank canvas
    with pytest.raises(SystemExit, match="--out '.*cmp' already exists; pass --overwrite"):
        main(["compare", *files[:2], "--out", str(out_dir)])


@pytest.mark.slow
def test_compare_of_generative_runs_adds_tokens_and_generation_latency(tmp_path):
    out_dir = tmp_path / "cmp"
    files = [str(ROOT / f) for f in ("yamls/bart_span_corruption.yaml", "recipes/fnet_encoder.yaml",
                                     "yamls/gpt2_prefix_lm.yaml")]
    main(["compare", *files, *TWO_BATCHES, "model.config=tiny", "data.batch_size=2", "run.generate_tokens=3",
          "--out", str(out_dir)])
    header = (out_dir / "results.md").read_text().splitlines()[0]
    assert "LanguageCrossEntropy" in header and "train tokens/s" in header and "generate ms/token" in header
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["name"] for r in results] == ["bart_span_corruption", "bart_span_corruption+fnet_encoder",
                                            "gpt2_prefix_lm"]
    assert all(r["generate_ms_per_token"] > 0 and r["tokens_per_s"] > 0 for r in results)
    assert results[1]["surgery"][0]["totals"]["replaced"] == 2  # the tiny BART's two encoder layers
    assert "generate_ms_per_token" in (out_dir / "results.csv").read_text().splitlines()[0]
    assert (out_dir / "compare.png").stat().st_size > 10_000


def test_compare_checks_every_config_before_the_first_run(tmp_path):
    with pytest.raises(SystemExit, match="algorithms.fnet: FNetMixing: no .*MultiheadAttention module selected"):
        main(["compare", str(ROOT / "yamls/digits_mlp.yaml"), str(ROOT / "recipes/fnet.yaml"),
              "--out", str(tmp_path / "cmp")])
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(SystemExit, match="recipes/fff.yaml has no model: section, so it is a recipe; give a base "
                                         r"YAML .* before it, e.g. its header's yamls/vit_cifar10.yaml$"):
        main(["compare", str(ROOT / "recipes/fff.yaml"), "--out", str(tmp_path / "cmp")])
    with run_lock(tmp_path / "cmp"):  # another comparison into the same folder (flock: also from this process)
        with pytest.raises(SystemExit, match=rf"^algos compare: --out '{tmp_path / 'cmp'}' is in use by another "
                                             rf"algos run \(pid {os.getpid()} on .*\); wait for it to finish or pick "
                                             r"another --out$"):
            main(["compare", str(ROOT / "yamls/digits_mlp.yaml"), "--out", str(tmp_path / "cmp")])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_two_process_ddp_run_through_composers_launcher(tmp_path):
    """``composer -n 2 -m algos.run``: gloo on CPU, FFF at INIT in both processes, each rank sees half the data."""
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port()),
               "-m", "algos.run", str(ROOT / "yamls/digits_mlp.yaml"), str(ROOT / "recipes/fff.yaml"),
               "model.width=32", "model.hidden=64", "algorithms.fff.min_width=0", *TWO_BATCHES,
               "trainer.max_duration=3ba", f"run.dir={run_dir}",
               "loggers={}"]
    env = {**os.environ, "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batches"] == 3
    assert summary["samples"] == 2 * 3 * 64  # each process trained its own batches of 64
    assert summary["surgery"][0]["totals"]["replaced"] == 2
    assert math.isfinite(summary["samples_per_s"])  # batches 2-3 timed (nan if none was)
    assert (run_dir / "checkpoints" / "ep0-ba3-rank0.pt").exists() and (run_dir / "config.yaml").exists()


def test_a_bug_inside_a_surgery_keeps_its_traceback_and_a_surgery_error_is_one_line(tmp_path, monkeypatch):
    from algos.surgery import SurgeryError
    from algos.surgery.example import SwapLinearSurgery

    def buggy(self, module, fqn):
        raise TypeError("a bug in a converter")

    config = smoke_config(["digits_mlp.yaml"], tmp_path, "algorithms={swap_linear: {}}")
    monkeypatch.setattr(SwapLinearSurgery, "convert", buggy)
    with pytest.raises(TypeError, match="a bug in a converter"):  # not turned into a config error
        run(config, quiet=True)

    def refusing(self, module, fqn):
        raise SurgeryError("SwapLinear", f"{fqn!r} cannot be swapped")

    monkeypatch.setattr(SwapLinearSurgery, "convert", refusing)
    with pytest.raises(ConfigError, match=r"^algorithms.swap_linear: SwapLinear: '.*' cannot be swapped$"):
        run(config, quiet=True)

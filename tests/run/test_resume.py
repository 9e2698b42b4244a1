"""Nothing lost, nothing half-done: a run that cannot start, or stops before its first checkpoint, leaves every
directory as it was (the finished run it was to replace, a folder of user files, an empty folder);
``run.overwrite=true`` replaces only what ``algos run`` made, and never while another run holds the directory;
checkpoints appear whole or not at all; and an interrupted run (also mid-save, or killed) continued with
``run.resume=true`` ends with the weights and losses of an uninterrupted one."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

import algos
from algos.run import build as run_build
from algos.run.config import load_config
from algos.run.registry import ConfigError
from algos.run.runner import MARKER, run
from algos.run.stats import RunStats

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.width=32", "model.hidden=64", "data.batch_size=32", "trainer.progress_bar=false",
         "trainer.eval_subset_num_batches=1", "trainer.max_duration=2ba", "trainer.eval_interval=2ba",
         "trainer.save_interval=2ba", "run.name=t"]
SIX_BATCHES = ["trainer.max_duration=6ba", "trainer.eval_interval=3ba", "trainer.save_interval=1ba"]


def config(run_dir, *extra, recipe=None):
    files = [str(ROOT / "yamls/digits_mlp.yaml"), *([str(ROOT / "recipes" / recipe)] if recipe else [])]
    return load_config(files, [*SMALL, f"run.dir={run_dir}", *extra])


def snapshot(folder: Path) -> dict:
    """Each path under ``folder`` with its bytes (wandb's own files: only their names; its service may still be
    writing them after the run finished)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() and p.relative_to(folder).parts[0] != "wandb"
            else None for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_a_run_that_cannot_start_leaves_the_finished_run_it_was_to_replace(tmp_path, monkeypatch):
    run_dir = tmp_path / "keep"
    run(config(run_dir), quiet=True)  # with the YAML's wandb logger
    before = snapshot(run_dir)
    assert (run_dir / MARKER).read_text() == "t\n" and "checkpoints/latest-rank0.pt" in before

    def no_wandb(**kwargs):
        raise AssertionError("wandb started before the config was checked")

    latest = run_dir / "checkpoints" / "latest-rank0.pt"
    with monkeypatch.context() as patched:  # the runner's checks: before anything is written or started
        patched.setattr(wandb, "init", no_wandb)
        for extra, message in [
            (["trainer.max_duration=banana"], r"trainer.max_duration='banana' is not a Composer time: write a number "
                                              r"and a unit \(ba, ep, sp, tok, dur, sec, iter\), e.g. 2ep, 100ba"),
            ([f"trainer.load_path={latest}"], rf"trainer.load_path='{latest}' is inside run.dir '{run_dir}', which "
                                              r"run.overwrite=true would replace; to continue that run use "
                                              r"run.resume=true instead"),
            (["trainer.autoresume=true"], r"trainer.autoresume: the runner resumes with run.resume=true"),
        ]:
            with pytest.raises(ConfigError, match=f"^{message}"):
                run(config(run_dir, "run.overwrite=true", *extra), quiet=True)
    assert snapshot(run_dir) == before
    # Composer's own check, after Event.INIT started a wandb run in the new directory: the old run is put back, and
    # the wandb run is finished now, not when the garbage collector reaches the half-built Trainer.
    with pytest.raises(ConfigError, match="^trainer: Wall clock time not an allowed time unit") as error:
        run(config(run_dir, "run.overwrite=true", "trainer.max_duration=10sec"), quiet=True)
    assert wandb.run is None and error.value
    assert snapshot(run_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    run(config(run_dir, "run.overwrite=true"), quiet=True)  # replaced, not added to
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert {p for p in snapshot(run_dir) if p[:5] != "wandb"} == {p for p in before if p[:5] != "wandb"}


def test_overwrite_replaces_only_directories_algos_run_made(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"^run.dir '{user}' was not made by algos run \(it has no {MARKER} "
                                          r"file\), so run.overwrite=true will not delete it; pick another run.name / "
                                          r"run.dir$"):
        run(config(user, "run.overwrite=true"), quiet=True)
    assert snapshot(user) == {"notes.txt": b"mine"}
    with pytest.raises(ConfigError, match=r"^run.dir '.*user' already exists; set run.overwrite=true to replace it or "
                                          r"run.resume=true to continue it"):
        run(config(user), quiet=True)
    # A failed start removes what it created: an empty folder given as run.dir stays, empty; new parents go.
    empty = tmp_path / "empty"
    empty.mkdir()
    for run_dir in (empty, tmp_path / "new" / "run"):
        with pytest.raises(ConfigError, match="^trainer: Wall clock time"):
            run(config(run_dir, "trainer.max_duration=10sec"), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "user"] and not any(empty.iterdir())
    with pytest.raises(ConfigError, match="^run.overwrite and run.resume are alternatives"):
        run(config(empty, "run.overwrite=true", "run.resume=true"), quiet=True)


def interrupt_at(batch: int, monkeypatch) -> None:
    """Ctrl-C as batch ``batch + 1`` starts (checkpoint ``batch`` saved). Composer's signal handler turns the real
    one into SystemExit; either is a BaseException that the runner lets through after closing the Trainer."""
    batch_start = RunStats.batch_start

    def interrupted(self, state, logger):
        if int(state.timestamp.batch) == batch:
            raise KeyboardInterrupt
        batch_start(self, state, logger)

    monkeypatch.setattr(RunStats, "batch_start", interrupted)


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "latest-rank0.pt", weights_only=False)["state"]["model"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [("fff.yaml", ["algorithms.fff.min_width=0"]),  # surgery at INIT
                                           ("factorize.yaml", ["algorithms.factorize.min_features=32"])],  # at 3ba
                         ids=["fff", "factorize"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, recipe, extra):
    straight = run(config(tmp_path / "straight", *SIX_BATCHES, *extra, recipe=recipe), quiet=True)
    run_dir = tmp_path / "resumed"
    with monkeypatch.context() as patched:
        interrupt_at(4, patched)
        with pytest.raises(KeyboardInterrupt):
            run(config(run_dir, *SIX_BATCHES, *extra, recipe=recipe), quiet=True)
    assert wandb.run is None  # closed on the way out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        *(f"ep0-ba{b}-rank0.pt" for b in range(1, 5)), "latest-rank0.pt"]
    assert not (run_dir / "summary.json").exists()

    resumed = run(config(run_dir, *SIX_BATCHES, *extra, "run.resume=true", recipe=recipe), quiet=True)
    assert resumed["batches"] == 6 and json.loads((run_dir / "summary.json").read_text())["batches"] == 6
    assert resumed["history"] == straight["history"]  # every batch's train loss and the evals at 3 and 6, bit for bit
    seconds = resumed["training_seconds"]  # the training clock carries on from the checkpoint, never restarts
    assert len(seconds["train_loss"]) == 6 and len(seconds["eval"]) == len(resumed["history"]["eval"])
    assert all(0 < a <= b for a, b in zip(seconds["train_loss"], seconds["train_loss"][1:], strict=False))
    expected, weights = final_weights(tmp_path / "straight"), final_weights(run_dir)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    # the surgery report too, also of a surgery made before the interruption (restored from the checkpoint)
    assert resumed["surgery"] == straight["surgery"] and resumed["surgery_tables"] == straight["surgery_tables"]
    assert resumed["surgery"][0]["totals"]["replaced"] > 0
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2  # the interrupted run's and the resumed run's

    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"^run.resume=true: 't' has already trained for its max_duration \(6ba\); "
                                          r"set a longer trainer.max_duration to train on$"):
        run(config(run_dir, *SIX_BATCHES, *extra, "run.resume=true", recipe=recipe), quiet=True)
    assert snapshot(run_dir) == before  # not even a wandb run added


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"^run.resume=true: run.dir '.*nothing' does not exist; nothing to resume$"):
        run(config(tmp_path / "nothing", "run.resume=true"), quiet=True)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=r"^run.resume=true: no checkpoint to resume from \('.*nothing/checkpoints/"
                                          r"latest-rank0.pt' does not exist; a run saves one every "
                                          r"trainer.save_interval\)$"):
        run(config(tmp_path / "nothing", "run.resume=true"), quiet=True)


@pytest.mark.slow
def test_a_save_interrupted_midway_leaves_no_checkpoint_and_the_run_resumes(tmp_path, monkeypatch):
    """Ctrl-C while checkpoint 3 is written (injected inside torch.save, after half a file): no file of it is left,
    latest stays at 2, and run.resume=true ends with the uninterrupted run's losses and evals."""
    straight = run(config(tmp_path / "straight", *SIX_BATCHES), quiet=True)
    run_dir = tmp_path / "resumed"
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        if "ba3" in getattr(f, "name", str(f)):
            f.write(b"PK\x03\x04 the first bytes of a checkpoint")
            try:
                raise KeyboardInterrupt  # Ctrl-C arrives mid-write, and torch's zip writer, closing, raises its own
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:659] . unexpected pos 48003712") from None
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", interrupted_save)
        with pytest.raises(KeyboardInterrupt, match="^interrupted while saving ep0-ba3-rank0.pt; it was not written$"):
            run(config(run_dir, *SIX_BATCHES), quiet=True)
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba1-rank0.pt", "ep0-ba2-rank0.pt", "latest-rank0.pt"]
    assert (folder / "latest-rank0.pt").resolve().name == "ep0-ba2-rank0.pt"
    resumed = run(config(run_dir, *SIX_BATCHES, "run.resume=true"), quiet=True)
    assert resumed["batches"] == 6 and resumed["history"] == straight["history"]


@pytest.mark.slow
def test_resume_after_a_kill_starts_from_the_newest_whole_checkpoint(tmp_path, monkeypatch, capsys):
    """What a kill can leave (a temporary file being written, a truncated checkpoint under its final name from before
    atomic saves, no latest link: killed between Composer's unlink and symlink) is tidied in one line each, and the
    run continues from the newest whole checkpoint to the uninterrupted result."""
    straight = run(config(tmp_path / "straight", *SIX_BATCHES), quiet=True)
    run_dir = tmp_path / "killed"
    with monkeypatch.context() as patched:
        interrupt_at(4, patched)
        with pytest.raises(KeyboardInterrupt):
            run(config(run_dir, *SIX_BATCHES), quiet=True)
    folder = run_dir / "checkpoints"
    (folder / ".partial-999-ep0-ba5-rank0.pt").write_bytes(b"PK\x03\x04")
    whole = (folder / "ep0-ba4-rank0.pt").read_bytes()
    (folder / "ep0-ba4-rank0.pt").write_bytes(whole[: len(whole) // 2])
    (folder / "latest-rank0.pt").unlink()
    capsys.readouterr()
    resumed = run(config(run_dir, *SIX_BATCHES, "run.resume=true"), quiet=True)
    err = capsys.readouterr().err
    assert "run.resume=true: removed .partial-999-ep0-ba5-rank0.pt, a checkpoint whose writing was interrupted" in err
    assert ("run.resume=true: moved the truncated checkpoint ep0-ba4-rank0.pt aside to "
            ".incomplete-ep0-ba4-rank0.pt") in err
    assert "run.resume=true: latest-rank0.pt now points to ep0-ba3-rank0.pt, the newest whole checkpoint" in err
    assert resumed["batches"] == 6 and resumed["history"] == straight["history"]
    assert (folder / ".incomplete-ep0-ba4-rank0.pt").read_bytes() == whole[: len(whole) // 2]  # kept, not deleted


@pytest.mark.slow
def test_a_second_run_into_a_locked_run_directory_is_refused_in_one_line(tmp_path):
    """Another process holds run.dir (a real second process): run.overwrite=true is refused naming it, and nothing
    changes; once the holder is gone (killed: the kernel drops its lock), the run goes ahead and no lock file stays."""
    run_dir = tmp_path / "shared"
    run(config(run_dir), quiet=True)
    before = snapshot(run_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from algos.run.rundir import run_lock\n"
                               f"with run_lock(Path({str(run_dir)!r})):\n"
                               "    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(ConfigError, match=rf"^run.dir '{run_dir}' is in use by another algos run \(pid "
                                              rf"{holder.pid} on .*, since .*\); wait for it to finish or pick another "
                                              r"run.name / run.dir$"):
            run(config(run_dir, "run.overwrite=true"), quiet=True)
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    run(config(run_dir, "run.overwrite=true"), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """A bug at batch 1 (checkpoints every 2ba) keeps its traceback, says nothing is kept without the resume hint,
    and puts back the run it was to replace; a check Composer makes only once training starts is one line."""
    run_dir = tmp_path / "keep"
    run(config(run_dir), quiet=True)
    before = snapshot(run_dir)
    batch_start = RunStats.batch_start

    def bug(self, state, logger):
        if int(state.timestamp.batch) == 1:
            raise RuntimeError("a bug in a callback")
        batch_start(self, state, logger)

    with monkeypatch.context() as patched:
        patched.setattr(RunStats, "batch_start", bug)
        capsys.readouterr()
        with pytest.raises(RuntimeError, match="^a bug in a callback$"):
            run(config(run_dir, "run.overwrite=true"))
    err = capsys.readouterr().err
    assert "stopped at batch 1, before its first checkpoint: nothing to resume, the run it was to replace is " \
           "back" in err
    assert "run.resume" not in err and wandb.run is None
    assert snapshot(run_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep"]

    monkeypatch.setattr(run_build, "_check_duration", lambda trainer: None)  # as if the runner did not check it
    with pytest.raises(ConfigError, match=r"^trainer: The max_duration \(0ba\) is less than or equal to the elapsed "
                                          r"training duration \(0ba\).* \(found at batch 0, before a checkpoint: its "
                                          r"run directory is removed\)$") as error:
        run(config(tmp_path / "new", "trainer.max_duration=0ba"), quiet=True)
    assert "\n" not in str(error.value) and sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", ".."])
def test_run_names_stay_inside_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = [str(ROOT / "yamls/digits_mlp.yaml")]
    with pytest.raises(ConfigError, match=rf"^run.name={name!r}: a run name is a folder inside runs/, without '/' or "
                                          r"'..'; to write the run elsewhere set run.dir$"):
        run(load_config(files, [*SMALL, f"run.name={name}"]), quiet=True)
    assert not any(tmp_path.iterdir()) and not (tmp_path.parent / "escaped").exists()
    inside = run(load_config(files, [*SMALL, "run.name=a.b+c"]), quiet=True)
    assert Path(inside["run_dir"]) == Path("runs/a.b+c") and (tmp_path / "runs/a.b+c/summary.json").is_file()
    assert len(list((tmp_path / "runs/a.b+c").glob("wandb/offline-run-*"))) == 1  # wandb's files too


def test_a_truncated_checkpoint_to_load_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "half.pt").write_bytes(b"PK\x03\x04 half of a checkpoint")
    with pytest.raises(ConfigError, match=rf"^trainer.load_path='{tmp_path / 'half.pt'}' is truncated or not a "
                                          r"checkpoint \(no complete torch file\)$"):
        run(config(tmp_path / "new", f"trainer.load_path={tmp_path / 'half.pt'}"), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.pt"]


def test_a_plain_composer_trainer_saves_whole_checkpoints_too(tmp_path, monkeypatch):
    """``import algos`` makes every Composer checkpoint atomic, not only those of ``algos run``: a save that fails
    midway leaves neither the file nor its temporary copy, and the previous checkpoint stays latest."""
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,))), batch_size=8)
    model = ComposerClassifier(torch.nn.Linear(8, 2), num_classes=2)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "ba2" in getattr(f, "name", ""):
            f.write(b"PK\x03\x04")
            raise OSError("No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    trainer = Trainer(model=model, train_dataloader=data, max_duration="3ba", save_folder=str(tmp_path),
                      save_interval="1ba", optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu",
                      progress_bar=False)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.fit()
    trainer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba1-rank0.pt", "latest-rank0.pt"]
    assert (tmp_path / "latest-rank0.pt").resolve().name == "ep0-ba1-rank0.pt"


def test_export_turns_a_run_into_a_safe_directory_that_loads_without_unpickling(tmp_path, capsys):
    from algos.cli import main
    from algos.run.build import build

    run_dir = tmp_path / "run"
    run(config(run_dir, "algorithms.fff.min_width=0", recipe="fff.yaml"), quiet=True)
    main(["export", str(run_dir), str(tmp_path / "out")])
    assert "load it with algos.from_pretrained" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["algos_surgery.json", "model.safetensors"]
    network = build(load_config([str(run_dir / "config.yaml")]), for_training=False).model.module  # before surgery
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
        algos.from_pretrained(network, tmp_path / "out")
    saved = final_weights(run_dir)
    assert all(torch.equal(value, saved[f"module.{key}"]) for key, value in network.state_dict().items())
    with pytest.raises(SystemExit, match=r"^algos export: '.*out/config.yaml' is missing; export needs "):
        main(["export", str(tmp_path / "out"), str(tmp_path / "again")])
    with pytest.raises(SystemExit, match=r"^algos export: save_pretrained: '.*out' is not empty; pass "
                                         r"overwrite=True"):
        main(["export", str(run_dir / "checkpoints" / "latest-rank0.pt"), str(tmp_path / "out")])
    main(["export", str(run_dir / "checkpoints" / "latest-rank0.pt"), str(tmp_path / "out"), "--overwrite"])


def test_a_text_run_keeps_the_tokenizer_it_trained_on_in_its_checkpoint_and_export(tmp_path):
    """The WordPiece tokenizer text_mlm trains is not reproducible (huggingface/tokenizers#1794): the run's own goes
    into its checkpoints and `algos export` writes it beside the weights: the exported model reads text as trained."""
    from transformers import AutoTokenizer

    from algos.run.data.text import python_docs_corpus, word_piece_tokenizer
    from algos.run.export import export

    run_dir = tmp_path / "mlm"
    tiny = ("{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64, "
            "max_position_embeddings: 32, vocab_size: 600}")
    run(load_config([str(ROOT / "yamls/bert_base_mlm.yaml")], [
        f"model.config={tiny}", "data.seq_len=32", "data.batch_size=4", "data.max_documents=40", "callbacks={}",
        "loggers={}", "trainer.max_duration=1ba", "trainer.eval_interval=1ba", "trainer.save_interval=1ba",
        "trainer.eval_subset_num_batches=1", "trainer.progress_bar=false", "trainer.precision=fp32",
        f"run.dir={run_dir}"]), quiet=True)
    trained_on = word_piece_tokenizer(python_docs_corpus()[:40], 600)  # this process's, the one the run used
    saved = torch.load(run_dir / "checkpoints" / "latest-rank0.pt", weights_only=False)
    assert saved["state"]["integrations"]["huggingface"]["tokenizer"]  # Composer kept the tokenizer's files
    export(str(run_dir), str(tmp_path / "out"))
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert loaded.get_vocab() == trained_on.get_vocab() and len(loaded) == 600
    text = "The with statement wraps a block in a context manager."
    assert loaded(text)["input_ids"] == trained_on(text)["input_ids"]

"""SelfDistillation in a 2-process DDP run through Composer's launcher (gloo on CPU): the teacher stays outside the
DDP-wrapped model, is the model before FNet's surgery, and is checkpointed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_ddp_run_distills_from_the_model_before_surgery(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port()),
               "-m", "algos.run", str(ROOT / "yamls/bert_base_mlm.yaml"), str(ROOT / "recipes/fnet_hybrid.yaml"),
               str(ROOT / "recipes/self_distill.yaml"),
               "model.config={num_hidden_layers: 4, hidden_size: 64, num_attention_heads: 2, intermediate_size: 256}",
               "data={name: synthetic, batch_size: 2, num_samples: 8, seq_len: 32}", "trainer.max_duration=3ba",
               "trainer.eval_interval=3ba", "trainer.eval_subset_num_batches=1", "trainer.progress_bar=false",
               "trainer.precision=fp32", "trainer.save_interval=3ba", f"run.dir={run_dir}", "loggers={}"]
    env = {**os.environ, "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batches"] == 3
    saved = torch.load(run_dir / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    entries = dict(saved["state"]["algorithms"])
    teacher = entries["SelfDistillation"]["algos_distill_teacher"]["teacher"]["weights"]
    query = "model.bert.encoder.layer.0.attention.self.query.weight"  # attention, which FNet replaced in the student
    assert query in teacher and not any(key.endswith(query) for key in saved["state"]["model"])

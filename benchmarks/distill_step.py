"""Milliseconds per ``algos.distill`` step on all-MiniLM-L6-v2 (Factorize 25% student, batch 16 of documentation
sentences), for the code in CHECKOUT: a before / after check of a refactor (issue 25), e.g.

    git worktree add /tmp/before 3d035be
    for i in 1 2 3; do for v in /tmp/before .; do .venv/bin/python benchmarks/distill_step.py $v 20; done; done
"""

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(sys.argv[1]).resolve()))  # the checkout whose algos is timed

import algos  # noqa: E402
from algos.run.data import DATA  # noqa: E402
from algos.run.models import MODELS  # noqa: E402

torch.set_num_threads(2)
steps = int(sys.argv[2])
encoder = MODELS.build("sentence_encoder", {"pretrained": "all-MiniLM-L6-v2"}, "model")
train, _ = DATA.build("sentences", {"batch_size": 16}, "data", spec=encoder.input_spec)
batches = [{k: v for k, v in batch.items() if k != "labels"} for _, batch in zip(range(8), train, strict=False)]
net, teacher = encoder.model, copy.deepcopy(encoder.model)
algos.apply_factorization(net, rank=0.25)
algos.distill(net, teacher, batches, steps=3)  # warm-up
start = time.perf_counter()
algos.distill(net, teacher, batches, steps=steps)
print(f"{sys.argv[1]}: {(time.perf_counter() - start) / steps * 1000:.1f} ms per step")

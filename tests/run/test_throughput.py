"""The summary's training throughput (``RunStats``) on a hand-driven clock: only the batches after every surgery
count, the first of them left out as warm-up, samples and tokens over all processes (Composer's timestamp), seconds
inside the batches only (what happens between batches, such as checkpoints, is left out)."""

from datetime import timedelta
from types import SimpleNamespace

import algos
from algos.run import stats as stats_module
from algos.run.stats import RunStats


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_counts_the_final_architecture_after_one_warm_up_batch(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(stats_module.time, "perf_counter", clock)
    surgery = algos.Factorize(rank=0.5)
    stats = RunStats([surgery])
    state = SimpleNamespace(loss=None, timestamp=SimpleNamespace(batch=0, sample=0, token=0,
                                                                 total_wct=timedelta(0)))
    # batch, surgery done before it, seconds inside it, seconds after it (checkpoint, eval), samples / tokens
    # over both processes of a 2-process run
    batches = [(1, False, 4.0, 0.0, 128, 4096), (2, True, 9.0, 0.0, 128, 4096), (3, True, 0.5, 30.0, 128, 4096),
               (4, True, 1.5, 0.0, 96, 3000)]
    for batch, done, inside, after, samples, tokens in batches:
        surgery._done = done
        stats.batch_start(state, None)
        clock.now += inside
        state.timestamp.batch = batch
        state.timestamp.sample += samples
        state.timestamp.token += tokens
        state.loss = 1.0 / batch
        stats.batch_end(state, None)
        clock.now += after
    assert stats.samples == 128 + 96 and stats.tokens == 4096 + 3000
    assert stats.batch_seconds == 2.0  # batches 3 and 4: not the surgery's batch 2 nor the 30 s after batch 3
    assert stats.samples / stats.batch_seconds == 112.0  # the summary's samples_per_s
    assert [loss for _, loss in stats.losses] == [1.0, 0.5, 1 / 3, 0.25]  # every batch's loss is kept

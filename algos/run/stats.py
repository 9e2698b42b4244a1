"""``RunStats``: the Composer callback behind a run summary's throughput, loss and eval history; saved in every
checkpoint, so a resumed run's summary covers the whole run."""

from __future__ import annotations

import time

from composer.core import Callback, State
from composer.loggers import Logger

from algos.surgery import SurgeryAlgorithm


class RunStats(Callback):
    """Training throughput of the final architecture (batches after every surgery in ``algorithms`` has happened,
    the first of them left out as warm-up), the train loss per batch, and the eval metrics after every
    evaluation, for the summary and the ``compare`` plot."""

    def __init__(self, algorithms=()):
        self.surgeries = [a for a in algorithms if isinstance(a, SurgeryAlgorithm)]
        self.warm = False
        self.counting = False
        self.batch_seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, dict[str, float]]] = []
        # training wall-clock seconds (Composer's total_wct: evaluation excluded) at each loss and each eval
        self.loss_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self._started = 0.0
        self._counts = (0, 0)
        self._restored_reports: list[list[tuple[str, dict]]] = [[] for _ in self.surgeries]

    def batch_start(self, state: State, logger: Logger) -> None:
        final = all(a.applied for a in self.surgeries)
        self.counting, self.warm = final and self.warm, final
        self._started = time.perf_counter()
        self._counts = (int(state.timestamp.sample), int(state.timestamp.token))

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        loss = state.loss
        if isinstance(loss, dict):
            loss = loss.get("total", sum(loss.values()))
        elif isinstance(loss, (tuple, list)):
            loss = sum(loss)
        if loss is not None:
            self.losses.append((batch, float(loss)))
            self.loss_seconds.append(state.timestamp.total_wct.total_seconds())
        if self.counting:
            self.batch_seconds += time.perf_counter() - self._started
            self.samples += int(state.timestamp.sample) - self._counts[0]
            self.tokens += int(state.timestamp.token) - self._counts[1]

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = {name: float(metric.compute()) for name, metric in state.eval_metrics.get("eval", {}).items()}
        self.evals.append((int(state.timestamp.batch), metrics))
        self.eval_seconds.append(state.timestamp.total_wct.total_seconds())

    def reports(self) -> list[list[tuple[str, dict]]]:
        """Each surgery algorithm's reports as (table, dict): this process's, or else those restored from the
        checkpoint (a surgery made before the run was interrupted and resumed)."""
        return [[(str(r), r.to_dict()) for r in algorithm.reports] or self._restored_reports[index]
                for index, algorithm in enumerate(self.surgeries)]

    # In every checkpoint, so that the summary of a resumed run covers the whole run.
    _SAVED = ("batch_seconds", "samples", "tokens", "losses", "evals", "loss_seconds", "eval_seconds")

    def state_dict(self) -> dict:
        return {**{key: getattr(self, key) for key in self._SAVED}, "reports": self.reports()}

    def load_state_dict(self, state: dict) -> None:
        for key in self._SAVED:
            setattr(self, key, state.get(key, getattr(self, key)))
        if len(state.get("reports", ())) == len(self.surgeries):
            self._restored_reports = state["reports"]

"""Watching the training data's validation from the workers.

The driver counts the rows, starts one validation task per file and launches training without
waiting for them (`raykit.data.groups.stream_groups`). Between steps, rank 0 asks Ray which of
those tasks have finished; one small all-reduce tells every rank the outcome in the same step, so
that on a bad row all of them stop together (no rank left waiting in a collective), and once the
last task is in no rank asks again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ray

from raykit.data.groups import INVALID_HINT, DataReport, invalid_rows_message, merge_reports
from raykit.errors import DataError

STOPPED = "training data has invalid rows (see the driver's error)"


class ValidationWatch:
    """The outcome of validation tasks still running when training started."""

    def __init__(
        self,
        pending: Sequence[ray.ObjectRef],
        rank: int,
        all_reduce_sum: Callable[[list[float]], list[float]],
    ):
        self.pending = list(pending)
        self.running = bool(self.pending)  # the same on every rank: all call the all-reduce
        self.rank, self.all_reduce_sum = rank, all_reduce_sum
        self.report = DataReport()
        self.error: str | None = None

    def check(self) -> str | None:
        """None while the data is clean so far; the error (rank 0's text) once it is not."""
        if not self.running:
            return self.error
        failed, done = self.all_reduce_sum(list(self._poll()) if self.rank == 0 else [0.0, 0.0])
        if failed:
            self.error = self.error or STOPPED
        self.running = not (failed or done)
        return self.error

    def _poll(self) -> tuple[float, float]:
        finished, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        try:
            merge_reports(self.report, ray.get(finished))
        except DataError as exc:
            self.error = str(exc)
        self.error = self.error or invalid_rows_message(self.report, INVALID_HINT)
        return float(self.error is not None), float(not self.pending)

"""One token-budgeted queue of (query, document) pairs per model replica.

Modelled on text-embeddings-inference's `core/src/queue.rs`: requests wait in arrival order;
the next batch takes pairs from the oldest request first, then the next, until `max_batch_size`
pairs or `max_batch_tokens` tokens (the first pair always goes), so a large request is split
across batches and small ones that arrived meanwhile share its forward passes. While the model
runs one batch, the next one forms from whatever arrived. A request whose caller went away
(client disconnect, cancelled task) is dropped with every pair not yet in a batch; a failing
forward pass fails exactly the requests that had pairs in it.

Plain asyncio with no Ray import: the Serve replica owns one, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from raykit.core.tokenize import Encoding


@dataclass
class _Request:
    encodings: Sequence[Encoding]
    future: asyncio.Future
    scores: np.ndarray = field(init=False)
    dispatched: int = 0  # pairs already handed to a batch
    remaining: int = field(init=False)  # pairs not scored yet

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.encodings), dtype=np.float32)
        self.remaining = len(self.encodings)

    @property
    def gone(self) -> bool:
        """Cancelled by its caller, or already failed: none of its pairs need scoring."""
        return self.future.done()


@dataclass
class QueueStats:
    batches: int = 0
    pairs_scored: int = 0
    pairs_dropped: int = 0  # pairs of cancelled requests that were never scored
    forward_s: float = 0.0


class BatchQueue:
    """Queue pairs of many requests and score them in token-budgeted batches, oldest first.

    `forward(encodings)` scores one batch (run in `executor`, off the event loop) and returns
    one float per pair, in order. When the model was idle, the first batch waits up to
    `max_wait_s` for more pairs to arrive; under load batches form while the model runs.
    """

    def __init__(
        self,
        forward: Callable[[list[Encoding]], Sequence[float]],
        max_batch_size: int,
        max_batch_tokens: int,
        executor: Executor | None = None,
        max_wait_s: float = 0.0,
    ):
        self.forward = forward
        self.max_wait_s = max_wait_s
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.executor = executor
        self.waiting: deque[_Request] = deque()
        self.stats = QueueStats()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def score(self, encodings: Sequence[Encoding]) -> np.ndarray:
        """Scores of `encodings`, in order. Cancelling the caller drops its unscored pairs."""
        if not encodings:
            return np.zeros(0, dtype=np.float32)
        loop = asyncio.get_running_loop()
        request = _Request(encodings, loop.create_future())
        self.waiting.append(request)
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await request.future  # a cancelled caller cancels the future: `gone`

    def next_batch(self) -> tuple[list[Encoding], list[tuple[_Request, int, int]]]:
        """The next batch's pairs and, per request in it, the (request, start, end) it took."""
        for request in [r for r in self.waiting if r.gone]:
            self.stats.pairs_dropped += len(request.encodings) - request.dispatched
            self.waiting.remove(request)
        pairs: list[Encoding] = []
        spans: list[tuple[_Request, int, int]] = []
        tokens = 0
        for request in self.waiting:
            start = request.dispatched
            while request.dispatched < len(request.encodings):
                cost = len(request.encodings[request.dispatched]["input_ids"])
                full = len(pairs) >= self.max_batch_size or tokens + cost > self.max_batch_tokens
                if pairs and full:
                    break
                pairs.append(request.encodings[request.dispatched])
                tokens += cost
                request.dispatched += 1
            if request.dispatched > start:
                spans.append((request, start, request.dispatched))
            if request.dispatched < len(request.encodings):
                break  # the batch is full
        while self.waiting and self.waiting[0].dispatched == len(self.waiting[0].encodings):
            self.waiting.popleft()  # fully dispatched; its span carries it to its scores
        return pairs, spans

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            pairs, spans = self.next_batch()
            if not pairs:
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.max_wait_s > 0:
                    await asyncio.sleep(self.max_wait_s)
                continue
            started = loop.time()
            try:
                scores = await loop.run_in_executor(self.executor, self.forward, pairs)
            except Exception as exc:  # every request in this batch fails; none hangs
                for request, _, _ in spans:
                    if not request.gone:
                        request.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.pairs_scored += len(pairs)
            self.stats.forward_s += loop.time() - started
            offset = 0
            for request, start, end in spans:
                request.scores[start:end] = scores[offset : offset + end - start]
                offset += end - start
                request.remaining -= end - start
                if request.remaining == 0 and not request.gone:
                    request.future.set_result(request.scores)

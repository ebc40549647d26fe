"""The replicas' token-budgeted batch queue (no Serve, no Ray)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from raykit.serving.queue import BatchQueue


def encodings(*lengths: int, value: int = 1) -> list[dict[str, list[int]]]:
    return [{"input_ids": [value] * n} for n in lengths]


def test_queue_fills_batches_oldest_first_within_both_caps():
    batches: list[list[int]] = []

    def forward(pairs):
        batches.append([len(p["input_ids"]) for p in pairs])
        return [float(p["input_ids"][0]) for p in pairs]

    async def scenario():
        queue = BatchQueue(forward, max_batch_size=3, max_batch_tokens=100)
        first = queue.score(encodings(10, 10, 10, 10, value=1))  # split over two batches
        second = queue.score(encodings(60, value=2))
        third = queue.score(encodings(200, value=3))  # over the token cap alone: still goes
        return await asyncio.gather(first, second, third)

    first, second, third = asyncio.run(scenario())
    assert first.tolist() == [1.0] * 4 and second.tolist() == [2.0] and third.tolist() == [3.0]
    assert batches == [[10, 10, 10], [10, 60], [200]]


def test_queue_drops_the_rest_of_a_cancelled_request_and_fails_only_its_batch():
    release, in_model = threading.Event(), threading.Event()
    seen: list[int] = []

    def forward(pairs):
        seen.append(pairs[0]["input_ids"][0])
        in_model.set()
        release.wait(5)
        if pairs[0]["input_ids"][0] == 9:
            raise ValueError("bad batch")
        return [float(len(p["input_ids"])) for p in pairs]

    async def scenario():
        queue = BatchQueue(forward, max_batch_size=2, max_batch_tokens=10)
        big = asyncio.ensure_future(queue.score(encodings(*[5] * 10, value=1)))
        # Wait (off the event loop) until its first batch is in the model.
        assert await asyncio.get_running_loop().run_in_executor(None, in_model.wait, 5)
        big.cancel()
        small = asyncio.ensure_future(queue.score(encodings(3, value=2)))
        failing = asyncio.ensure_future(queue.score(encodings(8, value=9)))  # 3 + 8 > 10
        while len(queue.waiting) < 3:  # both are queued behind the cancelled request
            await asyncio.sleep(0)
        release.set()
        result = await small
        with pytest.raises(ValueError, match="bad batch"):
            await failing
        assert big.cancelled()
        return queue, result

    queue, result = asyncio.run(scenario())
    assert result.tolist() == [3.0]
    # One batch of the cancelled request ran; its other 8 pairs were never scored.
    assert queue.stats.pairs_dropped == 8 and seen == [1, 2, 9]
    assert not queue.waiting

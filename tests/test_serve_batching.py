"""The serving stages' dynamic batching (``pipelines.serve.batching.Batcher``), on a real event loop with
a model stand-in that takes real time in a thread."""
from __future__ import annotations

import asyncio
import time

import pytest

from pipelines.serve.batching import Batcher, best_batch_size


def _slow(seconds: float, calls: list):
    def run(items):
        calls.append(list(items))
        time.sleep(seconds)
        return [x * 10 for x in items]
    return run


def test_under_load_a_batch_takes_what_queued_while_the_previous_one_ran():
    """32 callers at once, a 50 ms stage: after the first batch every batch is full. (Serve's own
    @serve.batch formed a batch per timeout window while the previous one ran: 1-2 requests each.)"""
    calls: list = []

    async def main():
        b = Batcher(_slow(0.05, calls), max_batch_size=8, batch_wait_timeout_s=0.0)

        async def caller(i):
            await asyncio.sleep(0.001 * i)  # arriving one after another, as over HTTP
            return await b(i)

        return await asyncio.gather(*(caller(i) for i in range(32))), list(b.sizes)

    results, sizes = asyncio.run(main())
    assert results == [i * 10 for i in range(32)]  # each caller gets its own result
    assert sizes[0] == 1 and all(s == 8 for s in sizes[1:-1]), sizes
    assert sum(sizes) == 32


def test_a_lone_request_waits_only_the_timeout_and_a_burst_joins_within_it():
    calls: list = []

    async def main():
        b = Batcher(_slow(0.0, calls), max_batch_size=4, batch_wait_timeout_s=0.2)
        t0 = time.perf_counter()
        assert await b(1) == 10
        lone = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert await asyncio.gather(*(b(i) for i in range(4))) == [0, 10, 20, 30]
        full = time.perf_counter() - t0
        return lone, full

    lone, full = asyncio.run(main())
    assert 0.18 < lone < 1.0
    assert full < 0.15  # a full batch does not wait out the timeout
    assert calls == [[1], [0, 1, 2, 3]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_runs():
    def run(items):
        time.sleep(0.02)
        if "bad" in items:
            raise ValueError("bad item in batch")
        return items

    async def main():
        b = Batcher(run, max_batch_size=2, batch_wait_timeout_s=0.05)
        first = await asyncio.gather(b("ok"), b("bad"), return_exceptions=True)
        return first, await b("fine")

    first, after = asyncio.run(main())
    assert all(isinstance(e, ValueError) and "bad item" in str(e) for e in first)
    assert after == "fine"


def test_a_cancelled_caller_is_left_out_and_finish_runs_while_the_next_batch_runs():
    calls: list = []
    events: list = []

    def run(items):
        events.append(("run", items, time.perf_counter()))
        calls.append(list(items))
        time.sleep(0.05)
        return [x * 10 for x in items]

    async def finish(items, results):
        await asyncio.sleep(0.2)  # e.g. the NMS stage's answer
        events.append(("finished", items, time.perf_counter()))
        return [r + 1 for r in results]

    async def main():
        b = Batcher(run, max_batch_size=8, batch_wait_timeout_s=0.0, finish=finish)
        first = asyncio.ensure_future(b(1))
        await asyncio.sleep(0.01)  # batch [1] runs
        gone = asyncio.ensure_future(b(2))
        kept = asyncio.ensure_future(b(3))
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(first, kept)

    assert asyncio.run(main()) == [11, 31]
    assert calls == [[1], [3]]
    when = {(kind, tuple(items)): t for kind, items, t in events}
    # Batch [3] started while batch [1] was still in its 200 ms finish step (serially it would start after).
    assert when[("run", (3,))] < when[("finished", (1,))], events


def test_a_cancelled_finish_step_answers_its_callers_and_a_new_event_loop_works():
    async def finish(items, results):
        raise asyncio.CancelledError()  # what awaiting a cancelled Serve call raises

    b = Batcher(lambda items: items, max_batch_size=4, batch_wait_timeout_s=0.01, finish=finish)

    async def main():
        return await asyncio.wait_for(asyncio.gather(b(1), b(2), return_exceptions=True), 5)

    errors = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "cancelled" in str(e) for e in errors), errors
    b.finish = None
    # The same Batcher on a second event loop (its first worker died with the first loop).
    assert asyncio.run(asyncio.wait_for(b(7), 5)) == 7


def test_wrong_settings_and_a_short_answer_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(lambda items: items, max_batch_size=0, batch_wait_timeout_s=0)

    async def main():
        return await Batcher(lambda items: [], max_batch_size=2, batch_wait_timeout_s=0)(1)

    with pytest.raises(RuntimeError, match="0 results for a batch of 1"):
        asyncio.run(main())


class _Stage:
    """A stage whose call on n items costs ``per_call[n]`` seconds of a virtual clock (exact on any
    machine); ``fail_at`` sizes raise, as a batch that runs out of memory does."""

    def __init__(self, per_call: dict[int, float], fail_at: tuple = ()):
        self.per_call, self.fail_at, self.now, self.calls = per_call, fail_at, 0.0, []

    def clock(self) -> float:
        return self.now

    def run(self, items):
        self.calls.append(len(items))
        if len(items) in self.fail_at:
            raise RuntimeError("out of memory")
        self.now += self.per_call[len(items)]
        return items


def _calibrate(stage: _Stage, max_batch_size: int, **kw):
    return best_batch_size(stage.run, lambda n: list(range(n)), max_batch_size, clock=stage.clock, **kw)


def test_calibration_keeps_the_batch_where_images_per_second_peak():
    """A CPU-like stage (fastest per item at 2, slower beyond: 67, 80, 58 items/s) is capped at 2 and not
    tried past the peak; a GPU-like one (a fixed cost per call) keeps its maximum."""
    cpu = _Stage({1: 0.015, 2: 0.025, 4: 0.069, 8: 0.2})
    cap, rates = _calibrate(cpu, 8, reps=3)
    assert cap == 2 and sorted(rates) == [1, 2, 4], rates
    # A warm-up and a timed call per size, then two rounds over the sizes tried, in turn.
    assert cpu.calls == [1, 1, 2, 2, 4, 4] + [1, 2, 4] * 2, cpu.calls
    assert rates[2] > rates[1] > rates[4]
    cap, rates = _calibrate(_Stage({1: 0.02, 2: 0.021, 4: 0.023, 6: 0.025}), 6)
    assert cap == 6 and sorted(rates) == [1, 2, 4, 6], rates


def test_calibration_stays_within_its_time_budget_and_a_tolerance_prefers_smaller_batches():
    slow = _Stage({1: 0.1, 2: 0.2, 4: 0.4})
    cap, rates = _calibrate(slow, 4, budget_s=0.45)
    # After the warm-up, size 1 took 0.1 s; size 2 would take 0.4 s more, ending after 0.45 s: not started;
    # the three more rounds (reps 4) over size 1 fit.
    assert slow.calls == [1] * 5 and cap == 1 and list(rates) == [1]
    # 67 and 80 items/s at sizes 1 and 2: within 20% of the best, the smaller size wins.
    cap, _ = _calibrate(_Stage({1: 0.015, 2: 0.025, 4: 0.069}), 4, tolerance=0.2)
    assert cap == 1
    with pytest.raises(ValueError, match="max_batch_size"):
        best_batch_size(lambda items: items, lambda n: [0] * n, 0)
    with pytest.raises(ValueError, match="tolerance"):
        _calibrate(_Stage({1: 0.1}), 1, tolerance=1.0)


def test_a_batch_that_fails_ends_the_calibration_and_a_model_that_cannot_run_one_item_raises():
    oom = _Stage({1: 0.02, 2: 0.03, 4: 0.05}, fail_at=(8,))
    cap, rates = _calibrate(oom, 8)
    assert cap == 4 and sorted(rates) == [1, 2, 4] and oom.calls.count(8) == 1
    with pytest.raises(RuntimeError, match="out of memory"):
        _calibrate(_Stage({}, fail_at=(1,)), 8)

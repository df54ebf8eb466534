"""Dynamic batching for the model and NMS deployments: the next batch is formed when the stage is free.

Serve's ``@serve.batch`` (Ray 2.60) forms a batch as soon as its wait timeout has passed, also while the
previous batch still runs, and queues the formed batch behind it. Under load a batch then holds what
arrived in one timeout window: at 30 requests/s and 10 ms, one or two requests, however many waited. The
stage runs batches of 1-2 and falls behind (measured in ``benchmarks/serve_load.py``: mean batch 1.8 of
8 at concurrency 32, with 30 requests inside the replica).

:class:`Batcher` takes everything that queued while the previous batch ran (up to ``max_batch_size``).
The wait timeout applies only when the stage was idle: the first requests of a burst wait up to
``batch_wait_timeout_s`` for each other, and a lone request waits no longer than that. An optional async
``finish`` step (the detector's call to the NMS stage) runs per batch while the next batch already runs.
"""
from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from typing import Any, Awaitable, Callable, Sequence


def best_batch_size(run: Callable[[list], Any], make_items: Callable[[int], list], max_batch_size: int, *,
                    reps: int = 4, budget_s: float = 5.0, tolerance: float = 0.0,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[int, dict[int, float]]:
    """The batch size to cap a stage at on this machine, and the items/s measured at each size tried.

    Times ``run(make_items(b))`` for b = 1, 2, 4, ... and ``max_batch_size`` and returns the size with the
    best rate (with ``tolerance``, the smallest size within that fraction of it). On a GPU the rate grows with the batch; on a CPU it can fall
    (SSDlite at 320 px, one thread: 38-40 images/s at batch 2-4, 30-33 at 8, 20 at 16 in one run), and a stage that fills every
    batch to the maximum then runs slower than it could. Only the model's call is timed, not what a real
    batch also pays per call (the detector's call to the NMS stage), which favours small sizes slightly.
    A size whose warm-up call raises (out of memory) ends the sweep; at size 1 the error propagates.
    A first pass calls each size twice (a warm-up,
    then timed), stops past the peak (a size below 0.8 of the best rate so far) and does not start a size
    whose calls, extrapolated from the last one, would end after ``budget_s`` (counted from the end of the
    first warm-up, which may load lazily). Then up to ``reps - 1`` more
    rounds over the sizes tried, in turn (a slow moment of a shared machine then hits every size, not one),
    while the budget lasts; each size keeps its fastest call.
    """
    if max_batch_size < 1:
        raise ValueError(f"best_batch_size: max_batch_size must be >= 1, got {max_batch_size}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"best_batch_size: tolerance must be in [0, 1), got {tolerance}")
    sizes = sorted({b for b in (2 ** k for k in range(max_batch_size.bit_length())) if b < max_batch_size}
                   | {max_batch_size})
    best: dict[int, float] = {}  # fastest call per size, seconds
    items: dict[int, list] = {}
    start = None

    def timed(b: int) -> None:
        t = clock()
        run(items[b])
        best[b] = min(best.get(b, float("inf")), max(clock() - t, 1e-9))

    for b in sizes:
        if best and clock() - start + 2 * best[max(best)] * b / max(best) > budget_s:
            break
        items[b] = make_items(b)
        try:
            run(items[b])  # warm-up at this size (first-call allocations, kernels chosen per shape)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: larger batches would fail too
            if not best:
                raise  # the model cannot run one item: the replica must not start
            print(f"best_batch_size: a batch of {b} failed ({type(e).__name__}: {e}); sizes up to "
                  f"{max(best)} kept", flush=True)
            break
        start = clock() if start is None else start
        timed(b)
        if b / best[b] < 0.8 * max(k / v for k, v in best.items()):
            break
    for _ in range(max(0, reps - 1)):
        if clock() - start + sum(best.values()) > budget_s:
            break
        for b in list(best):
            timed(b)
    rates = {b: b / t for b, t in best.items()}
    top = max(rates.values())
    return min(b for b, r in rates.items() if r >= (1 - tolerance) * top), rates


class Batcher:
    """``await batcher(item)`` -> ``run([item, ...])[i]``, ``run`` called in a thread on batches.

    ``run`` takes a list of items and returns one result per item, in order; an exception it raises goes
    to every caller of that batch. ``finish(items, results)``, when given, is awaited on the event loop
    with a batch's items and results and returns the final results (or raises, for every caller of the
    batch); the next batch does not wait for it. A caller that went away (cancelled) before its batch
    formed is left out of it. ``sizes`` holds the sizes of the last ``keep`` batches run.
    """

    def __init__(self, run: Callable[[list], Sequence[Any]], max_batch_size: int, batch_wait_timeout_s: float,
                 keep: int = 1000, finish: Callable[[list, list], Awaitable[Sequence[Any]]] | None = None):
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError(f"Batcher: max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got "
                             f"{max_batch_size} and {batch_wait_timeout_s}")
        self.run, self.max_batch_size, self.batch_wait_timeout_s = run, int(max_batch_size), float(batch_wait_timeout_s)
        self.finish = finish
        self._finishing: set[asyncio.Task] = set()
        self.sizes: deque[int] = deque(maxlen=keep)
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()  # bound to this loop when first awaited
            # A context of its own: not the Serve request context of the caller that happened to start it.
            self._worker = loop.create_task(self._serve(), context=contextvars.Context())
            self._worker.add_done_callback(self._worker_ended)
        future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    def _worker_ended(self, task: asyncio.Task) -> None:
        """The worker stopped (cancelled, or a bug): its waiting callers get the error instead of no answer."""
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        error = RuntimeError(f"Batcher: the batching task stopped ({reason})")
        while self._queue:
            self._deliver([self._queue.popleft()], error=error)

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        backlog = False  # requests queued while the last batch ran: they form the next one at once
        while True:
            if not self._queue:
                await self._wait_for_arrival(None)
            if not backlog:
                # Idle until now: give a burst's first requests the wait timeout to join each other.
                deadline = loop.time() + self.batch_wait_timeout_s
                while len(self._queue) < self.max_batch_size and loop.time() < deadline:
                    if not await self._wait_for_arrival(deadline - loop.time()):
                        break
            batch = []
            while self._queue and len(batch) < self.max_batch_size:
                item, future = self._queue.popleft()
                if not future.done():  # its caller was cancelled meanwhile
                    batch.append((item, future))
            if not batch:
                backlog = False
                continue
            self.sizes.append(len(batch))
            items = [item for item, _ in batch]
            try:
                results = self._checked(await asyncio.to_thread(self.run, items), batch)
            except Exception as e:  # noqa: BLE001 -- goes to every caller of the batch
                self._deliver(batch, error=e)
                continue
            except BaseException:  # cancelled: the batch's callers hear it before the worker stops
                self._deliver(batch, error=RuntimeError("Batcher: stopped while running a batch"))
                raise
            finally:
                backlog = bool(self._queue)
            if self.finish is None:
                self._deliver(batch, results)
            else:
                task = loop.create_task(self._finish(batch, items, results), context=contextvars.Context())
                self._finishing.add(task)  # held until done (the loop keeps only weak references)
                task.add_done_callback(self._finishing.discard)

    async def _finish(self, batch: list, items: list, results: Sequence[Any]) -> None:
        try:
            self._deliver(batch, self._checked(await self.finish(items, list(results)), batch))
        except Exception as e:  # noqa: BLE001 -- goes to every caller of the batch
            self._deliver(batch, error=e)
        except BaseException:  # cancelled (e.g. a call it awaited was): never leave the callers waiting
            self._deliver(batch, error=RuntimeError("Batcher: the batch's finishing step was cancelled"))
            raise

    @staticmethod
    def _checked(results: Sequence[Any], batch: list) -> Sequence[Any]:
        if len(results) != len(batch):
            raise RuntimeError(f"Batcher: {len(results)} results for a batch of {len(batch)}")
        return results

    @staticmethod
    def _deliver(batch: list, results: Sequence[Any] | None = None, error: BaseException | None = None) -> None:
        for k, (_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(results[k])

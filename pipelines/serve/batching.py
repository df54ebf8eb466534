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
from collections import deque
from typing import Any, Awaitable, Callable, Sequence


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

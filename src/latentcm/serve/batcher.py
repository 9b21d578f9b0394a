"""Micro-batching: concurrent requests with equal batch keys run as one call, in one worker thread.

A request is submitted with a key and a size (its number of images). The worker takes the oldest waiting
request, then keeps collecting waiting requests with the same key -- anywhere in the queue -- until the batch
holds ``max_batch`` images or ``window_s`` has passed since it began, and runs them as one batch. The queue
is bounded: a submit beyond ``max_queue`` waiting requests raises ``Busy`` (HTTP 429) instead of growing it.
Every submitted request ends in exactly one result or one exception on its future: nothing is dropped.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

RunBatch = Callable[[Hashable, list[Any]], list[Any]]  # (key, items) -> one result per item, in order


class Busy(RuntimeError):
    """The queue is full: retry later (HTTP 429)."""


class Stopped(RuntimeError):
    """The batcher stopped before the request ran (HTTP 503)."""


@dataclass
class Ticket:
    key: Hashable
    item: Any
    size: int
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    batch_size: int | None = None  # images in the batch it ran in


class Batcher:
    """A bounded queue and one worker thread that runs compatible tickets together.

    Args:
        run_batch: called in the worker with (key, [item, ...]); returns one result per item. An exception
            fails every ticket of that batch (each future gets it); the worker carries on.
        max_batch: the most images (sum of ticket sizes) in one batch; 1 turns batching off. A single ticket larger
            than this still runs, alone.
        window_s: how long a batch waits for more compatible tickets after its first.
        max_queue: the most tickets waiting (not yet running); one more raises ``Busy``.
    """

    def __init__(self, run_batch: RunBatch, *, max_batch: int = 16, window_s: float = 0.02, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window_s >= 0")
        self.run_batch, self.max_batch, self.window_s, self.max_queue = run_batch, max_batch, window_s, max_queue
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.stats = {"submitted": 0, "rejected_busy": 0, "completed": 0, "failed": 0, "batches": 0,
                      "batched_images": 0, "largest_batch": 0}
        self._thread = threading.Thread(target=self._work, name="latentcm-batcher", daemon=True)
        self._thread.start()

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, key: Hashable, item: Any, size: int = 1) -> Ticket:
        """Queue one ticket; ``ticket.future`` gets run_batch's result for it. Raises Busy when the queue is full."""
        ticket = Ticket(key, item, size)
        with self._cond:
            if self._stopped:
                raise Stopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                self.stats["rejected_busy"] += 1
                raise Busy(f"busy: {len(self._queue)} requests are waiting (the limit); retry shortly")
            self._queue.append(ticket)
            self.stats["submitted"] += 1
            self._cond.notify_all()
        return ticket

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the running batch, fail every waiting ticket with ``Stopped``, and end the worker."""
        with self._cond:
            self._stopped = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for ticket in waiting:
            ticket.future.set_exception(Stopped("the server is shutting down"))
        self._thread.join(timeout)

    # --- worker -------------------------------------------------------------------------------------

    def _take_compatible(self, batch: list[Ticket], size: int) -> int:
        """Move waiting tickets with the batch's key into it while they fit (under the lock); the new size."""
        for ticket in list(self._queue):
            if size >= self.max_batch:
                break
            if ticket.key == batch[0].key and size + ticket.size <= self.max_batch:
                self._queue.remove(ticket)
                batch.append(ticket)
                size += ticket.size
        return size

    def _next_batch(self) -> list[Ticket] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            batch = [self._queue.popleft()]
            size = batch[0].size
            if not self.batching:
                return batch
            deadline = time.perf_counter() + self.window_s
            while True:
                size = self._take_compatible(batch, size)
                left = deadline - time.perf_counter()
                if size >= self.max_batch or left <= 0 or self._stopped:
                    return batch
                self._cond.wait(left)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            start = time.perf_counter()
            images = sum(ticket.size for ticket in batch)
            for ticket in batch:
                ticket.started, ticket.batch_size = start, images
            try:
                results = self.run_batch(batch[0].key, [ticket.item for ticket in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} tickets")
            except BaseException as exc:  # noqa: BLE001 -- every ticket of the batch gets the error
                for ticket in batch:
                    ticket.future.set_exception(exc)
                self.stats["failed"] += len(batch)
            else:
                for ticket, result in zip(batch, results):
                    ticket.future.set_result(result)
                self.stats["completed"] += len(batch)
            self.stats["batches"] += 1
            self.stats["batched_images"] += images
            self.stats["largest_batch"] = max(self.stats["largest_batch"], images)

"""Requests on their way to the worker: limits, numbering, the queue, the end.

`Intake` admits a request on the caller's thread (the engine's checks, then
`max_batch_size + max_queue` in flight at most), numbers it (the submission
number every rank of a sharded model shares), queues it for the worker and
counts its end exactly once, whoever ends it: the scheduler, or the engine
for what is still queued when it stops (`end_unscheduled`).

Requests submitted together (`SubmissionGroup`: the inputs of one `batch`
call) enter the engine in the same step, whatever order their threads or
tasks reach `submit` in. `ChatMLX.batch`/`abatch` run each input inside
`SubmissionGroup.slot()`. An input's first submission (or its end, when it
failed before submitting) counts it as arrived; submissions are held until
`expected` inputs have arrived and then queued at once, one list per engine,
so the scheduler admits them in one step (they decode together and prefill
their common prompt start once). After that the group lets submissions
through. No timing is involved: grouping is deterministic, which also makes
it testable. `expected` must be the number of inputs that run at the same
time (the concurrency limit), or the group would wait for inputs that cannot
start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.thread import WorkerThread
from langchain_mlx.engine.types import EngineOptions, EngineOverloadedError, Request

Enqueue = Callable[[list[Any]], None]


@dataclass(frozen=True)
class Submission:
    """A request admitted by the engine, with its reader's handle."""

    handle: RequestHandle
    request: Request
    submitted: float
    number: int
    """The submission number (shared by every rank of a sharded model)."""


class Intake:
    """Admission, numbering and queueing of requests; each end counted once."""

    def __init__(
        self,
        name: str,
        worker: WorkerThread,
        options: Callable[[], EngineOptions],
        check: Callable[[Request], None],
        alive: Callable[[], None],
    ) -> None:
        self._name = name
        self._alive = alive  # raises once the engine stopped (readers poll it)
        self._worker = worker
        self._options = options
        self._check = check  # the engine's checks: alive, context, shareable
        self._lock = threading.Lock()
        self._in_flight = 0  # admitted and not yet ended
        self._numbers = itertools.count()
        self._ended: set[int] = set()  # ended outside the scheduler
        self.finished: collections.Counter[str] = collections.Counter()
        """How many requests ended with each finish reason (and "error")."""

    def admit(
        self, request: Request, loop: asyncio.AbstractEventLoop | None
    ) -> Submission:
        """Check and count a request (caller's thread); raise if it cannot run."""
        self._check(request)
        with self._lock:
            opts = self._options()
            if self._in_flight >= opts.max_batch_size + opts.max_queue:
                msg = (
                    f"the MLX engine for {self._name!r} is overloaded: "
                    f"{self._in_flight} requests are in flight (max_batch_size="
                    f"{opts.max_batch_size} decoding + max_queue={opts.max_queue} "
                    "waiting). Limit concurrency (e.g. batch(..., config="
                    "{'max_concurrency': n})), retry later, or raise max_queue."
                )
                raise EngineOverloadedError(msg)
            self._in_flight += 1
            number = next(self._numbers)
        handle = RequestHandle(self._alive, loop)
        return Submission(handle, request, time.perf_counter(), number)

    def enqueue(
        self, submissions: Sequence[Submission], stopped: Callable[[], BaseException]
    ) -> None:
        """Queue for the worker; if it stopped meanwhile, end them here."""
        self._worker.put(list(submissions))
        if self._worker.parked.is_set():  # it may have drained the queue already
            for s in submissions:
                self.end_unscheduled(s, stopped())

    def take(self, *, block: bool) -> list[Submission]:
        """The worker: everything queued (jobs run meanwhile), in order."""
        return [s for item in self._worker.take(block=block) for s in item]

    def end_unscheduled(self, s: Submission, error: BaseException) -> None:
        """End a submission that never reached the scheduler (at most once)."""
        with self._lock:
            if s.number in self._ended:
                return
            self._ended.add(s.number)
        s.handle._put(error)
        self.done("error")

    def done(self, reason: str) -> None:
        """A request has sent its last event (called once per request)."""
        with self._lock:
            self.finished[reason] += 1
            self._in_flight -= 1


class SubmissionGroup:
    """Holds the requests of one `batch` call until every input has submitted."""

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self._arrived = 0
        self._held: list[tuple[Enqueue, Any]] = []
        self._open = expected > 1
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Run one input of the batch inside this."""
        slot = _Slot(self)
        token = _SLOT.set(slot)
        try:
            yield
        finally:
            _SLOT.reset(token)
            slot.arrive()

    def flush(self) -> None:
        """Send whatever is held (the batch call is over or gave up)."""
        with self._lock:
            self._expected = 0
        self._count()

    def _hold(self, enqueue: Enqueue, item: Any) -> bool:
        with self._lock:
            if self._open:
                self._held.append((enqueue, item))
            return self._open

    def _count(self) -> None:
        with self._lock:
            self._arrived += 1
            if not self._open or self._arrived < self._expected:
                return
            self._open = False
            held, self._held = self._held, []
        by_queue: dict[Enqueue, list[Any]] = {}
        for enqueue, item in held:
            by_queue.setdefault(enqueue, []).append(item)
        for enqueue, items in by_queue.items():
            enqueue(items)


class _Slot:
    def __init__(self, group: SubmissionGroup) -> None:
        self.group = group
        self.arrived = False

    def hold(self, enqueue: Enqueue, item: Any) -> bool:
        held = self.group._hold(enqueue, item)
        self.arrive()
        return held

    def arrive(self) -> None:
        if not self.arrived:
            self.arrived = True
            self.group._count()


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "langchain_mlx_submission_slot", default=None
)


def hold_for_group(enqueue: Enqueue, item: Any) -> bool:
    """Hold `item` for the current input's group; False: enqueue it now."""
    slot = _SLOT.get()
    return slot is not None and slot.hold(enqueue, item)

"""Requests submitted together: the inputs of one `batch` call, in one step.

They enter the engine in the same step, whatever order their threads or tasks
reach `submit` in.

`ChatMLX.batch`/`abatch` run each input inside `SubmissionGroup.slot()`. An
input's first submission (or its end, when it failed before submitting) counts
it as arrived; submissions are held until `expected` inputs have arrived and
then queued at once, one list per engine, so the scheduler admits them in one
step (they decode together and prefill their common prompt start once). After
that the group lets submissions through. No timing is involved: grouping is
deterministic, which also makes it testable.

`expected` must be the number of inputs that run at the same time (the
concurrency limit), or the group would wait for inputs that cannot start.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

Enqueue = Callable[[list[Any]], None]


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

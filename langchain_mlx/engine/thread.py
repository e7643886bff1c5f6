"""One thread for one model's MLX work: the helper the engine and the encoder share.

Why a thread per model: mlx-lm generates on a thread-local stream, so every
step of one generation must run on the same thread (LangChain's default async
path hops threads between chunks and crashes with `[StreamContext] Destroyed
in a different thread`). Callers from any thread or event loop meet in one
queue.

`WorkerThread` runs a `serve` loop (the engine's: admit, step, deliver; the
encoder's default: run each job in order) and hands it what callers queued:
`Job`s (a function whose result goes to a future; run between steps by
`take`) and other items (the engine's submissions). When `serve` returns or
fails, the thread *parks* instead of exiting: when a thread that ran MLX
exits, MLX's thread-local state is destroyed and takes the GIL, which at
interpreter exit aborts the process ("terminate called without an active
exception"). A parked daemon thread never exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from langchain_mlx.engine.types import EngineStoppedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
POLL_SECONDS = 0.1  # how often a waiting caller checks that the thread lives


@dataclass(frozen=True)
class Job:
    """A function to run on the worker thread; its result goes to `future`."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]

    def run(self) -> None:
        """Run it (unless cancelled); its result or error goes to the future."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except Exception as e:  # delivered to the caller; the thread lives on
            self.future.set_exception(e)


class WorkerThread:
    """A daemon thread that runs `serve(self)`, then parks for good."""

    def __init__(
        self,
        name: str,
        serve: Callable[[WorkerThread], None] | None = None,
        *,
        parked: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._serve = serve or _run_jobs
        # runs once `parked` is set: what was queued until then is still there,
        # and callers queueing after it see `parked` and handle it themselves
        self._on_parked = parked
        self.parked = threading.Event()
        """Set once `serve` has ended (the thread takes no more work)."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread (once)."""
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the thread is serving (started and not parked)."""
        return self._thread.is_alive() and not self.parked.is_set()

    @property
    def current(self) -> bool:
        """Whether the caller is this thread."""
        return threading.current_thread() is self._thread

    # -- callers' side -----------------------------------------------------------

    def put(self, item: Any) -> None:
        """Queue an item for `serve` (None only wakes it)."""
        self._queue.put(item)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `fn` to run on the thread; its result comes in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(Job(fn, future))
        return future

    def call(self, fn: Callable[[], T], check: Callable[[], None]) -> T:
        """Run `fn` on the thread and return its result (blocks the caller).

        `check()` runs while waiting and raises if the thread stopped serving.
        """
        future = self.submit(fn)
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                check()

    async def acall(self, fn: Callable[[], T]) -> T:
        """`call` without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn))

    # -- the thread's side --------------------------------------------------------

    def take(self, *, block: bool) -> list[Any]:
        """Everything queued (waiting if `block` and nothing is): jobs run here.

        Returns the other items in order (wake-ups dropped).
        """
        taken: list[Any] = []
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if isinstance(item, Job):
                    item.run()
                elif item is not None:
                    taken.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return taken

    def leftovers(self) -> list[Any]:
        """What is still queued, taken without running (the thread has stopped)."""
        items: list[Any] = []
        try:
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            return items

    def _run(self) -> None:
        try:
            self._serve(self)
        except BaseException:  # never leave without parking
            logger.exception("the worker thread %r stopped", self.name)
        finally:
            self.parked.set()
        if self._on_parked is not None:
            try:
                self._on_parked()
            except BaseException:
                logger.exception("the worker thread %r: after parking", self.name)
        threading.Event().wait()  # park (see the module docstring)


class _Stop:
    """The last item for `_run_jobs`: run `last`, then stop serving."""

    def __init__(self, last: Callable[[], object]) -> None:
        self.last = last


def stop_jobs(worker: WorkerThread, last: Callable[[], object]) -> None:
    """End a `_run_jobs` thread after what is queued and `last`; wait for it."""
    worker.put(_Stop(last))
    if not worker.current:
        worker.parked.wait()


def _run_jobs(worker: WorkerThread) -> None:
    """The default `serve`: run jobs in order until `stop_jobs`."""
    while True:
        for item in worker.take(block=True):
            if isinstance(item, _Stop):
                try:
                    item.last()
                finally:
                    for job in worker.leftovers():
                        if isinstance(job, Job):
                            job.future.set_exception(
                                EngineStoppedError(f"{worker.name} was closed")
                            )
                return

"""What a caller holds for one request: its events, read sync or async.

The worker thread `_put`s events; the caller iterates. Both ways of reading go
through `_take`, the one place that turns a queued item into an event, an error
or the end, so sync and async cannot drift apart.

A request is cancelled as soon as its reader is gone, however it goes:
- the reader stops iterating (break, an exception, `close()`): the iterator's
  `finally` cancels;
- the asyncio task that submitted it is cancelled or fails while the stream
  is suspended somewhere else (e.g. in a callback): a done-callback on the task
  cancels. (Relying on the async generator's `finally` alone is a race: an
  abandoned async generator is only closed when the garbage collector gets to
  it, which for objects caught in a reference cycle can be after the request
  ran to `max_tokens`.) A task that *returns* does not cancel: LangChain runs
  each step of a chain's `astream` in a short task of its own.

No reader waits forever: the worker ends every request it holds when it stops
(closed or crashed), and `submit` checks again after queueing. The sync reader
also polls the worker's health; the async one waits on its queue alone
(`asyncio.wait_for` can swallow a cancellation on Python < 3.12).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from langchain_mlx.engine.types import Event, Final

POLL_SECONDS = 1.0  # how often a waiting reader checks that the worker lives

_END = object()
T = TypeVar("T")


class RequestHandle:
    """One request's events. Stop reading and the request is cancelled."""

    def __init__(
        self,
        check_alive: Callable[[], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._check_alive = check_alive
        self.loop = loop
        self._sync_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async_q: asyncio.Queue[Any] | None = (
            asyncio.Queue() if loop is not None else None
        )
        self._cancelled = threading.Event()
        self._done = False
        self._task: asyncio.Task[Any] | None = None
        if loop is not None:
            try:
                self._task = asyncio.current_task(loop)
            except RuntimeError:  # not called from the loop's thread
                self._task = None
            if self._task is not None:
                self._task.add_done_callback(self._on_task_done)

    # -- worker side ----------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether the reader has given up on this request."""
        return self._cancelled.is_set()

    def _put(self, event: Event | BaseException) -> None:
        """Deliver an event (called by the worker thread)."""
        if self.loop is None:
            self._sync_q.put(event)
            return
        assert self._async_q is not None
        try:
            self.loop.call_soon_threadsafe(self._async_q.put_nowait, event)
        except RuntimeError:  # the reader's event loop is closed
            self.cancel()

    # -- reader side ------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the worker to drop this request (idempotent, thread-safe)."""
        self._cancelled.set()

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        if self._done:
            return
        if task.cancelled() or task.exception() is not None:
            self.cancel()

    def close(self) -> None:
        """The reader is done with this request: cancel it if unfinished."""
        self._finish()

    def _finish(self) -> None:
        """The reader is done: cancel if unfinished; forget the task."""
        if not self._done:
            self.cancel()
        self._done = True
        if self._task is not None:
            self._task.remove_done_callback(self._on_task_done)
            self._task = None

    def _take(self, item: Any) -> Any:
        """A queued item -> the event to yield, or `_END` after the last one."""
        if self._done:
            return _END
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Final):
            self._done = True
        return item

    def __iter__(self) -> Iterator[Event]:
        try:
            while not self._done:
                try:
                    item = self._sync_q.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    self._check_alive()
                    continue
                yield self._take(item)
        finally:
            self._finish()

    async def __aiter__(self) -> AsyncIterator[Event]:
        assert self._async_q is not None, "submit(..., loop=...) for async reading"
        try:
            while not self._done:
                yield self._take(await self._async_q.get())
        finally:
            self._finish()


# -- the one consumption loop (sync and async), for every LangChain class --------


def read(
    handle: RequestHandle,
    convert: Callable[[Event], T | None],
    on_token: Callable[..., Any] | None = None,
) -> Iterator[T]:
    """The request's events, converted (e.g. to chunks); `on_token(text, chunk=)`.

    Closing this iterator (or leaving it) cancels an unfinished request.
    """
    try:
        for event in handle:
            if (chunk := convert(event)) is not None:
                text = getattr(chunk, "text", "")
                if on_token is not None and text:
                    on_token(text, chunk=chunk)
                yield chunk
    finally:
        handle.close()


async def aread(
    handle: RequestHandle,
    convert: Callable[[Event], T | None],
    on_token: Callable[..., Awaitable[Any]] | None = None,
) -> AsyncIterator[T]:
    """`read` for asyncio (the handle was submitted with `loop=`)."""
    try:
        async for event in handle:
            if (chunk := convert(event)) is not None:
                text = getattr(chunk, "text", "")
                if on_token is not None and text:
                    await on_token(text, chunk=chunk)
                yield chunk
    finally:
        handle.close()

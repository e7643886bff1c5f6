"""The one place that runs MLX: an engine per loaded model, one worker thread.

Flow::

    Engine.submit(Request) -> RequestHandle          (caller thread; bounded queue)
        worker thread: Scheduler.step()              (_batching.py)
            admit: PrefixCache.fetch -> BatchGenerator.insert   (_prefix_cache.py)
            BatchGenerator.next(): one token for every live request
            detokenizer -> StopMatcher -> handle._put(Delta ...) ... (Final)
            finished: KV cache -> PrefixCache.store
    for event in handle / async for event in handle  (caller: sync or asyncio)

Why a worker thread: mlx-lm generates on a thread-local stream, so every step
of one generation must run on the same thread (LangChain's default async path
hops threads between chunks and crashes with `[StreamContext] Destroyed in a
different thread`). One thread per model also means a model is loaded once per
process, and concurrent requests (threads, asyncio tasks, `batch`) meet in one
place where they can share a batch and each other's prompt prefixes.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_mlx._settings import GenerationSettings

if TYPE_CHECKING:
    from langchain_mlx._batching import Scheduler
    from langchain_mlx._prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

LogitsProcessor = Callable[[Any, Any], Any]

_POLL_SECONDS = 1.0  # how often a waiting reader checks that the worker lives
_GATHER_SECONDS = 0.002  # after waking from idle, how long to collect newcomers


class GenerationTimeoutError(TimeoutError):
    """A generation ran past its `timeout`."""


class EngineStoppedError(RuntimeError):
    """The engine's worker thread is gone; the request cannot complete."""


class EngineOverloadedError(RuntimeError):
    """More requests are waiting than the engine's `max_queue` allows."""


@dataclass(frozen=True)
class EngineOptions:
    """How an engine batches and caches (shared by every user of the model)."""

    max_batch_size: int = 8
    """Most requests decoded together; more wait in the queue."""
    max_queue: int = 1024
    """Most requests waiting beyond the batch; past it `submit` raises
    `EngineOverloadedError` instead of holding unbounded memory."""
    prefix_cache_entries: int = 10
    """How many recent KV caches are kept for prefix reuse (0: off)."""
    prefix_cache_bytes: int = 2 << 30
    """Byte budget of those caches; least recently used go first (0: off)."""

    def validate(self) -> None:
        """Raise ValueError for a value the engine cannot work with."""
        if self.max_batch_size < 1:
            msg = f"max_batch_size must be >= 1, got {self.max_batch_size!r}"
            raise ValueError(msg)
        for name in ("max_queue", "prefix_cache_entries", "prefix_cache_bytes"):
            if getattr(self, name) < 0:
                value = getattr(self, name)
                msg = f"{name} must be >= 0 (0 turns it off), got {value!r}"
                raise ValueError(msg)


ENGINE_OPTION_NAMES = tuple(EngineOptions.__dataclass_fields__)


@dataclass(frozen=True)
class Request:
    """One generation: prompt token ids and how to sample."""

    prompt_ids: Sequence[int]
    settings: GenerationSettings
    logits_processors: Sequence[LogitsProcessor] = ()


@dataclass(frozen=True)
class Delta:
    """Newly decoded text (never contains a stop string)."""

    text: str


@dataclass(frozen=True)
class Final:
    """The end of a request, with usage and timings."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float  # prompt tokens prefilled (not from cache) per second
    generation_tps: float
    time_to_first_token: float  # from submit, so time waiting in the queue counts
    peak_memory_gb: float  # peak since the engine last went from idle to busy
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache


Event = Delta | Final


@dataclass
class RequestHandle:
    """What a caller reads: the request's events, from a sync or async consumer.

    Stop reading early (break, close, task cancellation) and the request is
    cancelled: the worker drops it at its next token.
    """

    engine: Engine
    loop: asyncio.AbstractEventLoop | None = None
    _sync_q: queue.SimpleQueue[Event | BaseException] = field(
        default_factory=queue.SimpleQueue
    )
    _async_q: asyncio.Queue[Event | BaseException] | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.loop is not None:
            self._async_q = asyncio.Queue()

    @property
    def cancelled(self) -> bool:
        """Whether the consumer has given up on this request."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to drop this request (idempotent, thread-safe)."""
        self._cancelled.set()

    def _put(self, event: Event | BaseException) -> None:
        """Called by the worker thread."""
        if self.loop is None:
            self._sync_q.put(event)
            return
        assert self._async_q is not None
        try:
            self.loop.call_soon_threadsafe(self._async_q.put_nowait, event)
        except RuntimeError:  # the consumer's event loop is closed
            self.cancel()

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                try:
                    event = self._sync_q.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    self.engine.check_alive()
                    continue
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Final):
                    return
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        assert self._async_q is not None, "submit(..., loop=...) for async reading"
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self._async_q.get(), _POLL_SECONDS)
                except asyncio.TimeoutError:
                    self.engine.check_alive()
                    continue
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Final):
                    return
        finally:
            self.cancel()


class Engine:
    """Owns one loaded model and tokenizer and the thread that runs them."""

    _registry: dict[tuple[Any, ...], Engine] = {}  # noqa: RUF012
    _registry_lock = threading.Lock()

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        options: EngineOptions | None = None,
        batched: bool | None = None,
    ) -> None:
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        from langchain_mlx._prefix_cache import PrefixCache

        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._options = options or EngineOptions()
        self._options.validate()
        self._batched = batched  # None: batch when the model's caches allow it
        self.prefix_cache: PrefixCache = PrefixCache(
            self._options.prefix_cache_entries, self._options.prefix_cache_bytes
        )
        """Recent KV caches reused across requests (read its counters freely;
        it is changed on the worker thread only)."""
        self._eos_ids = frozenset(int(i) for i in tokenizer.eos_token_ids)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet finished
        self._closing = False
        self._parked = threading.Event()
        self._scheduler: Scheduler | None = None
        self._applied: EngineOptions | None = None  # options the worker applied
        self.finished: collections.Counter[str] = collections.Counter()
        """How many requests ended with each finish reason (and "error")."""
        self._thread = threading.Thread(
            target=self._run, name=f"langchain-mlx-engine[{name}]", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    # -- construction: one engine per model per process ----------------------

    @classmethod
    def for_path(
        cls,
        path: str,
        *,
        name: str | None = None,
        adapter_path: str | None = None,
        lazy: bool = False,
        tokenizer_config: dict[str, Any] | None = None,
    ) -> Engine:
        """The engine for a model folder or hub id, loading it on first use."""
        key = ("path", path, adapter_path, lazy, json.dumps(tokenizer_config or {}))
        with cls._registry_lock:
            engine = cls._registry.get(key)
            if engine is None or not engine.alive:
                from mlx_lm import load

                logger.info("loading MLX model %s", path)
                model, tokenizer = load(
                    path,
                    tokenizer_config=tokenizer_config or {},
                    adapter_path=adapter_path,
                    lazy=lazy,
                )
                engine = cls(model, tokenizer, name=name or path)
                cls._registry[key] = engine
            return engine

    @classmethod
    def for_objects(cls, model: Any, tokenizer: Any, *, name: str) -> Engine:
        """The engine for a model and tokenizer the user loaded themselves."""
        key = ("objects", id(model), id(tokenizer))
        with cls._registry_lock:
            engine = cls._registry.get(key)
            if engine is None or not engine.alive:
                engine = cls(model, tokenizer, name=name)
                cls._registry[key] = engine
            return engine

    # -- lifecycle ------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread is taking requests."""
        return not self._closing and self._worker_running()

    def _worker_running(self) -> bool:
        return self._thread.is_alive() and not self._parked.is_set()

    def check_alive(self) -> None:
        """Raise `EngineStoppedError` if the worker thread is gone."""
        if not self._worker_running():
            msg = (
                f"the MLX engine for {self.name!r} has stopped (see the log for "
                "the error that ended it); create the model again to restart it"
            )
            raise EngineStoppedError(msg)

    def close(self) -> None:
        """Stop taking requests; the worker parks once the live ones are done."""
        if self.alive:
            self._closing = True
            self._queue.put(None)
            self._parked.wait(timeout=30)

    # -- configuration ----------------------------------------------------------

    @property
    def options(self) -> EngineOptions:
        """The current batching and caching options."""
        return self._options

    def configure(self, **options: int | None) -> None:
        """Change some `EngineOptions` (None leaves one as it is).

        The engine is shared by every pipeline of the same model, so the last
        setting wins. Takes effect before the worker's next step.
        """
        unknown = set(options) - set(ENGINE_OPTION_NAMES)
        if unknown:
            msg = (
                f"unknown engine option(s) {sorted(unknown)}; "
                f"accepted: {', '.join(ENGINE_OPTION_NAMES)}"
            )
            raise ValueError(msg)
        changes = {k: v for k, v in options.items() if v is not None}
        if not changes:
            return
        with self._lock:
            updated = replace(self._options, **changes)
            updated.validate()
            self._options = updated

    # -- requests ---------------------------------------------------------------

    def submit(
        self, request: Request, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        """Queue a request; read its events from the returned handle.

        Raises:
            EngineOverloadedError: `max_batch_size + max_queue` requests are
                already in flight.
            EngineStoppedError: the engine was closed or its worker died.

        """
        if not self.alive:
            self.check_alive()
            msg = f"the MLX engine for {self.name!r} is closed; create the model again"
            raise EngineStoppedError(msg)
        if not request.prompt_ids:
            msg = "the prompt is empty: at least one token is needed to generate"
            raise ValueError(msg)
        with self._lock:
            opts = self._options
            if self._in_flight >= opts.max_batch_size + opts.max_queue:
                msg = (
                    f"the MLX engine for {self.name!r} is overloaded: "
                    f"{self._in_flight} requests are in flight (max_batch_size="
                    f"{opts.max_batch_size} decoding + max_queue={opts.max_queue} "
                    "waiting). Limit concurrency (e.g. batch(..., config="
                    "{'max_concurrency': n})), retry later, or raise max_queue."
                )
                raise EngineOverloadedError(msg)
            self._in_flight += 1
        handle = RequestHandle(self, loop)
        self._queue.put((handle, request, time.perf_counter()))
        return handle

    def save_prefix(self, path: str | Path, prompt_ids: Sequence[int]) -> int:
        """Write the KV state of `prompt_ids` to `path` (`.safetensors`).

        Runs on the worker between decode steps (live streams pause while the
        prefix is prefilled). Returns the number of tokens saved.
        """
        ids = list(prompt_ids)

        def save() -> int:
            return self.prefix_cache.save(path, self.model, ids, name=self.name)

        return int(self._call(save))

    def load_prefix(self, path: str | Path) -> int:
        """Load a prefix written by `save_prefix` into the prefix cache.

        Later prompts that start with it skip prefilling it. Returns its length
        in tokens.
        """
        return len(self._call(lambda: self.prefix_cache.load(path, self.model)))

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (waits for the worker to do it)."""
        self._call(self.prefix_cache.clear)

    @property
    def largest_batch(self) -> int:
        """The most requests this engine has decoded together so far."""
        return self._scheduler.largest_batch if self._scheduler is not None else 0

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread and return its result."""
        self.check_alive()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Task(fn, future))
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                self.check_alive()

    def _request_done(self, reason: str) -> None:
        """Called by the worker when a request has sent its last event."""
        with self._lock:
            self.finished[reason] += 1
            self._in_flight -= 1

    # -- the worker -----------------------------------------------------------

    def _run(self) -> None:
        from langchain_mlx._batching import Scheduler

        scheduler = Scheduler(
            self.model,
            self.tokenizer,
            eos_ids=sorted(self._eos_ids),
            prefix_cache=self.prefix_cache,
            on_done=self._request_done,
            max_batch_size=self._options.max_batch_size,
            batched=self._batched,
        )
        self._scheduler = scheduler
        closing = False
        while True:
            try:
                block = not scheduler.busy
                closing = self._take_items(scheduler, block=block) or closing
                self._apply_options(scheduler)
                if closing and not scheduler.busy:
                    # Park instead of returning: when this thread exits, MLX's
                    # thread-local compile cache is destroyed and takes the GIL; at
                    # interpreter exit that aborts the process ("terminate called
                    # without an active exception"). A parked daemon thread never exits.
                    self._parked.set()
                    threading.Event().wait()
                scheduler.step()
            except Exception as e:  # delivered to the callers, worker lives on
                logger.exception("the MLX engine for %r failed a step", self.name)
                scheduler.fail_all(e)

    def _apply_options(self, scheduler: Scheduler) -> None:
        """Bring the scheduler and prefix cache in line with `configure()`."""
        options = self._options
        if options is not self._applied:
            self._applied = options
            scheduler.max_batch_size = options.max_batch_size
            self.prefix_cache.set_limits(
                options.prefix_cache_entries, options.prefix_cache_bytes
            )

    def _take_items(self, scheduler: Scheduler, *, block: bool) -> bool:
        """Move everything queued to the scheduler; True once close() was called."""
        closing = False
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                self._apply_options(scheduler)
                if item is None:
                    closing = True
                elif isinstance(item, _Task):
                    item.run()
                else:
                    scheduler.add(*item)
                # Waking from idle, wait a moment for requests submitted together
                # (gather, batch): they share a batch and their common prefix.
                item = (
                    self._queue.get(timeout=_GATHER_SECONDS)
                    if block
                    else (self._queue.get_nowait())
                )
        except queue.Empty:
            return closing


@dataclass(frozen=True)
class _Task:
    """A function to run on the worker thread (e.g. saving a prefix)."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)


_Item = tuple[RequestHandle, Request, float] | _Task | None

"""The engine: one loaded model, one worker thread, and its lifetime.

Flow::

    Engine.submit(Request) -> RequestHandle          (caller thread: limits checked)
        worker thread: Scheduler.step()              (scheduler.py)
            admit: PrefixCache.fetch -> BatchGenerator.insert
            BatchGenerator.next(): one token for every live request
            RequestText: detokenize, stop strings, reasoning, tool calls (text.py)
            handle._put(Segment ...) ... (Final)
    for event in handle / async for event in handle  (handle.py)

Why a worker thread: mlx-lm generates on a thread-local stream, so every step
of one generation must run on the same thread (LangChain's default async path
hops threads between chunks and crashes with `[StreamContext] Destroyed in a
different thread`). One thread per model also means a model is loaded once per
process, and concurrent requests (threads, asyncio tasks, `batch`) meet in one
place where they can share a batch and each other's prompt prefixes.

Lifetime: `Engine.for_path` returns the one engine of a model folder (however
often pydantic re-validates the objects that ask for it). `close()` cancels
what is running, drops the model, the tokenizer and the cached KV states, and
returns their memory; interpreter exit closes every engine in well under a
second (the worker checks between steps, and a prefill step is sized to take
about a quarter of a second).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import functools
import itertools
import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from langchain_mlx.engine.configuration import Configuration, Loader
from langchain_mlx.engine.group import hold_for_group
from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.lockstep import Lockstep, log_memory
from langchain_mlx.engine.model_facts import (
    caches_can_be_cut,
    canonical_path,
    check_context,
    context_length_of,
)
from langchain_mlx.engine.prefix_tasks import PrefixTasks, Task
from langchain_mlx.engine.types import (
    DistributedError,
    EngineOptions,
    EngineOverloadedError,
    EngineStoppedError,
    Request,
    RequestFailedError,
)

if TYPE_CHECKING:
    from langchain_mlx.engine.distributed import StepSharing
    from langchain_mlx.engine.prefix_cache import PrefixCache
    from langchain_mlx.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

_CLOSE_WAIT_SECONDS = 5.0  # close(): how long to wait for the current step
_EXIT_WAIT_SECONDS = 1.0  # at interpreter exit


@dataclass(frozen=True)
class _Submission:
    handle: RequestHandle
    request: Request
    submitted: float
    number: int


_Item = list[_Submission] | Task | None


class Engine(Configuration, Lockstep, PrefixTasks):
    """Owns one loaded model and tokenizer and the thread that runs them."""

    _registry: ClassVar[dict[tuple[Any, ...], Engine]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _loading: dict[tuple[Any, ...], threading.Lock] = {}  # noqa: RUF012

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        options: EngineOptions | None = None,
        batched: bool | None = None,
        sharing: StepSharing | None = None,
    ) -> None:
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        from langchain_mlx.engine.prefix_cache import PrefixCache

        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        self.model: Any = model
        self.tokenizer: Any = tokenizer
        self.name = name
        self._options = options or EngineOptions()
        self._options.validate()
        self._batched = batched  # None: batch when the model's caches allow it
        self.context_length: int | None = context_length_of(model)
        """The model's context window in tokens (from its config), if known."""
        self.prefix_cache: PrefixCache = PrefixCache(
            self._options.prefix_cache_entries, self._options.prefix_cache_bytes
        )
        """Recent KV caches reused across requests (read its counters freely;
        it is changed on the worker thread only)."""
        self._eos_ids = frozenset(int(i) for i in tokenizer.eos_token_ids)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted and not yet finished
        self._numbers = itertools.count()
        self._sharing = sharing
        """Set on every rank of a sharded model (distributed.py)."""
        self._failure: BaseException | None = None  # why the worker stopped
        self._handles: weakref.WeakSet[RequestHandle] = weakref.WeakSet()
        self._closing = False
        self._parked = threading.Event()
        self._scheduler: Scheduler | None = None
        self._applied: EngineOptions | None = None  # options the worker applied
        self._users: dict[int, weakref.ref[Any]] = {}  # pydantic objects: unhashable
        self.finished: collections.Counter[str] = collections.Counter()
        """How many requests ended with each finish reason (and "error")."""
        self._thread = threading.Thread(
            target=self._run, name=f"langchain-mlx-engine[{name}]", daemon=True
        )
        _LIVE.add(self)
        self._thread.start()

    # -- construction: one engine per model per process ----------------------

    @classmethod
    def for_path(
        cls,
        path: str,
        *,
        loader: Loader,
        name: str | None = None,
        adapter_path: str | None = None,
        lazy: bool = False,
        tokenizer_config: dict[str, Any] | None = None,
        options: dict[str, int | None] | None = None,
        group: Any = None,
        distributed: str | None = None,
        constraint_factory: Callable[[Any, Any], Any] | None = None,
        distributed_timeout: float | None = None,
    ) -> Engine:
        """The engine for a model folder or hub id, loaded by `loader` on first use.

        `options` (engine option names; None: keep) apply when the engine is
        created; asking an existing engine for different ones raises, since the
        engine is shared (change them with `configure`).

        With an MLX distributed `group` of more than one rank, `loader` loads
        this rank's shard and every rank runs the same engine steps
        (`distributed.py`): on rank 0 this returns the engine; on the others
        it serves rank 0's steps and ends the process when rank 0 is done.
        `constraint_factory(tokenizer, spec)` rebuilds constraints there.
        """
        sharded = group is not None and group.size() > 1
        key = (
            "path",
            canonical_path(path),
            canonical_path(adapter_path) if adapter_path else None,
            lazy,
            json.dumps(tokenizer_config or {}, sort_keys=True, default=str),
            distributed if sharded else None,
        )
        with cls._registry_lock:  # one loader per model; others load in parallel
            key_lock = cls._loading.setdefault(key, threading.Lock())
        with key_lock:
            with cls._registry_lock:
                engine = cls._registry.get(key)
            if engine is not None and engine.alive:
                engine.require_options(options)
                return engine
            logger.info("loading MLX model %s", path)
            sharing = None
            if sharded:
                from langchain_mlx.engine.distributed import StepSharing

                cls._one_sharded_engine(key)
                sharing = StepSharing(group, model=name or path, mode=str(distributed))
                sharing.constraint_factory = constraint_factory
                if distributed_timeout is not None:
                    sharing.timeout = distributed_timeout
            model, tokenizer = loader()
            if sharing is not None:
                log_memory(sharing, "loaded its part of the model")
            engine = cls(
                model,
                tokenizer,
                name=name or path,
                options=EngineOptions.chosen(options),
                sharing=sharing,
            )
            engine._key = key
            if sharing is not None and not sharing.leader:
                engine._follow()  # never returns
            with cls._registry_lock:
                cls._registry[key] = engine
            return engine

    @classmethod
    def for_objects(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        options: dict[str, int | None] | None = None,
    ) -> Engine:
        """The engine for a model and tokenizer the user loaded themselves."""
        key = ("objects", id(model), id(tokenizer))
        with cls._registry_lock:
            engine = cls._registry.get(key)
            if engine is not None and engine.alive and engine.model is model:
                engine.require_options(options)
                return engine
            engine = cls(
                model, tokenizer, name=name, options=EngineOptions.chosen(options)
            )
            engine._key = key
            cls._registry[key] = engine
            return engine

    _key: tuple[Any, ...] | None = None

    # -- lifecycle ------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread is taking requests."""
        return not self._closing and self._worker_running()

    def _worker_running(self) -> bool:
        return self._thread.is_alive() and not self._parked.is_set()

    def check_alive(self) -> None:
        """Raise `EngineStoppedError` if the engine is closed or its worker gone."""
        if isinstance(self._failure, DistributedError):
            raise DistributedError(str(self._failure))
        if self._closing or not self._worker_running():
            what = "was closed" if self._closing else "has stopped"
            msg = (
                f"the MLX engine for {self.name!r} {what}; create the model again "
                "(e.g. ChatMLX(model=...)) to load it anew"
            )
            raise EngineStoppedError(msg)

    def close(self, *, wait: float = _CLOSE_WAIT_SECONDS) -> None:
        """Cancel what runs, free the model and its caches; idempotent.

        Requests still running end with `EngineStoppedError`. Every object using
        this model stops working (a new one loads the model again). Waits up to
        `wait` seconds for the current step to finish.
        """
        with self._registry_lock:
            if self._key is not None and self._registry.get(self._key) is self:
                del self._registry[self._key]
        _LIVE.discard(self)
        for ref in list(self._users.values()):  # objects holding the model let go
            user = ref()
            if user is not None:
                user._engine_closed()
        if self._closing:
            self._parked.wait(timeout=wait)
            return
        self._closing = True
        self._queue.put(None)  # wake an idle worker
        if threading.current_thread() is not self._thread:
            self._parked.wait(timeout=wait)

    def attach(self, user: Any) -> None:
        """Tell `user` (weakly held) when the engine closes: `user._engine_closed()`."""
        key = id(user)
        self._users[key] = weakref.ref(user, lambda _: self._users.pop(key, None))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------

    @functools.cached_property
    def wants_checkpoints(self) -> bool:
        """Whether its caches cannot be cut back to a shorter prefix.

        Then a prompt is reused only from a cached exact prefix, and requests
        should name their message boundaries (`Request.checkpoints`).
        """
        return self.model is not None and not caches_can_be_cut(self.model)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise `ContextWindowExceededError` unless prompt + max_tokens fit."""
        check_context(self.context_length, self.name, prompt_tokens, max_tokens)

    def submit(
        self, request: Request, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        """Queue a request; read its events from the returned handle.

        Raises:
            ContextWindowExceededError: the prompt plus max_tokens do not fit.
            EngineOverloadedError: `max_batch_size + max_queue` requests are
                already in flight.
            EngineStoppedError: the engine was closed or its worker died.

        """
        submission = self._admit(request, loop)
        if not hold_for_group(self._enqueue, submission):
            self._enqueue([submission])
        return submission.handle

    def submit_many(
        self,
        requests: Sequence[Request],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[RequestHandle]:
        """Submit requests together: they enter the batch in the same step."""
        submissions: list[_Submission] = []
        try:
            for request in requests:
                submissions.append(self._admit(request, loop))
        except BaseException:
            for s in submissions:
                s.handle.cancel()
            self._enqueue(submissions)  # counted in flight: let the worker end them
            raise
        self._enqueue(submissions)
        return [s.handle for s in submissions]

    def _enqueue(self, submissions: list[_Submission]) -> None:
        """Queue for the worker; if it stopped meanwhile, end them here."""
        self._queue.put(submissions)
        if self._parked.is_set():  # it may have drained the queue already
            for s in submissions:
                s.handle._put(self._stopped_error())

    def _admit(
        self, request: Request, loop: asyncio.AbstractEventLoop | None
    ) -> _Submission:
        self.check_alive()
        if not request.prompt_ids:
            msg = "the prompt is empty: at least one token is needed to generate"
            raise ValueError(msg)
        self.check_fits(len(request.prompt_ids), request.settings.max_tokens)
        if self._sharing is not None:
            from langchain_mlx.engine.distributed import shareable_request

            shareable_request(request)
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
            number = next(self._numbers)
        handle = RequestHandle(self.check_alive, loop)
        if self._sharing is not None:
            self._handles.add(handle)  # to fail them if a rank dies
        return _Submission(handle, request, time.perf_counter(), number)

    @property
    def largest_batch(self) -> int:
        """The most requests this engine has decoded together so far."""
        return self._scheduler.largest_batch if self._scheduler is not None else 0

    def _request_done(self, reason: str) -> None:
        """Called by the worker when a request has sent its last event."""
        with self._lock:
            self.finished[reason] += 1
            self._in_flight -= 1

    # -- the worker -----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # never leave without ending requests and parking
            logger.exception("the MLX engine for %r stopped", self.name)
            self._closing = True
        finally:
            self._shut_down()
        # Park instead of returning: when this thread exits, MLX's thread-local
        # compile cache is destroyed and takes the GIL; at interpreter exit that
        # aborts the process ("terminate called without an active exception").
        # A parked daemon thread never exits.
        self._parked.set()
        self._end_queued()  # what was queued meanwhile (`_enqueue` ends the rest)
        threading.Event().wait()

    def _serve(self) -> None:
        from langchain_mlx.engine.scheduler import Scheduler

        sharing = self._sharing
        scheduler = Scheduler(
            self.model,
            self.tokenizer,
            eos_ids=sorted(self._eos_ids),
            prefix_cache=self.prefix_cache,
            on_done=self._request_done,
            max_batch_size=self._options.max_batch_size,
            batched=self._batched,
            measured_costs=sharing is None,  # every rank must decide the same
            split_head=sharing is None,  # a sharded head may hold collectives
        )
        self._scheduler = scheduler
        if sharing is not None:
            self._start_group(sharing)
        while not self._closing:
            try:
                if sharing is not None:
                    if not self._step_shared(scheduler, sharing):
                        break
                    continue
                for s in self._take_items(block=not scheduler.busy):
                    scheduler.add(s.handle, s.request, s.submitted, s.number)
                self._apply_options(scheduler)
                if not self._closing:
                    scheduler.step()
            except DistributedError:
                raise  # the group is gone: the engine stops
            except Exception as e:
                if sharing is not None:  # the ranks may no longer agree: stop all
                    self._failure = sharing.broken(f"a step failed here: {e!r}")
                    raise self._failure from e
                # delivered to the callers, worker lives on
                logger.exception("the MLX engine for %r failed a step", self.name)
                error = RequestFailedError(f"the MLX engine failed a step: {e}")
                error.__cause__ = e
                scheduler.fail_all(error)
        if sharing is not None and sharing.leader and self._failure is None:
            self._end_group(sharing)  # the other ranks end too (exit 0)

    def _shut_down(self) -> None:
        """End every request and free the model's memory."""
        if self._sharing is not None and self._failure is not None:
            self._sharing.abandon()  # the other ranks must not wait for rank 0
        scheduler = self._scheduler
        try:
            if scheduler is not None:
                scheduler.fail_all(self._stopped_error())
            self._end_queued()
        except Exception:  # never leave the thread without parking
            logger.exception("closing the MLX engine for %r", self.name)
        try:
            import gc

            import mlx.core as mx

            if scheduler is not None:
                scheduler.release()
            self.prefix_cache.clear()
            self.model = self.tokenizer = None
            self._scheduler = scheduler = None
            gc.collect()
            mx.clear_cache()
        except Exception:
            logger.exception("freeing the MLX engine for %r", self.name)

    def _end_queued(self) -> None:
        """End the requests and tasks still queued (the engine has stopped)."""
        try:
            while True:
                item = self._queue.get_nowait()
                if isinstance(item, Task):
                    item.future.set_exception(self._stopped_error())
                elif item is not None:
                    for s in item:
                        s.handle._put(self._stopped_error())
                        self._request_done("error")
        except queue.Empty:
            return

    def _stopped_error(self) -> EngineStoppedError:
        if isinstance(self._failure, DistributedError):
            return DistributedError(str(self._failure))
        return EngineStoppedError(
            f"the MLX engine for {self.name!r} was closed while the request ran; "
            "create the model again to load it anew"
        )

    def _apply_options(self, scheduler: Scheduler) -> None:
        """Bring the scheduler and prefix cache in line with `configure()`."""
        options = self._options
        scheduler.draft_model = self._draft
        if options is not self._applied:
            self._applied = options
            scheduler.max_batch_size = options.max_batch_size
            self.prefix_cache.set_limits(
                options.prefix_cache_entries, options.prefix_cache_bytes
            )

    def _take_items(self, *, block: bool) -> list[_Submission]:
        """Take everything queued (waiting if idle); run tasks, return requests."""
        taken: list[_Submission] = []
        try:
            item = self._queue.get() if block else self._queue.get_nowait()
            while True:
                if isinstance(item, Task):
                    item.run()
                elif item is not None:
                    taken.extend(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return taken


# -- engines alive in this process: closed at interpreter exit -------------------

_LIVE: set[Engine] = set()


@atexit.register
def _close_all() -> None:
    for engine in list(_LIVE):
        engine.close(wait=_EXIT_WAIT_SECONDS)

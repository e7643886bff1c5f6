"""The engine: one loaded model, the thread that runs it, and its lifetime.

Flow::

    Engine.submit(Request) -> RequestHandle        (caller: Intake.admit checks limits)
        worker thread (thread.py), the driver's step:
            LocalDriver: Intake.take -> Scheduler.add -> Scheduler.step
            LockstepDriver (lockstep.py): rank 0 decides a StepPlan, every
                rank applies it and steps (a sharded model)
        Scheduler.step (scheduler.py): admit, decode, deliver events
    for event in handle / async for event in handle  (handle.py)

The engine is built by composition: a `WorkerThread` (shared with the
embedding encoder), an `Intake` (admission, numbering, queue, each end counted
once), a `Scheduler` (made on the worker thread) and a driver. Nothing here
reads another object's private state.

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
import functools
import json
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from langchain_mlx.engine.intake import Intake, Submission, hold_for_group
from langchain_mlx.engine.model_facts import (
    caches_can_be_cut,
    canonical_path,
    check_context,
    context_length_in_folder,
    context_length_of,
    kv_bytes_per_token,
)
from langchain_mlx.engine.thread import Job, WorkerThread
from langchain_mlx.engine.types import (
    ENGINE_OPTION_NAMES,
    DistributedError,
    EngineOptions,
    EngineOverloadedError,
    EngineStoppedError,
    Request,
    RequestFailedError,
)

if TYPE_CHECKING:
    import collections

    from langchain_mlx.engine.distributed import StepSharing
    from langchain_mlx.engine.handle import RequestHandle
    from langchain_mlx.engine.prefix_cache import PrefixCache
    from langchain_mlx.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

Loader = Callable[[], tuple[Any, Any]]

_CLOSE_WAIT_SECONDS = 5.0  # close(): how long to wait for the current step
_EXIT_WAIT_SECONDS = 1.0  # at interpreter exit


class Driver(Protocol):
    """What the worker runs each iteration: the local loop or the lockstep."""

    def step(self) -> bool:
        """One iteration (take what arrived, step the scheduler); False: stop."""

    def fail(self, error: Exception) -> None:
        """A step raised: deliver it (local) or stop the group (sharded)."""

    def finish(self) -> None:
        """The worker is leaving its loop normally."""


class LocalDriver:
    """One process: take what arrived, apply changed options, step."""

    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self._engine = engine
        self._scheduler = scheduler

    def step(self) -> bool:
        """Admit what arrived and step the scheduler once."""
        scheduler = self._scheduler
        for s in self._engine.intake.take(block=not scheduler.busy):
            scheduler.add(s.handle, s.request, s.submitted, s.number)
        self._engine.apply_options(scheduler, self._engine.options)
        if not self._engine.closing:
            scheduler.step()
        return True

    def fail(self, error: Exception) -> None:
        """Deliver a failed step to its requests; the worker lives on."""
        logger.error(
            "the MLX engine for %r failed a step", self._engine.name, exc_info=error
        )
        wrapped = RequestFailedError(f"the MLX engine failed a step: {error}")
        wrapped.__cause__ = error
        self._scheduler.fail_all(wrapped)

    def finish(self) -> None:
        """Nothing to tell anyone."""


class Engine:
    """Owns one loaded model and tokenizer and the thread that runs them."""

    _registry: ClassVar[dict[tuple[Any, ...], Engine]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _loading: ClassVar[dict[tuple[Any, ...], threading.Lock]] = {}

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        options: EngineOptions | None = None,
        batched: bool | None = None,
        sharing: StepSharing | None = None,
        context_length: int | None = None,
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
        self._applied: EngineOptions | None = None  # options the worker applied
        self._batched = batched  # None: batch when the model's caches allow it
        self.context_length: int | None = context_length or context_length_of(model)
        """The model's context window in tokens (from its config), if known."""
        self.prefix_cache: PrefixCache = PrefixCache(
            self._options.prefix_cache_entries, self._options.prefix_cache_bytes
        )
        """Recent KV caches reused across requests (read its counters freely;
        it is changed on the worker thread only)."""
        self._sharing = sharing
        """Set on every rank of a sharded model (distributed.py)."""
        self._lock = threading.Lock()
        self.failure: BaseException | None = None
        """Why the worker stopped, when it did not stop by `close()`."""
        self.closing = False
        self._handles: weakref.WeakSet[RequestHandle] = weakref.WeakSet()
        self._scheduler: Scheduler | None = None
        self._users: dict[int, weakref.ref[Any]] = {}  # pydantic objects: unhashable
        self._draft_key: str | None = None
        self._identity: str | None = None  # of the model, for the disk tier
        self._derived_budget: int | None = None
        self._token_bytes = kv_bytes_per_token(model)
        self._draft: Any = None
        self._key: tuple[Any, ...] | None = None
        self._worker = WorkerThread(
            f"langchain-mlx-engine[{name}]", self._serve, parked=self._end_queued
        )
        self.intake = Intake(
            name, self._worker, lambda: self._options, self._check, self.check_alive
        )
        """Admission and the queue (its `finished` counts how requests ended)."""
        _LIVE.add(self)
        self._worker.start()

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
        options: dict[str, Any] | None = None,
        group: Any = None,
        distributed: str | None = None,
        constraint_factory: Callable[[Any, Any], Any] | None = None,
        distributed_timeout: float | None = None,
        context_length: int | None = None,
    ) -> Engine:
        """The engine for a model folder or hub id, loaded by `loader` on first use.

        `options` (engine option names; None: keep) apply when the engine is
        created; asking an existing engine for different ones raises, since the
        engine is shared (change them with `configure`).

        With an MLX distributed `group` of more than one rank, `loader` loads
        this rank's shard and every rank runs the same engine steps
        (`lockstep.py`): on rank 0 this returns the engine; on the others it
        serves rank 0's steps and ends the process when rank 0 is done.
        `constraint_factory(tokenizer, spec)` rebuilds constraints there.
        `context_length` overrides the context window that a local folder's
        config.json states (then the loaded model's arguments).
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
                from langchain_mlx.engine.lockstep import log_memory

                log_memory(sharing, "loaded its part of the model")
            engine = cls(
                model,
                tokenizer,
                name=name or path,
                options=EngineOptions.chosen(options),
                sharing=sharing,
                context_length=context_length or context_length_in_folder(path),
            )
            engine._key = key
            if sharing is not None and not sharing.leader:
                from langchain_mlx.engine.lockstep import follow

                follow(engine._worker, sharing, engine)  # never returns
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
        options: dict[str, Any] | None = None,
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

    @classmethod
    def _one_sharded_engine(cls, key: tuple[Any, ...]) -> None:
        """Raise unless no other sharded engine runs (their steps would interleave)."""
        with cls._registry_lock:
            others = [
                e for k, e in cls._registry.items()
                if k != key and e.sharded is not None and e.alive
            ]  # fmt: skip
        if others:
            msg = (
                f"the sharded model {others[0].name!r} is already running in this "
                "process; one sharded model per process is supported (every rank "
                "steps it in lockstep). Close it first."
            )
            raise ValueError(msg)

    # -- lifecycle ------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the worker thread is taking requests."""
        return not self.closing and self._worker.running

    @property
    def sharded(self) -> tuple[int, int] | None:
        """(rank, group size) when this engine runs a sharded model, else None."""
        sharing = self._sharing
        return None if sharing is None else (sharing.rank, sharing.size)

    def check_alive(self) -> None:
        """Raise `EngineStoppedError` if the engine is closed or its worker gone."""
        if isinstance(self.failure, DistributedError):
            raise DistributedError(str(self.failure))
        if self.closing or not self._worker.running:
            what = "was closed" if self.closing else "has stopped"
            msg = (
                f"the MLX engine for {self.name!r} {what}; create the model again "
                "(e.g. ChatMLX(model=...)) to load it anew"
            )
            raise EngineStoppedError(msg)

    def close(self, *, wait: float | None = _CLOSE_WAIT_SECONDS) -> None:
        """Cancel what runs, free the model and its caches; idempotent.

        Requests still running end with `EngineStoppedError`. Every object using
        this model stops working (a new one loads the model again). Waits up to
        `wait` seconds (None: until it has) for the current step to finish and
        the prefix cache's disk writes to land, except on a thread that runs an
        event loop, which it never blocks (await `aclose()` there).
        """
        with self._registry_lock:
            if self._key is not None and self._registry.get(self._key) is self:
                del self._registry[self._key]
        _LIVE.discard(self)
        for ref in list(self._users.values()):  # objects holding the model let go
            user = ref()
            if user is not None:
                user._engine_closed()
        if not self.closing:
            self.closing = True
            self._worker.put(None)  # wake an idle worker
        if not self._worker.current and not _in_event_loop():
            self._worker.parked.wait(timeout=wait)

    async def aclose(self, *, wait: float | None = _CLOSE_WAIT_SECONDS) -> None:
        """`close()` for async code: waits for the worker without blocking the loop."""
        self.close(wait=0)
        await asyncio.to_thread(self._worker.parked.wait, wait)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until a closed engine has stopped (its disk writes landed)."""
        return self._worker.parked.wait(timeout)

    def attach(self, user: Any) -> None:
        """Tell `user` (weakly held) when the engine closes: `user._engine_closed()`."""
        key = id(user)
        self._users[key] = weakref.ref(user, lambda _: self._users.pop(key, None))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- options and the draft model: shared by every user of the model --------

    @property
    def options(self) -> EngineOptions:
        """The current batching and caching options."""
        return self._options

    def require_options(self, options: dict[str, Any] | None) -> None:
        """Raise ValueError if `options` (None: any) differ from this engine's."""
        asked = {k: v for k, v in (options or {}).items() if v is not None}
        differ = {
            k: v
            for k, v in asked.items()
            if _effective(k, getattr(self._options, k)) != _effective(k, v)
        }
        if differ:
            now = {k: getattr(self._options, k) for k in differ}
            msg = (
                f"the MLX engine for {self.name!r} is already running with {now}; "
                f"it is shared by every object that uses this model, so {differ} "
                "cannot apply. Pass the options where the model is first loaded, "
                "or change them for everyone with `.engine.configure(...)`."
            )
            raise ValueError(msg)

    def configure(self, **options: Any) -> None:
        """Change some `EngineOptions` for every user of this model (None: keep).

        Takes effect before the worker's next step (on a sharded model, in the
        step rank 0 shares them in, on every rank alike).
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

    def apply_options(self, scheduler: Scheduler, options: EngineOptions) -> None:
        """The worker: bring the scheduler and prefix cache in line with `options`.

        `options` is a snapshot the caller took once (on a sharded model, the
        one in the step plan), never re-read here: a `configure()` meanwhile
        waits for the next step.
        """
        scheduler.draft_model = self._draft
        if options is not self._applied:
            before = self._applied
            self._applied = options
            scheduler.max_batch_size = options.max_batch_size
            scheduler.kv_budget = self.kv_budget(options)
            self.prefix_cache.set_limits(
                options.prefix_cache_entries, options.prefix_cache_bytes
            )
            disk = (options.prefix_cache_dir, options.prefix_cache_disk_bytes)
            if before is None or disk != (
                before.prefix_cache_dir,
                before.prefix_cache_disk_bytes,
            ):
                self._attach_disk(*disk)

    def _attach_disk(self, folder: str | None, nbytes: int) -> None:
        """The worker: give the prefix cache its disk tier (or none)."""
        from langchain_mlx.engine.disk_cache import DiskPrefixCache, model_identity

        if folder is not None and self._sharing is not None:
            logger.warning(
                "prefix_cache_dir is ignored on a sharded model: each rank holds "
                "only its part of the KV state, and every rank must reuse alike"
            )
            folder = None
        tier = None
        if folder:  # "" turns it off
            if self._identity is None:
                self._identity = model_identity(self.model, self.tokenizer)
            tier = DiskPrefixCache(folder, nbytes, self._identity)
        self.prefix_cache.attach_disk(tier, self.model)

    def kv_budget(self, options: EngineOptions | None = None) -> int | None:
        """Bytes of KV memory running requests and the prefix cache may hold.

        `kv_memory_bytes`, else half of what MLX may still allocate with the
        model loaded (measured once; not on a sharded model, where every rank
        must decide alike: set it there). None: no bound.
        """
        chosen = (options or self._options).kv_memory_bytes
        if chosen is not None:
            return chosen or None
        if self._sharing is not None:
            return None
        if self._derived_budget is None:
            import mlx.core as mx

            free = int(mx.get_memory_limit()) - int(mx.get_active_memory())
            self._derived_budget = max(free // 2, 0)
        return self._derived_budget or None

    def kv_cost(self, prompt_tokens: int, max_tokens: int) -> int:
        """Bytes of KV memory a request alone may come to hold.

        Prompt + max_tokens, rounded up as mlx-lm's caches grow (256 positions).
        """
        return (prompt_tokens + max_tokens + 256) * self._token_bytes

    @property
    def applied_options(self) -> EngineOptions | None:
        """The options the worker last applied."""
        return self._applied

    def use_draft_model(self, path: str, loader: Loader) -> None:
        """Draft tokens with a small model of the same tokenizer (speculation).

        Loaded once by `loader`; the engine is shared, so asking for another
        draft model once one is in use raises `ValueError`.
        """
        key = canonical_path(path)
        if self._sharing is not None:
            msg = (
                "draft models are not supported on a sharded model (as in "
                "mlx_lm.server); prompt lookup (prompt_lookup=True) still drafts"
            )
            raise ValueError(msg)
        with self._lock:
            if self._draft_key == key:
                return
            if self._draft_key is not None:
                msg = (
                    f"the MLX engine for {self.name!r} already drafts with "
                    f"{self._draft_key!r}; it is shared by every object that uses "
                    "this model, so it cannot switch to another draft model"
                )
                raise ValueError(msg)
            model, tokenizer = loader()
            ours, theirs = self.tokenizer.vocab_size, tokenizer.vocab_size
            if ours != theirs:
                msg = (
                    f"draft model {path!r} has a vocabulary of {theirs} tokens, the "
                    f"model {self.name!r} {ours}: a draft model must use the same "
                    "tokenizer (pick one from the same family)"
                )
                raise ValueError(msg)
            self._draft_key = key
            self._draft = model

    # -- requests ---------------------------------------------------------------

    @functools.cached_property
    def wants_checkpoints(self) -> bool:
        """Whether its caches cannot be cut back to a shorter prefix.

        Then a prompt is reused only from a cached exact prefix, and requests
        should name their message boundaries (`Request.checkpoints`).
        """
        return self.model is not None and not caches_can_be_cut(self.model)

    @property
    def finished(self) -> collections.Counter[str]:
        """How many requests ended with each finish reason (and "error")."""
        return self.intake.finished

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
        submissions: list[Submission] = []
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

    def _admit(
        self, request: Request, loop: asyncio.AbstractEventLoop | None
    ) -> Submission:
        submission = self.intake.admit(request, loop)
        if self._sharing is not None:
            self._handles.add(submission.handle)  # to fail them if a rank dies
        return submission

    def _check(self, request: Request) -> None:
        """What every request must pass before it is counted (caller's thread)."""
        self.check_alive()
        if not request.prompt_ids:
            msg = "the prompt is empty: at least one token is needed to generate"
            raise ValueError(msg)
        self.check_fits(len(request.prompt_ids), request.settings.max_tokens)
        budget = self.kv_budget()
        cost = self.kv_cost(len(request.prompt_ids), request.settings.max_tokens)
        if budget is not None and cost > budget:
            msg = (
                f"this request may hold {cost / 2**20:.1f} MiB of KV memory "
                f"({len(request.prompt_ids)} prompt tokens + max_tokens="
                f"{request.settings.max_tokens}, {self._token_bytes} bytes per "
                f"token), more than the engine's budget of {budget / 2**20:.1f} "
                f"MiB (kv_memory_bytes) for {self.name!r}: it could never run. "
                "Lower max_tokens, shorten the prompt, or raise kv_memory_bytes."
            )
            raise EngineOverloadedError(msg)
        if self._sharing is not None:
            from langchain_mlx.engine.distributed import shareable_request

            shareable_request(request)

    def _enqueue(self, submissions: list[Submission]) -> None:
        self.intake.enqueue(submissions, self.stopped_error)

    @property
    def largest_batch(self) -> int:
        """The most requests this engine has decoded together so far."""
        return self._scheduler.largest_batch if self._scheduler is not None else 0

    # -- work on the worker thread between steps: prefixes --------------------------

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the worker thread between steps and return its result."""
        self._check_local_work()
        return self._worker.call(fn, self.check_alive)

    async def acall(self, fn: Callable[[], Any]) -> Any:
        """`call` for async code: awaits the result without blocking the loop."""
        self._check_local_work()
        return await self._worker.acall(fn)

    def _check_local_work(self) -> None:
        """Raise unless work outside the steps can run (alive, not sharded)."""
        self.check_alive()
        if self._sharing is not None:
            msg = (
                f"{self.name!r} is sharded across {self._sharing.size} ranks: work "
                "outside the shared steps (saving, loading or clearing prefixes, "
                "decisions) is not supported there (each rank holds only its "
                "part of the KV state)"
            )
            raise NotImplementedError(msg)

    def save_prefix(self, path: str | Path, prompt_ids: Sequence[int]) -> int:
        """Write the KV state of `prompt_ids` to `path` (`.safetensors`).

        Runs on the worker between decode steps (live streams pause while the
        prefix is prefilled). Returns the number of tokens saved.
        """
        ids = list(prompt_ids)
        self.check_fits(len(ids), 0)

        def save() -> int:
            return self.prefix_cache.save(path, self.model, ids, name=self.name)

        return int(self.call(save))

    def load_prefix(self, path: str | Path) -> int:
        """Load a prefix written by `save_prefix` into the prefix cache.

        Later prompts that start with it skip prefilling it. Returns its length
        in tokens.
        """
        return len(self.call(lambda: self.prefix_cache.load(path, self.model)))

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (waits for the worker to do it)."""
        self.call(self.prefix_cache.clear)

    # -- the worker -----------------------------------------------------------

    def _serve(self, worker: WorkerThread) -> None:
        try:
            self._loop()
        except BaseException:  # never leave without ending requests
            logger.exception("the MLX engine for %r stopped", self.name)
            self.closing = True
        finally:
            self._shut_down()

    def _loop(self) -> None:
        from langchain_mlx.engine.scheduler import Scheduler

        sharing = self._sharing
        scheduler = Scheduler(
            self.model,
            self.tokenizer,
            eos_ids=sorted(int(i) for i in self.tokenizer.eos_token_ids),
            prefix_cache=self.prefix_cache,
            on_done=self.intake.done,
            max_batch_size=self._options.max_batch_size,
            batched=self._batched,
            measured_costs=sharing is None,  # every rank must decide the same
            split_head=sharing is None,  # a sharded head may hold collectives
        )
        self._scheduler = scheduler
        driver: Driver
        if sharing is None:
            driver = LocalDriver(self, scheduler)
        else:
            from langchain_mlx.engine.lockstep import LockstepDriver

            driver = LockstepDriver(self, scheduler, sharing)
        while not self.closing:
            try:
                if not driver.step():
                    break
            except DistributedError:
                raise  # the group is gone: the engine stops
            except Exception as e:
                driver.fail(e)
        driver.finish()

    def fail_handles(self, error: DistributedError) -> None:
        """A sharded model's group is lost (another thread): fail every reader now.

        The worker may be blocked in a collective that never returns, so the
        readers are told here, not by the worker.
        """
        self.failure = error
        self.closing = True
        if self._sharing is not None:
            self._sharing.abandon()  # the ranks still alive end too
        for handle in list(self._handles):
            handle._put(DistributedError(str(error)))
        self._worker.put(None)

    def _shut_down(self) -> None:
        """End every request and free the model's memory."""
        if self._sharing is not None and self.failure is not None:
            self._sharing.abandon()  # the other ranks must not wait for rank 0
        scheduler = self._scheduler
        try:
            if scheduler is not None:
                scheduler.fail_all(self.stopped_error())
            self._end_queued()
        except Exception:  # never leave the thread with requests unanswered
            logger.exception("closing the MLX engine for %r", self.name)
        try:
            import gc

            import mlx.core as mx

            if scheduler is not None:
                scheduler.release()
            self.prefix_cache.attach_disk(None, None)  # pending writes land
            self.prefix_cache.clear()
            self.model = self.tokenizer = None
            self._scheduler = scheduler = None
            gc.collect()
            mx.clear_cache()
        except Exception:
            logger.exception("freeing the MLX engine for %r", self.name)

    def _end_queued(self) -> None:
        """End the requests and jobs still queued (the engine has stopped)."""
        for item in self._worker.leftovers():
            if isinstance(item, Job):
                item.future.set_exception(self.stopped_error())
            elif item is not None:
                for s in item:
                    self.intake.end_unscheduled(s, self.stopped_error())

    def stopped_error(self) -> EngineStoppedError:
        """The error for requests the engine cannot finish."""
        if isinstance(self.failure, DistributedError):
            return DistributedError(str(self.failure))
        return EngineStoppedError(
            f"the MLX engine for {self.name!r} was closed while the request ran; "
            "create the model again to load it anew"
        )


def _effective(name: str, value: Any) -> Any:
    """An option's meaning: no disk folder is the same whether None or ""."""
    return (value or None) if name == "prefix_cache_dir" else value


def _in_event_loop() -> bool:
    """Whether this thread is running an asyncio event loop (never block it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -- engines alive in this process: closed at interpreter exit -------------------

_LIVE: set[Engine] = set()


@atexit.register
def _close_all() -> None:
    for engine in list(_LIVE):
        engine.close(wait=_EXIT_WAIT_SECONDS)

"""The one place that runs MLX: an engine per loaded model, one worker thread.

Flow::

    Engine.submit(Request) -> RequestHandle          (caller thread)
        worker thread: generate_step -> detokenizer -> StopMatcher
            -> handle._put(Delta ...) ... handle._put(Final)
    for event in handle / async for event in handle  (caller: sync or asyncio)

Why a worker thread: mlx-lm generates on a thread-local stream, so every step
of one generation must run on the same thread (LangChain's default async path
hops threads between chunks and crashes with `[StreamContext] Destroyed in a
different thread`). One thread per model also serialises requests, so a model
is loaded once per process and its tokenizer's detokenizer is never shared
between two live generations.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_mlx._settings import GenerationSettings
from langchain_mlx._stop import StopMatcher

logger = logging.getLogger(__name__)

LogitsProcessor = Callable[[Any, Any], Any]

_POLL_SECONDS = 1.0  # how often a waiting reader checks that the worker lives
_PREFILL_STEP = 512  # prompt tokens per prefill chunk; cancellation is checked between


class GenerationTimeoutError(TimeoutError):
    """A generation ran past its `timeout`."""


class EngineStoppedError(RuntimeError):
    """The engine's worker thread is gone; the request cannot complete."""


class _CancelledError(Exception):
    """Raised inside the worker to abandon a request during prefill."""


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
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
    peak_memory_gb: float
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

    def __init__(self, model: Any, tokenizer: Any, *, name: str) -> None:
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        if not isinstance(tokenizer, TokenizerWrapper):
            tokenizer = TokenizerWrapper(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._eos_ids = frozenset(int(i) for i in tokenizer.eos_token_ids)
        self._queue: queue.SimpleQueue[tuple[RequestHandle, Request] | None] = (
            queue.SimpleQueue()
        )
        self._parked = threading.Event()
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
        return self._thread.is_alive() and not self._parked.is_set()

    def check_alive(self) -> None:
        """Raise `EngineStoppedError` if the worker thread is gone."""
        if not self.alive:
            msg = (
                f"the MLX engine for {self.name!r} has stopped (see the log for "
                "the error that ended it); create the model again to restart it"
            )
            raise EngineStoppedError(msg)

    def close(self) -> None:
        """Stop taking requests once the ones already queued are done."""
        if self.alive:
            self._queue.put(None)
            self._parked.wait(timeout=30)

    def submit(
        self, request: Request, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        """Queue a request; read its events from the returned handle."""
        self.check_alive()
        if not request.prompt_ids:
            msg = "the prompt is empty: at least one token is needed to generate"
            raise ValueError(msg)
        handle = RequestHandle(self, loop)
        self._queue.put((handle, request))
        return handle

    # -- the worker -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                # Park instead of returning: when this thread exits, MLX's
                # thread-local compile cache is destroyed and takes the GIL; at
                # interpreter exit that aborts the process ("terminate called
                # without an active exception"). A parked daemon thread never exits.
                self._parked.set()
                threading.Event().wait()
                continue
            handle, request = item
            if handle.cancelled:
                self.finished["cancelled"] += 1
                continue
            try:
                reason = self._generate(handle, request)
            except _CancelledError:
                reason = "cancelled"
                handle._put(_cancelled_final(len(request.prompt_ids)))
            except Exception as e:  # delivered to the caller, worker lives on
                reason = "error"
                logger.debug("generation failed", exc_info=True)
                handle._put(e)
            self.finished[reason] += 1

    def _generate(self, handle: RequestHandle, request: Request) -> str:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, generation_stream, wired_limit
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        s = request.settings
        if s.seed is not None:
            mx.random.seed(s.seed)
        sampler = make_sampler(
            s.temperature,
            top_p=s.top_p,
            min_p=s.min_p,
            min_tokens_to_keep=s.min_tokens_to_keep,
            top_k=s.top_k,
        )
        processors = make_logits_processors(
            None, s.repetition_penalty, s.repetition_context_size
        ) + list(request.logits_processors)
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        stops = StopMatcher(s.stop)
        start = time.perf_counter()
        deadline = start + s.timeout if s.timeout is not None else None

        def on_prefill(_done: int, _total: int) -> None:
            if handle.cancelled:
                raise _CancelledError
            _check_deadline(deadline, s.timeout)

        mx.reset_peak_memory()
        n_prompt = len(request.prompt_ids)
        n = 0
        first = start
        finish = "length"
        with wired_limit(self.model, [generation_stream]):
            steps = generate_step(
                mx.array(list(request.prompt_ids)),
                self.model,
                max_tokens=s.max_tokens,
                sampler=sampler,
                logits_processors=processors or None,
                prefill_step_size=_PREFILL_STEP,
                prompt_progress_callback=on_prefill,
            )
            try:
                for token, _logprobs in steps:
                    n += 1
                    if n == 1:
                        first = time.perf_counter()
                    if handle.cancelled:
                        finish = "cancelled"
                        break
                    if token in self._eos_ids:
                        finish = "stop"
                        break
                    detokenizer.add_token(token)
                    text = stops.push(detokenizer.last_segment)
                    if text:
                        handle._put(Delta(text))
                    if stops.stopped:
                        finish = "stop"
                        break
                    _check_deadline(deadline, s.timeout)
            finally:
                steps.close()
        detokenizer.finalize()
        tail = stops.push(detokenizer.last_segment) + stops.flush()
        if tail and finish != "cancelled":
            handle._put(Delta(tail))
        end = time.perf_counter()
        handle._put(
            Final(
                finish_reason=finish,
                prompt_tokens=n_prompt,
                generation_tokens=n,
                prompt_tps=n_prompt / max(first - start, 1e-9),
                generation_tps=(n - 1) / (end - first) if n > 1 else 0.0,
                time_to_first_token=first - start,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
            )
        )
        return finish


def _check_deadline(deadline: float | None, timeout: float | None) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        msg = (
            f"generation exceeded timeout={timeout}s; raise `timeout`, lower "
            "`max_tokens`, or pass a shorter prompt"
        )
        raise GenerationTimeoutError(msg)


def _cancelled_final(n_prompt: int) -> Final:
    return Final("cancelled", n_prompt, 0, 0.0, 0.0, 0.0, 0.0)

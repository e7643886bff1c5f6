"""A request's failures stay with that request.

A logits processor or sampler that raises marks its own request failed (the
batch step goes on with its logits untouched); errors of ours reach the caller
as they are, anything else as `RequestFailedError` with the cause chained; each
reader gets its own copy of a shared error. Used by the scheduler.
"""

from __future__ import annotations

import copy
from typing import Any

from langchain_mlx.engine.sampling import Sampler, skip_draws
from langchain_mlx.engine.types import (
    GenerationTimeoutError,
    LogitsProcessor,
    RequestFailedError,
)


def copy_error(error: BaseException) -> BaseException:
    """An error of its own for each reader (each raises it in its own thread)."""
    try:
        fresh = copy.copy(error)
    except Exception:  # an exception type that cannot be copied: share it
        return error
    fresh.__cause__ = error.__cause__
    fresh.__traceback__ = None
    return fresh


def request_error(doing: str, e: Exception) -> RequestFailedError:
    """`RequestFailedError` for a failure while `doing` something, cause chained."""
    error = RequestFailedError(
        f"the request failed while {doing}: {type(e).__name__}: {e}"
    )
    error.__cause__ = e
    return error


def guarded(processor: LogitsProcessor, live: Any) -> LogitsProcessor:
    """A processor whose failure ends its own request, not the whole batch."""

    def run(tokens: Any, logits: Any) -> Any:
        if live.error is not None:
            return logits
        try:
            return processor(tokens, logits)
        except Exception as e:  # typed errors (a grammar's) reach the caller as-is
            live.error = e if _is_ours(e) else request_error("masking logits", e)
            return logits

    return run


class _GuardedSampler:
    """A sampler whose failure ends its own request (it keeps `skip`)."""

    def __init__(self, sampler: Sampler, live: Any) -> None:
        self._sampler = sampler
        self._live = live

    def __call__(self, logprobs: Any) -> Any:
        import mlx.core as mx

        if self._live.error is None:
            try:
                return self._sampler(logprobs)
            except Exception as e:
                self._live.error = request_error("sampling", e)
        return mx.argmax(logprobs, axis=-1)

    def skip(self, n: int) -> None:
        """Pass on `skip_draws` (a seeded sampler's key position)."""
        skip_draws(self._sampler, n)


def guarded_sampler(sampler: Sampler, live: Any) -> Sampler:
    """A sampler whose failure ends its own request (greedy ones cannot fail)."""
    from mlx_lm.sample_utils import greedy_sampler

    if sampler is greedy_sampler:
        return greedy_sampler  # shared: a greedy batch samples in one call
    return _GuardedSampler(sampler, live)


def _is_ours(e: Exception) -> bool:
    return type(e).__module__.startswith("langchain_mlx")


def timeout_error(live: Any, now: float) -> GenerationTimeoutError:
    """The error of a request (`live`) whose `timeout` has passed at `now`."""
    timeout = live.request.settings.timeout
    msg = (
        f"generation exceeded timeout={timeout}s after {now - live.submitted:.1f}s; "
        "raise `timeout`, lower `max_tokens`, or pass a shorter prompt"
    )
    return GenerationTimeoutError(msg)

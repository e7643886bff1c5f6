"""The engine's worker on a sharded model: every rank steps in lockstep.

`Lockstep` is the part of `Engine` (worker.py) that runs when the model is
sharded over an MLX distributed group (distributed.py has the group, the plan
and its exchange). Each worker iteration, rank 0 turns what it received into
a `StepPlan` and shares it; every rank then applies the plan to its own
scheduler and steps, so all ranks run the same forward passes. The other
ranks never return from constructing the model (`_follow`); a rank that is
lost fails rank 0's readers at once (`_group_lost`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.types import DistributedError, EngineOptions

if TYPE_CHECKING:
    from langchain_mlx.engine.distributed import StepPlan, StepSharing
    from langchain_mlx.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


class Lockstep:
    """Mixin of `Engine`: the sharded worker loop (uses the engine's state)."""

    # the engine's state this part reads and sets (defined by Engine)
    name: str
    tokenizer: Any
    _sharing: StepSharing | None
    _failure: BaseException | None
    _closing: bool
    _handles: weakref.WeakSet[RequestHandle]
    _queue: queue.SimpleQueue[Any]
    _options: EngineOptions
    _applied: EngineOptions | None
    _parked: threading.Event
    _registry: ClassVar[dict[tuple[Any, ...], Any]]
    _registry_lock: ClassVar[threading.Lock]

    def _take_items(self, *, block: bool) -> list[Any]:
        raise NotImplementedError

    def _request_done(self, reason: str) -> None:
        raise NotImplementedError

    def _stopped_error(self) -> DistributedError | Exception:
        raise NotImplementedError

    def _apply_options(self, scheduler: Scheduler) -> None:
        raise NotImplementedError

    @classmethod
    def _one_sharded_engine(cls, key: tuple[Any, ...]) -> None:
        """Raise unless no other sharded engine runs (their steps would interleave)."""
        with cls._registry_lock:
            others = [
                e for k, e in cls._registry.items()
                if k != key and e._sharing is not None and e.alive
            ]  # fmt: skip
        if others:
            msg = (
                f"the sharded model {others[0].name!r} is already running in this "
                "process; one sharded model per process is supported (every rank "
                "steps it in lockstep). Close it first."
            )
            raise ValueError(msg)

    @property
    def sharded(self) -> tuple[int, int] | None:
        """(rank, group size) when this engine runs a sharded model, else None."""
        sharing = self._sharing
        return None if sharing is None else (sharing.rank, sharing.size)

    def _start_group(self, sharing: StepSharing) -> None:
        """First step of every rank: agree on the model, seed and heartbeat."""
        sharing.tokenizer = self.tokenizer
        sharing.on_lost = self._group_lost
        self._guard_group(sharing.hello, int(self.tokenizer.vocab_size))

    def _end_group(self, sharing: StepSharing) -> None:
        """Rank 0 closes the model: the other ranks end (status 0)."""
        from langchain_mlx.engine.distributed import StepPlan

        self._guard_group(sharing.share, StepPlan(close=True))
        sharing.end()

    def _follow(self) -> None:
        """A rank > 0: serve rank 0's steps, then end the process."""
        self._parked.wait()
        sharing = self._sharing
        assert sharing is not None
        log_memory(sharing, "stops")
        if not sharing.closed_by_leader:
            logger.error("%s", self._failure or "the sharded engine stopped")
        sharing.exit_follower(0 if sharing.closed_by_leader else 1)

    def _group_lost(self, error: DistributedError) -> None:
        """Rank 0 (heartbeat thread): a rank is gone; fail every reader now.

        The worker may be blocked in a collective that never returns, so the
        readers are told here, not by the worker.
        """
        self._failure = error
        self._closing = True
        if self._sharing is not None:
            self._sharing.abandon()  # the ranks still alive end too
        for handle in list(self._handles):
            handle._put(DistributedError(str(error)))
        self._queue.put(None)

    def _guard_group(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a collective; a failure stops the engine with DistributedError."""
        try:
            return fn(*args)
        except DistributedError as e:
            self._failure = e
            raise

    def _step_shared(self, scheduler: Scheduler, sharing: StepSharing) -> bool:
        """One worker iteration of a sharded model, the same on every rank.

        Rank 0 turns what it received into a `StepPlan` and shares it; then
        every rank applies the plan to its scheduler and steps. False: stop.
        """
        from langchain_mlx.engine.distributed import StepPlan, shareable_request

        mine: dict[int, Any] = {}
        plan = StepPlan()
        if sharing.leader:
            submissions = self._take_items(block=not scheduler.busy)
            if self._closing:
                for s in submissions:
                    s.handle._put(self._stopped_error())
                    self._request_done("error")
                return False
            mine = {s.number: s for s in submissions}
            options = self._options
            plan = StepPlan(
                requests=[
                    (s.number, s.request, shareable_request(s.request)[1])
                    for s in submissions
                ],
                gone=scheduler.gone(),
                prefill_chunk=scheduler.prefill_chunk,
                options=options if options is not self._applied else None,
            )
        try:
            plan = self._guard_group(sharing.share, plan)
            if self._failure is not None:  # lost meanwhile: the sum is not to trust
                raise self._failure
        except DistributedError as e:
            for s in mine.values():  # taken from the queue, not yet scheduled
                s.handle._put(DistributedError(str(e)))
                self._request_done("error")
            raise
        if plan.close:
            sharing.closed_by_leader = True
            sharing.end()
            return False
        self._apply_plan(scheduler, plan, mine)
        scheduler.step(gone=plan.gone)
        return True

    def _apply_plan(
        self, scheduler: Scheduler, plan: StepPlan, mine: dict[int, Any]
    ) -> None:
        """Admit the plan's requests and options (a follower's copies read nothing)."""
        assert self._sharing is not None
        if plan.options is not None:
            self._options = plan.options
        for number, request, _ in plan.requests:
            s = mine.get(number)
            if s is not None:
                scheduler.add(s.handle, s.request, s.submitted, number)
            else:
                sink = self._sharing.sink()
                scheduler.add(sink, request, time.perf_counter(), number)
        self._apply_options(scheduler)
        scheduler.prefill_chunk = plan.prefill_chunk


def log_memory(sharing: StepSharing, what: str) -> None:
    """Log this rank's memory (the benchmark reads it from every rank)."""
    import mlx.core as mx

    logger.info(
        "rank %d of %d %s: %.1f MB active, %.1f MB peak",
        sharing.rank, sharing.size, what,
        mx.get_active_memory() / 1e6, mx.get_peak_memory() / 1e6,
    )  # fmt: skip

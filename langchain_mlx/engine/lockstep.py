"""The engine's driver on a sharded model: every rank steps in lockstep.

distributed.py has the group, the plan and its exchange; this is the worker's
loop around them. Each iteration, rank 0 turns what it received into a
`StepPlan` and shares it; every rank applies the plan to its own scheduler and
steps, so all ranks run the same forward passes. The other ranks never return
from constructing the model (`follow`); a rank that is lost fails rank 0's
readers at once (`Engine.fail_handles`).

One rank-invariant policy: everything that must be the same on every rank is
decided by rank 0 and carried in the plan, or computed from what every rank
has alike, never from a rank's own clock, memory or random state:

- new requests, with a random seed each when they sample without one
  (`request_seed`: the group's shared seed and the submission number), so no
  rank draws from MLX's process-global generator (another model in the same
  process would move it on one rank only);
- cancellations and timeouts (rank 0's readers and clock), the prefill step
  size (rank 0's measurement); draft lengths follow a fixed cost model;
- engine options, applied as the plan carries them (a `configure()` on rank 0
  meanwhile waits for the next plan);
- the prefix cache is bounded in tokens, not bytes (`PrefixCache.
  count_tokens`): KV bytes per rank differ (head groups, uneven pipeline
  stages), so byte budgets would evict, and then reuse, differently per rank.

Before each forward pass the ranks check that they agree: a digest of the
step's decisions (which requests run, from how many cached tokens, how far
they are; what the prefix cache holds) is summed across the group, and a
difference raises `DistributedError` on every rank at once instead of a hang
or a wrong sum in the model's collectives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from langchain_mlx.engine.intake import Intake, Submission
from langchain_mlx.engine.model_facts import kv_bytes_per_token
from langchain_mlx.engine.types import DistributedError, EngineOptions

if TYPE_CHECKING:
    from langchain_mlx.engine.distributed import StepPlan, StepSharing
    from langchain_mlx.engine.scheduler import Scheduler
    from langchain_mlx.engine.thread import WorkerThread

logger = logging.getLogger(__name__)


class Host(Protocol):
    """What the driver uses of the engine that runs it (engine.py's `Engine`)."""

    model: Any
    tokenizer: Any
    intake: Intake
    closing: bool
    failure: BaseException | None

    @property
    def options(self) -> EngineOptions:
        """The options as last configured (read once per plan)."""

    def apply_options(self, scheduler: Scheduler, options: EngineOptions) -> None:
        """Apply an options snapshot to the scheduler and prefix cache."""

    def stopped_error(self) -> Exception:
        """The error for requests the engine cannot finish."""

    def fail_handles(self, error: DistributedError) -> None:
        """The group is lost: fail every reader now (another thread)."""


class LockstepDriver:
    """Rank 0 plans each step; every rank applies the plan and steps."""

    def __init__(
        self, engine: Host, scheduler: Scheduler, sharing: StepSharing
    ) -> None:
        self._engine = engine
        self._scheduler = scheduler
        self._sharing = sharing
        self._options: EngineOptions = engine.options  # as every rank applied
        scheduler.prefix_count_tokens(kv_bytes_per_token(engine.model))
        sharing.tokenizer = engine.tokenizer
        sharing.on_lost = engine.fail_handles
        self._guard(sharing.hello, int(engine.tokenizer.vocab_size))

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run a collective; a failure stops the engine with DistributedError."""
        try:
            return fn(*args)
        except DistributedError as e:
            self._engine.failure = e
            raise

    def step(self) -> bool:
        """One worker iteration, the same on every rank. False: stop."""
        from langchain_mlx.engine.distributed import StepPlan, shareable_request

        engine, scheduler, sharing = self._engine, self._scheduler, self._sharing
        mine: dict[int, Submission] = {}
        plan = StepPlan()
        if sharing.leader:
            submissions = engine.intake.take(block=not scheduler.busy)
            if engine.closing:
                for s in submissions:
                    engine.intake.end_unscheduled(s, engine.stopped_error())
                return False
            submissions = [self._seeded(s) for s in submissions]
            mine = {s.number: s for s in submissions}
            options = engine.options  # one snapshot: what this plan carries
            plan = StepPlan(
                requests=[
                    (s.number, s.request, shareable_request(s.request)[1])
                    for s in submissions
                ],
                gone=scheduler.gone(),
                prefill_chunk=scheduler.prefill_chunk,
                options=options if options is not self._options else None,
            )
        try:
            plan = self._guard(sharing.share, plan)
            if engine.failure is not None:  # lost meanwhile: the sum is not to trust
                raise engine.failure
        except DistributedError as e:
            for s in mine.values():  # taken from the queue, not yet scheduled
                engine.intake.end_unscheduled(s, DistributedError(str(e)))
            raise
        if plan.close:
            sharing.closed_by_leader = True
            sharing.end()
            return False
        self._apply(plan, mine)
        scheduler.step(gone=plan.gone, agree=self._agree)
        return True

    def _seeded(self, s: Submission) -> Submission:
        """Rank 0: a sampled request without a seed gets one from the group's."""
        settings = s.request.settings
        if settings.temperature == 0 or settings.seed is not None:
            return s
        seed = request_seed(self._sharing.seed, s.number)
        request = dataclasses.replace(
            s.request, settings=dataclasses.replace(settings, seed=seed)
        )
        return dataclasses.replace(s, request=request)

    def _apply(self, plan: StepPlan, mine: dict[int, Submission]) -> None:
        """Admit the plan's requests and options (a follower's copies read nothing)."""
        if plan.options is not None:
            self._options = plan.options
        for number, request, _ in plan.requests:
            s = mine.get(number)
            if s is not None:
                self._scheduler.add(s.handle, s.request, s.submitted, number)
            else:
                sink = self._sharing.sink()
                self._scheduler.add(sink, request, time.perf_counter(), number)
        self._engine.apply_options(self._scheduler, self._options)
        self._scheduler.prefill_chunk = plan.prefill_chunk

    def _agree(self, digest: int) -> None:
        self._guard(self._sharing.agree, digest)

    def fail(self, error: Exception) -> None:
        """A step failed here: the ranks may no longer agree, stop them all."""
        self._engine.failure = self._sharing.broken(f"a step failed here: {error!r}")
        raise self._engine.failure from error

    def finish(self) -> None:
        """Rank 0 closed the model: the other ranks end too (exit 0)."""
        from langchain_mlx.engine.distributed import StepPlan

        if self._sharing.leader and self._engine.failure is None:
            self._guard(self._sharing.share, StepPlan(close=True))
            self._sharing.end()


def request_seed(group_seed: int, number: int) -> int:
    """A request's seed on a sharded model: the same on every rank, its own."""
    return (group_seed * 1_000_003 + number * 7_919) % (1 << 31)


def follow(worker: WorkerThread, sharing: StepSharing, engine: Host) -> None:
    """A rank > 0: serve rank 0's steps, then end the process."""
    worker.parked.wait()
    log_memory(sharing, "stops")
    if not sharing.closed_by_leader:
        logger.error("%s", engine.failure or "the sharded engine stopped")
    sharing.exit_follower(0 if sharing.closed_by_leader else 1)


def log_memory(sharing: StepSharing, what: str) -> None:
    """Log this rank's memory (the benchmark reads it from every rank)."""
    import mlx.core as mx

    logger.info(
        "rank %d of %d %s: %.1f MB active, %.1f MB peak",
        sharing.rank, sharing.size, what,
        mx.get_active_memory() / 1e6, mx.get_peak_memory() / 1e6,
    )  # fmt: skip

"""A sharded model: every rank of an MLX distributed group runs the same engine.

Under `mlx.launch` (ring, JACCL, NCCL or MPI), each rank loads its part of
the weights (models/sharding.py: mlx-lm's `sharded_load`, tensor or pipeline
parallel) and starts the same `Engine`. Rank 0 runs the application; the
other ranks never return from constructing the model: their worker executes
the steps rank 0 decides.

Each worker iteration on rank 0 turns what it received into a `StepPlan` (new
requests, the ones to drop, the prefill step size, changed options, or the
end) and shares it before stepping, the way `mlx_lm.server` shares requests:
the plan is pickled and summed across the group (`mx.distributed.all_sum`,
every other rank adds zeros). Then every rank applies the same plan to the
same scheduler state, so batches, prefill chunks, grammar fast-forward,
speculation and sampling agree, and the collectives inside the model's
forward passes meet in the same order. What would differ between ranks is
decided by rank 0 or fixed: cancellations and timeouts (rank 0's clock and
readers), the prefill step (rank 0's measurement), draft lengths (a fixed
cost model instead of measured step times), the random seed (shared once).

The plan travels on mlx-lm's generation stream, the stream the model runs on,
so it is ordered with the model's own collectives on every rank.

Failures: a rank's death is learnt from the heartbeat (heartbeat.py), not
from the collectives, which MLX's ring backend may let return wrong sums or
block after a death. Rank 0 then fails its readers with `DistributedError`;
the other ranks exit (status 1; 0 when rank 0 closed the model or exited
normally). A step that fails on any rank stops the group, since the ranks
could no longer agree. Forming the group has a timeout, kept by a watchdog
process (a missing rank blocks `mx.distributed.init` forever, GIL held).
The sharded worker loop itself is in lockstep.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.heartbeat import Heartbeat, leader_host
from langchain_mlx.engine.types import (
    DistributedError,
    EngineOptions,
    Event,
    Request,
)

logger = logging.getLogger(__name__)

DISTRIBUTED_MODES = ("tensor", "pipeline")
GROUP_TIMEOUT_SECONDS = 60.0

ConstraintFactory = Callable[[Any, Any], Any]  # (tokenizer, spec) -> Constraint


@dataclass
class StepPlan:
    """What every rank does in one worker iteration (decided by rank 0)."""

    requests: list[tuple[int, Request, Any]] = field(default_factory=list)
    """New requests: (submission number, request without its constraint,
    the constraint's spec or None)."""
    gone: dict[int, str] = field(default_factory=dict)
    """Requests to drop: submission number -> "cancelled" | "timeout"."""
    prefill_chunk: int = 16
    options: EngineOptions | None = None
    """The engine options, when they changed (`Engine.configure`)."""
    close: bool = False


@dataclass(frozen=True)
class Hello:
    """Rank 0's first message: what it loaded, and the shared random seed."""

    model: str
    mode: str
    vocab_size: int
    seed: int
    heartbeat_port: int | None = None


def check_mode(mode: str | None) -> None:
    """Raise ValueError unless `mode` is None, "tensor" or "pipeline"."""
    if mode is not None and mode not in DISTRIBUTED_MODES:
        msg = (
            f"distributed must be 'tensor', 'pipeline' or None, got {mode!r}: "
            "'tensor' splits every layer across the ranks, 'pipeline' gives "
            "each rank a run of whole layers"
        )
        raise ValueError(msg)


_group: Any = None
_group_lock = threading.Lock()


def join_group(timeout: float = GROUP_TIMEOUT_SECONDS) -> Any:
    """The process's MLX distributed group (size 1 outside `mlx.launch`).

    Formed once per process. `mx.distributed.init` waits for the other ranks
    without a timeout and without releasing the GIL, so no thread of this
    process can give up on it: a small watchdog process does. If the group
    has not formed after `timeout` seconds it prints why and ends this
    process. A rank that cannot connect raises `DistributedError`.
    """
    global _group
    with _group_lock:
        if _group is not None:
            return _group
        import mlx.core as mx

        if not _launched():
            _group = mx.distributed.init()  # a group of one
            return _group
        rank = os.environ.get("MLX_RANK", "?")
        advice = (
            "Start every rank (e.g. `mlx.launch --backend ring -n 2 --python "
            "<python> app.py`, or with a hostfile for several machines), check "
            "that they reach each other, or raise distributed_timeout."
        )
        watchdog = _watchdog(
            timeout,
            f"langchain-mlx: rank {rank} could not form the MLX distributed group "
            f"within {timeout:g} s (distributed_timeout); stopping it. {advice}",
        )
        try:
            _group = mx.distributed.init(strict=True)
        except Exception as e:
            msg = (
                f"rank {rank} could not form the MLX distributed group ({e}). {advice}"
            )
            raise DistributedError(msg) from e
        finally:
            if watchdog.stdin is not None:
                watchdog.stdin.close()  # formed or failed: the watchdog leaves
            watchdog.wait()
        return _group


_WATCHDOG = """
import os, select, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if not ready:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        time.sleep(3)
"""


def _watchdog(timeout: float, message: str) -> subprocess.Popen[bytes]:
    """A process that ends this one after `timeout` s unless its stdin closes."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
        stdin=subprocess.PIPE,
    )


def _launched() -> bool:
    """Whether this process was started as a rank of a distributed job."""
    env = os.environ
    return bool(
        env.get("MLX_HOSTFILE")
        or env.get("MLX_JACCL_COORDINATOR")
        or env.get("MLX_WORLD_SIZE")  # NCCL
        or env.get("OMPI_COMM_WORLD_SIZE")
        or env.get("PMI_SIZE")
    )


class _Sink(RequestHandle):
    """A follower's handle: nobody reads it, so events are dropped."""

    def __init__(self) -> None:
        super().__init__(lambda: None)

    def _put(self, event: Event | BaseException) -> None:
        del event


class StepSharing:
    """Rank 0 shares each `StepPlan`; the other ranks receive it."""

    def __init__(self, group: Any, *, model: str, mode: str) -> None:
        self.group = group
        self.rank = int(group.rank())
        self.size = int(group.size())
        self.model = model
        self.mode = mode
        self.leader = self.rank == 0
        self.constraint_factory: ConstraintFactory | None = None
        self.tokenizer: Any = None
        self.closed_by_leader = False
        """A follower: rank 0 sent the end (exit 0); else the group broke."""
        self.on_lost: Callable[[DistributedError], None] = lambda e: None
        """Rank 0: called (on another thread) when a rank is gone."""
        self.timeout = GROUP_TIMEOUT_SECONDS
        self._heartbeat: Heartbeat | None = None
        self._chunk = -1  # the prefill step of the last plan sent or received
        self.seed = 0
        """The group's random seed (rank 0's, shared in `hello`)."""

    # -- the exchange -----------------------------------------------------------

    def _exchange(self, payload: bytes | None) -> bytes:
        """Rank 0's bytes on every rank (a sum: the others add zeros)."""
        import mlx.core as mx
        import numpy as np
        from mlx_lm.generate import generation_stream

        try:
            with mx.stream(generation_stream):
                n = len(payload) if payload is not None else 0
                size = mx.distributed.all_sum(
                    mx.array([n], dtype=mx.int64), group=self.group
                )
                n = int(np.asarray(size)[0])
                if n == 0:  # nothing to say: one collective, not two
                    return b""
                data = (
                    mx.array(np.frombuffer(payload, dtype=np.uint8))
                    if payload is not None
                    else mx.zeros((n,), dtype=mx.uint8)
                )
                total = mx.distributed.all_sum(data, group=self.group)
                return np.asarray(total).tobytes()
        except Exception as e:
            raise self.broken(e) from e

    def broken(self, error: BaseException | str) -> DistributedError:
        """The error for a group that cannot go on."""
        return DistributedError(
            f"rank {self.rank} of the {self.size} ranks running {self.model!r} "
            f"({self.mode} parallel) lost the group: {error}. A rank died or "
            "its connection broke; the sharded model cannot go on. Restart "
            "every rank (mlx.launch ...)."
        )

    def hello(self, vocab_size: int) -> None:
        """Agree on the model and the random seed (first step of every rank)."""
        import mlx.core as mx

        seed = int.from_bytes(os.urandom(4), "little")
        host = leader_host()
        heartbeat = Heartbeat(self._lost) if host is not None else None
        port = heartbeat.listen() if heartbeat is not None and self.leader else None
        mine = Hello(self.model, self.mode, vocab_size, seed, port)
        theirs = pickle.loads(  # rank 0 of our own group
            self._exchange(pickle.dumps(mine) if self.leader else None)
        )
        if (theirs.mode, theirs.vocab_size) != (self.mode, vocab_size):
            msg = (
                f"rank {self.rank} loaded {self.model!r} ({self.mode}, vocabulary "
                f"{vocab_size}) but rank 0 loaded {theirs.model!r} ({theirs.mode}, "
                f"vocabulary {theirs.vocab_size}): run the same script with the "
                "same model on every rank"
            )
            raise DistributedError(msg)
        self.seed = theirs.seed  # requests' own seeds derive from it
        mx.random.seed(theirs.seed)  # anything else random starts alike
        if heartbeat is not None and theirs.heartbeat_port is not None:
            self._heartbeat = heartbeat
            if self.leader:
                heartbeat.accept(self.size - 1, self.timeout)
            else:
                assert host is not None
                heartbeat.connect(host, theirs.heartbeat_port, self.timeout)
        else:
            logger.warning(
                "no rank 0 address in MLX_HOSTFILE: a rank that dies is noticed "
                "only if MLX's collectives report it"
            )

    def agree(self, digest: int) -> None:
        """Raise `DistributedError` on every rank unless all ranks' digests match.

        One small collective: the sum of each rank's digest and its square is
        `size * d` and `size * d**2` exactly when every rank has `d`.
        """
        import mlx.core as mx
        import numpy as np
        from mlx_lm.generate import generation_stream

        d = digest % (1 << 20)
        try:
            with mx.stream(generation_stream):
                total = mx.distributed.all_sum(
                    mx.array([d, d * d], dtype=mx.int64), group=self.group
                )
                got = [int(v) for v in np.asarray(total)]
        except Exception as e:
            raise self.broken(e) from e
        if got != [self.size * d, self.size * d * d]:
            msg = (
                f"rank {self.rank} of the {self.size} ranks running {self.model!r} "
                "no longer agrees with the others on the step (which requests "
                "run, from how much cached prefix, or what the prefix cache "
                "holds): something was decided from one rank's own state, or a "
                "request failed on one rank only. The sharded model stops rather "
                "than hang; restart every rank (mlx.launch ...)."
            )
            raise DistributedError(msg)

    def _lost(self, why: str) -> None:
        """The heartbeat ended without a goodbye: a rank is gone."""
        if self.leader:
            self.on_lost(self.broken(why))
        else:
            logger.error("%s", self.broken(why))
            self.exit_follower(1)

    def end(self) -> None:
        """A clean end of the group (rank 0 closed the model)."""
        if self._heartbeat is not None:
            self._heartbeat.bye()

    def abandon(self) -> None:
        """Rank 0 gives up on a broken group: the other ranks end now (status 1)."""
        if self._heartbeat is not None:
            self._heartbeat.drop()

    def share(self, plan: StepPlan) -> StepPlan:
        """Rank 0: send `plan`. Others: the plan rank 0 sent (`plan` unused)."""
        if self.leader:
            if plan == StepPlan(prefill_chunk=self._chunk):
                self._exchange(None)  # an ordinary step: "go on" is enough
                return plan
            shareable = dataclasses.replace(
                plan,
                requests=[
                    (n, dataclasses.replace(r, constraint=None), spec)
                    for n, r, spec in plan.requests
                ],
            )
            self._exchange(pickle.dumps(shareable))
            self._chunk = plan.prefill_chunk
            return plan
        payload = self._exchange(None)
        if not payload:
            return StepPlan(prefill_chunk=self._chunk)
        try:  # a rank that cannot take the plan can no longer follow
            received: StepPlan = pickle.loads(payload)
            received.requests = [
                (n, self._rebuild(r, spec), spec) for n, r, spec in received.requests
            ]
        except Exception as e:
            msg = f"could not take rank 0's step ({e!r})"
            raise self.broken(msg) from e
        self._chunk = received.prefill_chunk
        return received

    def _rebuild(self, request: Request, spec: Any) -> Request:
        if spec is None:
            return request
        if self.constraint_factory is None:
            msg = "a constrained request arrived but no constraint_factory is set"
            raise DistributedError(msg)
        constraint = self.constraint_factory(self.tokenizer, spec)
        return dataclasses.replace(request, constraint=constraint)

    @staticmethod
    def sink() -> RequestHandle:
        """A handle for a follower's copy of a request."""
        return _Sink()

    @staticmethod
    def exit_follower(code: int) -> None:
        """End a follower process (its app script must not run on)."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # exiting anyway
                stream.flush()
        os._exit(code)


def shareable_request(request: Request) -> tuple[Request, Any]:
    """Check that `request` can run on every rank; return it and its constraint spec.

    Raises ValueError for what cannot be sent to the other ranks.
    """
    if request.logits_processors:
        msg = (
            "custom logits processors cannot run on a sharded model: every rank "
            "must apply them and Python callables cannot be sent to the other "
            "ranks; use the built-in settings (repetition_penalty, a schema or "
            "tools) instead"
        )
        raise ValueError(msg)
    constraint = request.constraint
    if constraint is None:
        return request, None
    spec = getattr(constraint, "spec", None)
    if spec is None:
        msg = (
            "this request's constraint has no `spec`, so the other ranks of the "
            "sharded model cannot rebuild it"
        )
        raise ValueError(msg)
    return request, spec

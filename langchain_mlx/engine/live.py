"""One request inside the scheduler: its state from submit to `Final`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from langchain_mlx.engine.drafts import SpeculationStats
from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.text import RequestText
from langchain_mlx.engine.types import Final, Request

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Live:
    """One request from submit to its `Final`."""

    handle: RequestHandle
    request: Request
    submitted: float
    number: int = -1  # the engine's submission number (shared by every rank)
    uid: int = -1
    admitted: float = 0.0
    first: float | None = None
    cached: int = 0
    cache_source: str | None = None  # where `cached` came from: "memory" | "disk"
    generated: int = 0
    decoding: bool = False
    waits_for: int | None = None  # uid of the sequence prefilling its start
    checked: bool = False  # looked for a shared start already
    error: BaseException | None = None
    text: RequestText | None = None
    last_token: int | None = None
    stats: SpeculationStats | None = None  # while decoded alone

    @property
    def deadline(self) -> float | None:
        """When its `timeout` runs out (perf_counter seconds), if it has one."""
        timeout = self.request.settings.timeout
        return None if timeout is None else self.submitted + timeout


def final_event(live: Live, reason: str) -> Final:
    """The request's last event: usage, timings, speculation counts."""
    import mlx.core as mx

    end = time.perf_counter()
    first = live.first if live.first is not None else end
    n_prompt = len(live.request.prompt_ids)
    n = live.generated
    return Final(
        finish_reason=reason,
        prompt_tokens=n_prompt,
        generation_tokens=n,
        prompt_tps=(n_prompt - live.cached)
        / max(first - (live.admitted or first), 1e-9),
        generation_tps=(n - 1) / (end - first) if n > 1 else 0.0,
        time_to_first_token=first - live.submitted,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        cached_tokens=live.cached,
        cache_source=live.cache_source if live.cached else None,
        constrained=live.request.constraint is not None,
        forced_tokens=live.stats.forced if live.stats else 0,
        drafted_tokens=live.stats.drafted if live.stats else 0,
        accepted_tokens=live.stats.accepted if live.stats else 0,
    )


def finish_reason(live: Live, finish: str) -> str:
    """The finish reason: "length" only when the output is really cut.

    A grammar may be complete exactly at `max_tokens`.
    """
    constraint = live.request.constraint
    if finish == "length" and constraint is not None and live.last_token is not None:
        try:
            if constraint.complete_after(live.last_token):
                return "stop"
        except Exception:  # the grammar's state is unknown: say it was cut
            logger.debug("constraint state unknown", exc_info=True)
    return finish

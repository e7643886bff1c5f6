"""Fixed draft costs for tests that assert drafts happen."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def fixed_costs(engine: Any) -> Iterator[None]:
    """Decide drafts by the fixed cost model, not this machine's clock.

    Whether a draft pays is decided from measured step times; on a loaded
    machine those are noise, so the decision (and `drafted_tokens`) would
    depend on the load. The fixed model (a sharded engine's: a pass over n
    tokens costs 1 + 0.3 (n - 1) one-token passes) makes it the same
    everywhere. Swapped on the engine's own thread, between requests, and
    back afterwards (engines are shared by every test on the same model).
    """
    from langchain_mlx.engine.drafts import StepCosts

    scheduler = engine.call(lambda: engine._scheduler)
    measured = scheduler._costs

    def swap(costs: StepCosts) -> None:
        scheduler._costs = costs

    engine.call(lambda: swap(StepCosts(measured=False)))
    try:
        yield
    finally:
        engine.call(lambda: swap(measured))

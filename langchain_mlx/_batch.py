"""`batch` / `abatch` whose requests reach the engine together.

`Runnable.batch` runs `invoke` per input in a thread pool (capped at a few
threads by default) and `abatch` per input in tasks: their requests reach the
engine whenever each thread or task gets there, so how they group depends on
scheduling. Here each input runs inside a slot of one `SubmissionGroup` (see
engine/intake.py), which queues the requests together once every running input
has submitted (or failed before submitting), so they decode as one batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import ContextThreadPoolExecutor, get_config_list
from langchain_core.runnables.utils import gather_with_concurrency

from langchain_mlx.engine.intake import SubmissionGroup


def batch_together(
    invoke: Callable[..., Any],
    inputs: Sequence[Any],
    config: RunnableConfig | Sequence[RunnableConfig] | None,
    *,
    return_exceptions: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """`Runnable.batch` semantics (order, `max_concurrency`, `return_exceptions`)."""
    if not inputs:
        return []
    configs = get_config_list(config, len(inputs))
    workers = min(configs[0].get("max_concurrency") or len(inputs), len(inputs))
    group = SubmissionGroup(workers)

    def one(item: Any, item_config: RunnableConfig) -> Any:
        with group.slot():
            try:
                return invoke(item, item_config, **kwargs)
            except Exception as e:
                if return_exceptions:
                    return e
                raise

    try:
        with ContextThreadPoolExecutor(max_workers=workers) as executor:
            return list(executor.map(one, inputs, configs))
    finally:
        group.flush()


async def abatch_together(
    ainvoke: Callable[..., Awaitable[Any]],
    inputs: Sequence[Any],
    config: RunnableConfig | Sequence[RunnableConfig] | None,
    *,
    return_exceptions: bool = False,
    **kwargs: Any,
) -> list[Any]:
    """`Runnable.abatch` semantics, the requests submitted together."""
    if not inputs:
        return []
    configs = get_config_list(config, len(inputs))
    limit = configs[0].get("max_concurrency")
    group = SubmissionGroup(min(limit or len(inputs), len(inputs)))

    async def one(item: Any, item_config: RunnableConfig) -> Any:
        with group.slot():
            try:
                return await ainvoke(item, item_config, **kwargs)
            except Exception as e:
                if return_exceptions:
                    return e
                raise

    try:
        return list(
            await gather_with_concurrency(
                limit, *(one(i, c) for i, c in zip(inputs, configs, strict=True))
            )
        )
    finally:
        group.flush()

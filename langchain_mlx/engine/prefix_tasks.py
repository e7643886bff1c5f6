"""Work callers hand to the engine's worker thread: saving and loading prefixes.

`PrefixTasks` is the part of `Engine` (worker.py) that runs a function on the
worker between steps (`_call`) and the prefix operations built on it.
"""

from __future__ import annotations

import concurrent.futures
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_mlx.engine.handle import POLL_SECONDS

if TYPE_CHECKING:
    from langchain_mlx.engine.distributed import StepSharing
    from langchain_mlx.engine.prefix_cache import PrefixCache


@dataclass(frozen=True)
class Task:
    """A function to run on the worker thread (e.g. saving a prefix)."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]

    def run(self) -> None:
        """Run it; its result or error goes to the future."""
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)


class PrefixTasks:
    """Mixin of `Engine`: functions run on its worker (uses the engine's state)."""

    name: str
    model: Any
    prefix_cache: PrefixCache
    _queue: queue.SimpleQueue[Any]
    _sharing: StepSharing | None

    def check_alive(self) -> None:  # noqa: D102 - defined by Engine
        raise NotImplementedError

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:  # noqa: D102
        raise NotImplementedError

    def save_prefix(self, path: str | Path, prompt_ids: Sequence[int]) -> int:
        """Write the KV state of `prompt_ids` to `path` (`.safetensors`).

        Runs on the worker between decode steps (live streams pause while the
        prefix is prefilled). Returns the number of tokens saved.
        """
        ids = list(prompt_ids)
        self.check_fits(len(ids), 0)

        def save() -> int:
            return self.prefix_cache.save(path, self.model, ids, name=self.name)

        return int(self._call(save))

    def load_prefix(self, path: str | Path) -> int:
        """Load a prefix written by `save_prefix` into the prefix cache.

        Later prompts that start with it skip prefilling it. Returns its length
        in tokens.
        """
        return len(self._call(lambda: self.prefix_cache.load(path, self.model)))

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (waits for the worker to do it)."""
        self._call(self.prefix_cache.clear)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread and return its result."""
        self.check_alive()
        if self._sharing is not None:
            msg = (
                f"{self.name!r} is sharded across {self._sharing.size} ranks: saving, "
                "loading or clearing prefixes is not supported there (each rank "
                "holds only its part of the KV state)"
            )
            raise NotImplementedError(msg)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(Task(fn, future))
        while True:
            try:
                return future.result(timeout=POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                self.check_alive()

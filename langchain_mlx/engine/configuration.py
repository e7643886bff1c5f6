"""An engine's options and draft model: what every user of the model shares.

`Configuration` is the part of `Engine` (worker.py) that checks, changes and
reports the engine's options and loads its draft model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from langchain_mlx.engine.model_facts import canonical_path
from langchain_mlx.engine.types import ENGINE_OPTION_NAMES, EngineOptions

if TYPE_CHECKING:
    from langchain_mlx.engine.distributed import StepSharing

Loader = Callable[[], tuple[Any, Any]]


class Configuration:
    """Mixin of `Engine`: its options and draft model (uses the engine's state)."""

    name: str
    tokenizer: Any
    _options: EngineOptions
    _lock: threading.Lock
    _sharing: StepSharing | None

    def require_options(self, options: dict[str, Any] | None) -> None:
        """Raise ValueError if `options` (None: any) differ from this engine's."""
        asked = {k: v for k, v in (options or {}).items() if v is not None}
        differ = {k: v for k, v in asked.items() if getattr(self._options, k) != v}
        if differ:
            now = {k: getattr(self._options, k) for k in differ}
            msg = (
                f"the MLX engine for {self.name!r} is already running with {now}; "
                f"it is shared by every object that uses this model, so {differ} "
                "cannot apply. Pass the options where the model is first loaded, "
                "or change them for everyone with `.engine.configure(...)`."
            )
            raise ValueError(msg)

    @property
    def options(self) -> EngineOptions:
        """The current batching and caching options."""
        return self._options

    def configure(self, **options: int | None) -> None:
        """Change some `EngineOptions` for every user of this model (None: keep).

        Takes effect before the worker's next step.
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

    _draft_key: str | None = None
    _draft: Any = None

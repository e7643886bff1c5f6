"""Sampling settings: one frozen record resolved from every place a user sets them.

Three layers, later wins: `MLXPipeline.pipeline_kwargs` (the community names,
e.g. `temp`), the LangChain standard fields of `ChatMLX` (`temperature`,
`max_tokens`, ...), and the keyword arguments of one call. Unknown names are
rejected here, with the list of names we accept, so nothing is silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_MAX_TOKENS = 256

# community / mlx-lm name -> our field name
_ALIASES = {
    "temp": "temperature",
    "max_new_tokens": "max_tokens",
    "stop_sequences": "stop",
}
_REMOVED = {
    "formatter": (
        "'formatter' was removed from mlx-lm's generate(); stream the model "
        "(chat.stream / llm.stream) and format the chunks yourself"
    ),
}
# community flag that made mlx-lm print to stdout; the library logs instead
# (response_metadata carries the speeds it printed)
_IGNORED = {"verbose"}


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that shapes one generation, in mlx-lm's terms."""

    temperature: float = 0.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    timeout: float | None = None

    def with_overrides(self, overrides: Mapping[str, Any]) -> GenerationSettings:
        """Return a copy with `overrides` applied (names already canonical)."""
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in clean:
            clean["stop"] = _as_stop_tuple(clean["stop"])
        updated = replace(self, **clean)
        updated.validate()
        return updated

    def validate(self) -> None:
        """Raise TypeError/ValueError for values mlx-lm would misbehave on."""
        for name in (
            "max_tokens",
            "top_k",
            "min_tokens_to_keep",
            "repetition_context_size",
        ):
            _require_int(name, getattr(self, name))
        if self.seed is not None:
            _require_int("seed", self.seed)
        for name in ("temperature", "top_p", "min_p"):
            _require_number(name, getattr(self, name))
        for name in ("repetition_penalty", "timeout"):
            if getattr(self, name) is not None:
                _require_number(name, getattr(self, name))
        if self.min_tokens_to_keep < 1 or self.repetition_context_size < 1:
            msg = (
                "min_tokens_to_keep and repetition_context_size must be >= 1, got "
                f"{self.min_tokens_to_keep!r} and {self.repetition_context_size!r}"
            )
            raise ValueError(msg)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            msg = f"temperature must be a finite number >= 0, got {self.temperature!r}"
            raise ValueError(msg)
        if self.max_tokens is None or self.max_tokens < 1:
            msg = f"max_tokens must be a positive integer, got {self.max_tokens!r}"
            raise ValueError(msg)
        if not 0 < self.top_p <= 1:
            msg = f"top_p must be in (0, 1], got {self.top_p!r}"
            raise ValueError(msg)
        if self.top_k < 0:
            msg = f"top_k must be >= 0 (0 disables it), got {self.top_k!r}"
            raise ValueError(msg)
        if not 0 <= self.min_p <= 1:
            msg = f"min_p must be in [0, 1], got {self.min_p!r}"
            raise ValueError(msg)
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            msg = (
                "repetition_penalty must be > 0 (1.0 means no penalty), "
                f"got {self.repetition_penalty!r}"
            )
            raise ValueError(msg)
        if self.timeout is not None and self.timeout <= 0:
            msg = f"timeout must be a positive number of seconds, got {self.timeout!r}"
            raise ValueError(msg)


SETTING_NAMES = frozenset(GenerationSettings.__dataclass_fields__)


def canonical_settings(raw: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Map user-facing names (community and LangChain) to `GenerationSettings` names.

    Raises:
        ValueError: for a name we do not know, saying where it came from and
            which names are accepted.

    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _REMOVED:
            msg = f"{where}: {_REMOVED[key]}."
            raise ValueError(msg)
        if key in _IGNORED:
            continue
        name = _ALIASES.get(key, key)
        if name not in SETTING_NAMES:
            accepted = sorted(SETTING_NAMES | set(_ALIASES))
            msg = (
                f"{where}: unknown generation setting {key!r}. "
                f"Accepted: {', '.join(accepted)}."
            )
            raise ValueError(msg)
        out[name] = value
    return out


def _as_stop_tuple(stop: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        return (stop,)
    if not all(isinstance(s, str) for s in stop):
        msg = f"stop must be a string or a list of strings, got {stop!r}"
        raise TypeError(msg)
    return tuple(stop)


def _require_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an integer, got {value!r} ({type(value).__name__})"
        raise TypeError(msg)


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number, got {value!r} ({type(value).__name__})"
        raise TypeError(msg)

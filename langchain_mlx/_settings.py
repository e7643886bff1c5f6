"""Sampling settings: one frozen record resolved from every place a user sets them.

Three layers, later wins: `MLXPipeline.pipeline_kwargs` (the community names,
e.g. `temp`), the LangChain standard fields of `ChatMLX` (`temperature`,
`max_tokens`, ...), and the keyword arguments of one call. Unknown names are
rejected here, with the list of names we accept, so nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_mlx.engine.types import (
    DEFAULT_MAX_TOKENS,
    SETTING_NAMES,
    GenerationSettings,
)

__all__ = ["DEFAULT_MAX_TOKENS", "GenerationSettings", "canonical_settings"]

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

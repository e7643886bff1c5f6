"""Python values as JSON, the one rendering for the prompt. Pure: no mlx.

Tool-call arguments, JSON content blocks, tools and response schemas reach the
model as JSON. Values without a JSON type get the form a user would expect of
a JSON rendering (pydantic's, in JSON mode): dates and times in ISO 8601,
UUIDs, decimals and paths as strings, enums as their value, pydantic models
dumped. Anything else is an error naming where it was.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import uuid
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

_AS_STRING = (uuid.UUID, decimal.Decimal, PurePath)


def json_ready(value: Any, where: str, path: str = "") -> Any:
    """`value` made of JSON types only (dict, list, str, number, bool, None).

    Raises:
        ValueError: a value (or a dict key) has no JSON form; the message
            names `where` and the path to it below `path`.

    """
    if value is None or isinstance(value, (str, int, float)):  # bool is an int
        return value
    if isinstance(value, Mapping):
        return {
            _key(key, where, path): json_ready(item, where, f"{path}.{key}")
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [json_ready(item, where, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, _AS_STRING):
        return str(value)
    if isinstance(value, enum.Enum):
        return json_ready(value.value, where, path)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    msg = (
        f"{where}: {path or 'the value'} = {text} ({type(value).__name__}) has "
        "no JSON form; pass JSON values (str, int, float, bool, None, "
        "list, dict; dates, UUIDs, decimals and paths are written as strings) or "
        "convert it first"
    )
    raise ValueError(msg)


def _key(key: Any, where: str, path: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (int, float)):  # as json.dumps writes them
        return json.dumps(key)
    msg = (
        f"{where}: {path or 'the value'} has the key {key!r} "
        f"({type(key).__name__}); JSON object keys are strings"
    )
    raise ValueError(msg)


def json_text(value: Any, where: str, path: str = "") -> str:
    """`value` as JSON text, non-ASCII kept (see `json_ready`)."""
    return json.dumps(json_ready(value, where, path), ensure_ascii=False)

"""Types every layer shares: requests, events, options and errors.

No mlx, no imports from the rest of the package: the surface, the translation
modules and the engine all import from here, and this module imports none of them.

Flow of one request::

    Request (prompt ids, GenerationSettings, TextRules, constraint)
        -> engine -> Segment(kind, text, token logprobs) ... -> Final(finish, usage)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

LogitsProcessor = Callable[[Any, Any], Any]

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20  # as OpenAI: more would cost a full sort of the vocabulary
SEED_RANGE = (0, 2**64 - 1)  # what mx.random.key accepts


# -- errors ------------------------------------------------------------------------


class GenerationTimeoutError(TimeoutError):
    """A generation ran past its `timeout`."""


class EngineStoppedError(RuntimeError):
    """The engine was closed (or its worker died); the request cannot complete."""


class DistributedError(EngineStoppedError):
    """The group of ranks that runs a sharded model broke or could not form.

    A rank died or lost its connection, or the group did not form in time; a
    sharded model cannot go on with part of its weights missing, so the engine
    stops. Restart every rank (e.g. `mlx.launch` again).
    """


class EngineOverloadedError(RuntimeError):
    """More requests are waiting than the engine's `max_queue` allows."""


class RequestFailedError(RuntimeError):
    """One request failed inside the engine (its logits processor, detokenizer, ...).

    Only that request ends; the batch and the engine go on. The cause is chained.
    """


class ContextWindowExceededError(ValueError):
    """The prompt plus `max_tokens` does not fit the model's context window."""


class ModelLoadError(OSError):
    """A model folder or id cannot be loaded (bad config, weights or tokenizer).

    An `OSError` like the loading errors of transformers; not a `ValueError`, so
    pydantic does not wrap it when a model is loaded while a `ChatMLX` or
    `MLXPipeline` is constructed.
    """


class PromptCacheError(ValueError):
    """A saved prompt cache cannot be read, written or used with this model."""


# -- settings ------------------------------------------------------------------------


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
    logprobs: bool = False
    """Report the log-probability of every returned token."""
    top_logprobs: int = 0
    """With `logprobs`, also the N most likely alternatives at each position."""
    fast_forward: bool = True
    """Feed the tokens a grammar forces in one forward pass, not one step each."""
    prompt_lookup: bool = True
    """Draft the next tokens from n-gram matches in the prompt and the output
    (speculative decoding; a draft model, when the engine has one, drafts
    where no match is found)."""
    num_draft_tokens: int = 6
    """Most tokens drafted per step (0: no speculative decoding); the engine
    drafts fewer where its measured costs and acceptance say so."""

    def with_overrides(self, overrides: Any) -> GenerationSettings:
        """Return a copy with `overrides` applied (names already canonical)."""
        clean = {k: v for k, v in dict(overrides).items() if v is not None}
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
            "top_logprobs",
            "num_draft_tokens",
        ):
            _require_int(name, getattr(self, name))
        if self.seed is not None:
            _require_int("seed", self.seed)
            low, high = SEED_RANGE
            if not low <= self.seed <= high:
                msg = (
                    f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}; "
                    "pass a non-negative seed, or None for a random one"
                )
                raise ValueError(msg)
        for name in ("temperature", "top_p", "min_p"):
            _require_number(name, getattr(self, name))
        for name in ("repetition_penalty", "timeout"):
            if getattr(self, name) is not None:
                _require_number(name, getattr(self, name))
        for name in ("logprobs", "fast_forward", "prompt_lookup"):
            if not isinstance(getattr(self, name), bool):
                msg = f"{name} must be True or False, got {getattr(self, name)!r}"
                raise TypeError(msg)
        if self.num_draft_tokens < 0:
            msg = (
                "num_draft_tokens must be >= 0 (0 turns speculative decoding "
                f"off), got {self.num_draft_tokens!r}"
            )
            raise ValueError(msg)
        if self.min_tokens_to_keep < 1 or self.repetition_context_size < 1:
            msg = (
                "min_tokens_to_keep and repetition_context_size must be >= 1, got "
                f"{self.min_tokens_to_keep!r} and {self.repetition_context_size!r}"
            )
            raise ValueError(msg)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            msg = f"temperature must be a finite number >= 0, got {self.temperature!r}"
            raise ValueError(msg)
        if self.max_tokens < 1:
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
        if self.repetition_penalty is not None and not (
            self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)
        ):
            msg = (
                "repetition_penalty must be a finite number > 0 (1.0 means no "
                f"penalty), got {self.repetition_penalty!r}"
            )
            raise ValueError(msg)
        if self.timeout is not None and not self.timeout > 0:
            msg = f"timeout must be a positive number of seconds, got {self.timeout!r}"
            raise ValueError(msg)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            msg = (
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], "
                f"got {self.top_logprobs!r}"
            )
            raise ValueError(msg)


SETTING_NAMES = frozenset(GenerationSettings.__dataclass_fields__)


def _as_stop_tuple(stop: Any) -> tuple[str, ...]:
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        msg = (
            f"stop must be a string or a list of strings, got {stop!r} "
            f"({type(stop).__name__})"
        )
        raise TypeError(msg)
    return tuple(s for s in stop if s)


def _require_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an integer, got {value!r} ({type(value).__name__})"
        raise TypeError(msg)


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number, got {value!r} ({type(value).__name__})"
        raise TypeError(msg)
    if math.isnan(value):
        msg = f"{name} must be a number, got NaN"
        raise ValueError(msg)


# -- engine options ----------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """How an engine batches and caches (fixed when the engine is created)."""

    max_batch_size: int = 8
    """Most requests decoded together; more wait in the queue."""
    max_queue: int = 1024
    """Most requests waiting beyond the batch; past it `submit` raises
    `EngineOverloadedError` instead of holding unbounded memory."""
    prefix_cache_entries: int = 10
    """How many recent KV caches are kept for prefix reuse (0: off)."""
    prefix_cache_bytes: int = 2 << 30
    """Byte budget of those caches; least recently used go first (0: off)."""
    prefix_cache_dir: str | None = None
    """A folder where those caches are also written, so a restarted process
    starts from them (None: the environment variable
    `LANGCHAIN_MLX_PREFIX_CACHE_DIR`, else no disk tier; "": none)."""
    prefix_cache_disk_bytes: int = 4 << 30
    """Byte budget of the folder; least recently used entries go first."""
    kv_memory_bytes: int | None = None
    """One budget for the KV memory the engine holds: running requests (prompt
    + max_tokens each) and the in-memory prefix cache. Requests wait for room;
    the prefix cache gives room first (spilling to the disk tier). None: half
    of what MLX may still allocate once the model is loaded (0: no bound)."""

    @classmethod
    def chosen(cls, options: dict[str, Any] | None) -> EngineOptions:
        """The defaults with the given options (None: default), validated."""
        picked = {k: v for k, v in (options or {}).items() if v is not None}
        if "prefix_cache_dir" not in picked:
            picked["prefix_cache_dir"] = os.environ.get(PREFIX_CACHE_DIR_ENV) or None
        engine_options = replace(cls(), **picked)
        engine_options.validate()
        return engine_options

    def validate(self) -> None:
        """Raise ValueError for a value the engine cannot work with."""
        for name in ENGINE_OPTION_NAMES:
            value = getattr(self, name)
            if name == "kv_memory_bytes" and value is None:
                continue
            if name == "prefix_cache_dir":
                if value is not None and not isinstance(value, str):
                    msg = f"prefix_cache_dir must be a folder path (str), got {value!r}"
                    raise ValueError(msg)
                continue
            _require_int(name, value)
        if self.max_batch_size < 1:
            msg = f"max_batch_size must be >= 1, got {self.max_batch_size!r}"
            raise ValueError(msg)
        for name in ("max_queue", "prefix_cache_entries", "prefix_cache_bytes",
                     "prefix_cache_disk_bytes", "kv_memory_bytes"):  # fmt: skip
            if (getattr(self, name) or 0) < 0:
                value = getattr(self, name)
                msg = f"{name} must be >= 0 (0 turns it off), got {value!r}"
                raise ValueError(msg)


ENGINE_OPTION_NAMES = ("max_batch_size", "max_queue", "prefix_cache_entries",
                       "prefix_cache_bytes", "prefix_cache_dir",
                       "prefix_cache_disk_bytes", "kv_memory_bytes")  # fmt: skip
PREFIX_CACHE_DIR_ENV = "LANGCHAIN_MLX_PREFIX_CACHE_DIR"


# -- requests ------------------------------------------------------------------------


class Constraint(Protocol):
    """A grammar that decoding follows (a logits processor that knows its state)."""

    def __call__(self, tokens: Any, logits: Any) -> Any:
        """Mask the logits to what the grammar allows next."""

    def complete_after(self, last_token: int) -> bool:
        """Whether the output, ending with `last_token`, is a complete sentence."""

    def sync(self, tokens: Sequence[int]) -> None:
        """Catch up with `tokens` (the prompt, then everything generated)."""

    def forced_tokens(self) -> list[int]:
        """The continuation the grammar allows alone (empty: a choice is open).

        Ends with the EOS when the grammar is complete after it and allows
        nothing more: the sequence then ends without another forward pass.
        """

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar would accept next, in order."""

    @property
    def spec(self) -> Any:
        """A picklable description from which a fresh copy can be built.

        The other ranks of a sharded model rebuild the request's constraint
        from it (their engine's `constraint_factory`).
        """


@runtime_checkable
class SequenceGenerator(Protocol):
    """What the scheduler decodes with: mlx-lm's `BatchGenerator`'s interface.

    Implemented by `BatchGenerator` itself (continuous batching), by
    `serial.SerialGenerator` (one sequence at a time, for caches that cannot
    be merged) and, for one sequence, by `speculative.Solo` (`next` returns the
    same records with several tokens per step; `hand_off` leaves it at exactly
    its decided tokens so that `insert` into a batch generator continues it).
    """

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int] | None = None,
        caches: list[Any] | None = None,
        all_tokens: list[list[int]] | None = None,
        samplers: list[Any] | None = None,
        logits_processors: list[Any] | None = None,
        stop_sequences: list[Any] | None = None,
    ) -> list[int]:
        """Add sequences (their prompts, starting from `caches`); their uids."""

    def next(self) -> tuple[list[Any], list[Any]]:
        """One step: prompt-processing records and one token per live sequence."""

    def remove(
        self, uids: list[int], return_prompt_caches: bool = False
    ) -> dict[int, Any]:
        """Take sequences out; with `return_prompt_caches`, their (cache, tokens)."""

    def close(self) -> None:
        """Drop everything held."""


@dataclass(frozen=True)
class TextRules:
    """How a request's decoded text is split into content, reasoning and tool calls.

    Only text that can still become a marker, a stop string (`settings.stop`) or
    the start of a tool call in the model's format is ever held back.
    """

    think: tuple[str, str] | None = None
    """Reasoning markers (`<think>`, `</think>`) of a thinking model."""
    thinking_open: bool = False
    """The prompt already opened the reasoning block."""
    tool_start: str | None = None
    """The family's tool-call start marker (`<tool_call>`); None: no tagged calls."""
    tool_end: str | None = None
    bare_json_calls: bool = False
    """A JSON object `{"name": ...` may start a call (families that drop the tags)."""
    calls_only: bool = False
    """The output is constrained to tool calls: all of it is call text."""


@dataclass(frozen=True)
class Request:
    """One generation: prompt token ids, how to sample, how to split the text."""

    prompt_ids: Sequence[int]
    settings: GenerationSettings
    logits_processors: Sequence[LogitsProcessor] = ()
    constraint: Constraint | None = None
    """The grammar this request's output must follow (also a logits processor)."""
    text: TextRules = TextRules()
    checkpoints: Sequence[int] = ()
    """Prompt lengths (message boundaries) whose KV state is worth keeping on
    its own, for models whose caches cannot be cut back to a shorter prefix:
    a conversation that branches or retries its last step restarts there."""


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """One returned token: its text, log-probability and the top alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's shape: `{"token", "logprob", "bytes", "top_logprobs"}`."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.bytes),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in self.top
            ],
        }


SegmentKind = Literal["content", "reasoning", "tool"]


@dataclass(frozen=True)
class Segment:
    """Newly decoded text of one kind (never a stop string or a reasoning marker).

    `logprobs` holds one entry per token whose text is in `text`, when asked for;
    joined, their `token` strings equal `text`.
    """

    text: str
    kind: SegmentKind = "content"
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Final:
    """The end of a request, with usage and timings."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float  # prompt tokens prefilled (not from cache) per second
    generation_tps: float
    time_to_first_token: float  # from submit, so time waiting in the queue counts
    peak_memory_gb: float  # peak since the engine last went from idle to busy
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache
    constrained: bool = False
    """The output followed a grammar; with finish "length" it is incomplete."""
    forced_tokens: int = 0
    """Output tokens the grammar forced, fed without a decode step each."""
    drafted_tokens: int = 0
    """Tokens proposed by speculative decoding (prompt lookup or draft model)."""
    accepted_tokens: int = 0
    """Drafted tokens the model confirmed (each saved a decode step)."""
    cache_source: str | None = None
    """Where `cached_tokens` came from: "memory", "disk" or None (none)."""


Event = Segment | Final

"""Grammar-constrained decoding: output that is valid by construction.

A grammar (a JSON schema, "any JSON object", or the model family's tool-call
format with each tool's argument schema) is compiled by llguidance into a token
matcher; `GrammarLogitsProcessor` is an mlx-lm logits processor that, before
each sampled token, masks every token the grammar does not allow. Once the
grammar is complete only EOS is allowed, so generation ends there.

The mask is computed with `llguidance.numpy` (the `llguidance.mlx` helper needs
Metal); mlx is imported lazily, only inside the processor, which runs on the
engine's thread.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# How JSON is laid out. Where we pick the format and the schema names the keys
# (forced tool calls, structured output) the layout is fixed to the one chat
# templates print tool calls in (`{"name": "f", "arguments": {"a": 1}}`): then
# everything between two values (`", "age": `) is forced, and the engine feeds
# it without a decode step per token (fast-forward). Where the model picks the
# layout (JSON mode; an auto-mode call it started with a newline or without
# spaces) whitespace is flexible but bounded: none, one space, or a newline
# and an indent, at each place JSON allows it. A fixed separator there forbade
# Qwen's `",\n` token: greedy Qwen2.5-Coder then never closed its first string
# (JSON mode), or wrote digits after a number that wanted a newline until
# `max_tokens` (a call in a ```json fence).
JSON_WHITESPACE = r"(?:\n {0,24}| )"
COMPACT_JSON: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
SPACED_JSON: dict[str, Any] = {
    "whitespace_flexible": True,
    "whitespace_pattern": JSON_WHITESPACE,
    "item_separator": ",",
    "key_separator": ":",
}
INTEGER_LIMIT = 9 * 10**18
"""Integers without bounds of their own stay within +-9e18 (at most 19 digits):
a model that keeps writing digits then has to end the number, and the call or
answer is complete instead of cut at `max_tokens`. (llguidance builds integer
ranges in 64-bit integers, so a bound must stay below 2**63. Numbers are not
bounded: any bound on a JSON number also forbids exponents such as 1e-05.)"""


UNKNOWN_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}"
"""A function name an auto-mode call may give that no bound tool has (its
JSON string body: identifier-like, at most 64 characters, as OpenAI allows)."""
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class UnsupportedSchemaError(ValueError):
    """The schema (or tool) uses something the grammar compiler cannot enforce."""


class ConstraintViolationError(RuntimeError):
    """The constrained generation reached a state the grammar rejects."""


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model family wraps a tool call (e.g. `<tool_call>` JSON `</tool_call>`).

    `start`/`end` of `None` means bare JSON objects, one per line.
    """

    start: str | None = None
    end: str | None = None
    start_lark: str | None = None
    """The start as a Lark expression, e.g. `<[151657]> "\\n"` when the marker
    is one added token (llguidance must then match that token, not its text)."""
    end_lark: str | None = None

    @property
    def tagged(self) -> bool:
        """Whether calls are wrapped in start/end markers."""
        return self.start is not None


def _with_options(
    schema: dict[str, Any], layout: dict[str, Any] | None = None
) -> dict[str, Any]:
    if layout is None:
        layout = SPACED_JSON if schema == {"type": "object"} else COMPACT_JSON
    schema = bound_integers(close_objects(schema))
    return {**schema, "x-guidance": {**layout, **schema.get("x-guidance", {})}}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "allOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


def _map_subschemas(
    schema: dict[str, Any], fn: Callable[[Any, str], Any]
) -> dict[str, Any]:
    """A copy of `schema` with `fn(subschema, keyword)` applied one level down."""
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: fn(v, key) for k, v in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [fn(v, key) for v in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = fn(out[key], key)
    return out


def close_objects(schema: Any, *, close: bool = True) -> Any:
    """Objects with `properties` take only those, unless the schema says otherwise.

    JSON Schema allows extra keys by default; a user asking for a `Person`
    does not want the model to invent more (OpenAI's strict mode does the same).
    Only schema-holding keywords are visited, and `allOf` branches are left open
    (closing each branch would make their combination unsatisfiable).
    """
    if not isinstance(schema, dict):
        return schema
    out = _map_subschemas(
        schema, lambda sub, key: close_objects(sub, close=key != "allOf")
    )
    if close and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def bound_integers(schema: Any) -> Any:
    """Integers without a bound of their own get one: `INTEGER_LIMIT` either way.

    Bounds the schema sets are kept (a side it bounds is left alone), as are
    integers whose values are listed (`enum`, `const`), a type that also allows
    any number, and everything under `not` (a bound there would widen it).
    """
    if not isinstance(schema, dict):
        return schema
    out = _map_subschemas(
        schema, lambda sub, key: sub if key == "not" else bound_integers(sub)
    )
    kind = out.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "integer" not in kinds or "number" in kinds or out.keys() & {"enum", "const"}:
        return out
    low, high = _bound(out, "minimum"), _bound(out, "maximum")
    if low is None and (high is None or high >= -INTEGER_LIMIT):
        out["minimum"] = -INTEGER_LIMIT
    if high is None and (low is None or low <= INTEGER_LIMIT):
        out["maximum"] = INTEGER_LIMIT
    return out


def _bound(schema: dict[str, Any], side: str) -> float | None:
    """The schema's own `minimum`/`maximum` (or exclusive one), if it has one."""
    exclusive = "exclusive" + side[0].upper() + side[1:]
    for key in (side, exclusive):  # draft 4's boolean `exclusiveMinimum` is no bound
        value = schema.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar for one JSON value matching `schema`."""
    from llguidance import LLMatcher

    return str(LLMatcher.grammar_from_json_schema(_with_options(schema)))


def tool_call_schema(tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """JSON schema of one call `{"name": ..., "arguments": {...}}` to any of `tools`."""
    variants = []
    for tool in tools:
        fn = tool["function"]
        params = _parameters(fn)
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def tool_call_grammar(
    tools: Sequence[dict[str, Any]], fmt: ToolCallFormat, *, parallel: bool
) -> str:
    """A Lark grammar for one call (several if `parallel`) in the model's format."""
    if not tools:
        msg = (
            "a tool call was required but no tools are bound; pass tools to bind_tools"
        )
        raise ValueError(msg)
    repeat = ' ("\\n" call)*' if parallel else ""
    return f"start: call{repeat}\n{_call_rules(tools, fmt)}"


def tool_or_answer_grammar(
    tools: Sequence[dict[str, Any]],
    fmt: ToolCallFormat,
    answer_schema: dict[str, Any],
    *,
    parallel: bool,
) -> str:
    """Either tool calls (several if `parallel`) or a final answer in a schema.

    What an agent with a structured final answer needs: it may call tools
    first; when it answers, the answer follows the schema.
    """
    repeat = ' ("\\n" call)*' if parallel else ""
    answer = json.dumps(_with_options(answer_schema))
    # a family with call markers may also write a bare JSON call (Qwen2.5-Coder
    # does): here the model picks, so its natural form must be allowed
    bare = ' | json_call ("\\n" json_call)*' if fmt.tagged and parallel else ""
    bare = bare or (" | json_call" if fmt.tagged else "")
    return (
        f"start: call{repeat}{bare} | answer\n{_call_rules(tools, fmt)}"
        f"answer: %json {answer}\n"
    )


def auto_call_grammar(tools: Sequence[dict[str, Any]], fmt: ToolCallFormat) -> str:
    """Free text in which every tool call that starts is a valid call (auto mode).

    The model writes what it likes until it starts a call: for every family
    the bare JSON start `{"name": "`, and the family's start marker if it has
    one. From there the rest must be a call of a bound tool with arguments in
    its schema (llguidance's lazy lexemes: the text before a call is matched
    shortest-first, so the first trigger starts the call), after which free
    text may follow again, and so may more calls. The final text cannot
    contain a trigger, so a call cannot be slipped past the grammar as text.

    A bare call keeps the layout its start shows: `{"name": "` exactly (as
    templates print calls) is compact, so what lies between values is forced;
    any other spacing (Qwen2.5-Coder's ```json fence: `{\n  "name": "`) lets
    the rest be spaced as the model likes (`JSON_WHITESPACE`, bounded).

    A bare call (not one in the family's markers) may name a function that
    is not bound (`UNKNOWN_NAME`: not a bound name, nor the start of one, so
    a name cut short is still completed), with any JSON object as arguments.
    It is parsed as an invalid tool call ("unknown tool"), never run. Without
    this branch the grammar turned a call the model made up into a call of a
    bound tool with invented arguments (BFCL irrelevance_0 on
    Qwen2.5-Coder-1.5B: the model's `calculate_area_of_triangle` became
    `determine_body_mass_index`).
    """
    compact = r'\{"name": "'
    bare = r'\{\s*"name"\s*:\s*"'  # as the model spaces it
    ws = f"(?:{JSON_WHITESPACE})?"
    triggers = [bare]
    rules = [
        f"compact_hd[lazy]: /(?s:.*){compact}/",
        "spaced_hd[lazy]: SPACED_HD",
        f"SPACED_HD: /(?s:.*){bare}/ & ~/(?s:.*){compact}/",
    ]
    compact_rests, spaced_rests = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = _parameters(fn)
        name = json.dumps(fn["name"])[1:]  # the name and its closing quote
        compact_rests.append(f"compact{i}")
        rules.append(
            f'compact{i}: {json.dumps(name)} ", \\"arguments\\": " compact_args{i} "}}"'
        )
        rules.append(f"compact_args{i}: %json {json.dumps(_with_options(params))}")
        spaced_rests.append(f"spaced{i}")
        head = f'{re.escape(name)}{ws},{ws}"arguments"{ws}:{ws}'
        rules.append(f"spaced{i}: /{head}/ spaced_args{i} /{ws}\\}}/")
        args = json.dumps(_with_options(params, SPACED_JSON))
        rules.append(f"spaced_args{i}: %json {args}")
    known = [json.dumps(tool["function"]["name"])[1:-1] for tool in tools]
    starts = sorted({name[:k] for name in known for k in range(len(name) + 1)})
    not_ours = f'~/(?:{"|".join(map(re.escape, starts))})"(?s:.*)/'
    rules.append(f'COMPACT_UNKNOWN: /{UNKNOWN_NAME}"/ & {not_ours}')
    rules.append(
        'compact_unknown: COMPACT_UNKNOWN ", \\"arguments\\": " compact_any "}"'
    )
    compact_any = _with_options(ANY_OBJECT, COMPACT_JSON)
    rules.append(f"compact_any: %json {json.dumps(compact_any)}")
    rules.append(
        f'SPACED_UNKNOWN: /{UNKNOWN_NAME}"{ws},{ws}"arguments"{ws}:{ws}/ & {not_ours}'
    )
    rules.append(f"spaced_unknown: SPACED_UNKNOWN spaced_any /{ws}\\}}/")
    spaced_any = _with_options(ANY_OBJECT, SPACED_JSON)
    rules.append(f"spaced_any: %json {json.dumps(spaced_any)}")
    calls = ["compact_hd compact_call", "spaced_hd spaced_call"]
    rules.append(f"compact_call: {' | '.join([*compact_rests, 'compact_unknown'])}")
    rules.append(f"spaced_call: {' | '.join([*spaced_rests, 'spaced_unknown'])}")
    if fmt.tagged:
        start = fmt.start_lark or json.dumps(fmt.start)
        end = fmt.end_lark or json.dumps(fmt.end)
        if fmt.start_lark is None:  # a text marker: it must not hide in text
            # (re.escape leaves a newline as is: inside /.../ it must be \n)
            triggers.append(re.escape(str(fmt.start)).replace("\n", "n"))
        # (inside markers a call names a bound tool: an unknown-name branch
        # there made the lexer drop `json_call`, refusing every bound call)
        calls.append(f"TEXT {start} json_call {end}")
        schema = json.dumps(_with_options(tool_call_schema(tools)))
        rules.append(f"json_call: %json {schema}")
    banned = "|".join(triggers)
    return (
        f"start: call* TEXT\ncall: {' | '.join(calls)}\n"
        + "\n".join(rules)
        + f"\nTEXT: /(?s:.*)/ & ~/(?s:.*)({banned})(?s:.*)/\n"
    )


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    """A tool's argument schema, self-contained (no `$defs` references)."""
    from langchain_core.utils.json_schema import dereference_refs

    params = fn.get("parameters") or {"type": "object", "properties": {}}
    # nested under "arguments", "#/$defs/..." would no longer resolve
    params = dereference_refs(params) if "$defs" in json.dumps(params) else params
    return {k: v for k, v in params.items() if k not in ("$defs", "definitions")}


def _call_rules(tools: Sequence[dict[str, Any]], fmt: ToolCallFormat) -> str:
    schema = json.dumps(_with_options(tool_call_schema(tools)))
    if fmt.tagged:
        start = fmt.start_lark or json.dumps(fmt.start)
        end = fmt.end_lark or json.dumps(fmt.end)
        call = f"{start} json_call {end}"
    else:
        call = "json_call"
    return f"call: {call}\njson_call: %json {schema}\n"


class ConstraintCompiler:
    """Compiles grammars against one tokenizer (its llguidance view is cached)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        from llguidance import LLTokenizer

        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            msg = (
                "grammar-constrained decoding needs a fast (Rust `tokenizers`) "
                f"tokenizer; {type(hf_tokenizer).__name__} is not one"
            )
            raise UnsupportedSchemaError(msg)
        self.lltokenizer = LLTokenizer(
            backend.to_str(), eos_token=hf_tokenizer.eos_token_id
        )
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar -> matcher
        self._compiled_lock = threading.Lock()

    MAX_COMPILED = 16
    """Grammars whose compiled matcher is kept (least recently used dropped)."""

    _cache: dict[int, tuple[Any, ConstraintCompiler]] = {}  # noqa: RUF012
    _cache_lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ConstraintCompiler:
        """The compiler for a tokenizer, built once (about 0.2 s).

        Takes a Hugging Face fast tokenizer or mlx-lm's `TokenizerWrapper`.
        """
        hf_tokenizer = tokenizer
        if not hasattr(tokenizer, "backend_tokenizer"):  # unwrap TokenizerWrapper
            hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        with cls._cache_lock:
            # the value keeps the tokenizer alive, so its id cannot be reused
            tokenizer, compiler = cls._cache.get(id(hf_tokenizer), (None, None))
            if tokenizer is not hf_tokenizer or compiler is None:
                compiler = cls(hf_tokenizer)
                cls._cache[id(hf_tokenizer)] = (hf_tokenizer, compiler)
            return compiler

    def check(self, grammar: str, what: str) -> None:
        """Raise `UnsupportedSchemaError` if the grammar cannot be enforced."""
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error and not error.startswith("WARNING"):
            raise _unsupported(what, error)

    def processor(
        self, grammar: str, what: str, *, lazy: bool = False
    ) -> GrammarLogitsProcessor:
        """A fresh, single-use logits processor for one generation."""
        return GrammarLogitsProcessor(
            self.lltokenizer, grammar, what, lazy=lazy, matcher=self._matcher(grammar)
        )

    def _matcher(self, grammar: str) -> Any:
        """A fresh matcher: the grammar is compiled once, then copied (< 1 ms).

        Compiling costs milliseconds per tool schema (an auto-mode grammar over
        40 tools: ~0.15 s, most of it bounded integers), and an agent sends the
        same grammar at every step.
        """
        from llguidance import LLMatcher

        with self._compiled_lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
        compiled = LLMatcher(self.lltokenizer, grammar)
        if compiled.is_error():
            return compiled  # the processor reports it
        with self._compiled_lock:
            self._compiled[grammar] = compiled
            while len(self._compiled) > self.MAX_COMPILED:
                self._compiled.popitem(last=False)
            return compiled.deep_copy()


def constraint_from_spec(tokenizer: Any, spec: Any) -> GrammarLogitsProcessor:
    """A fresh processor from a `GrammarLogitsProcessor.spec` (other ranks)."""
    grammar, what, lazy = spec
    compiler = ConstraintCompiler.for_tokenizer(tokenizer)
    return compiler.processor(grammar, what, lazy=lazy)


def _unsupported(what: str, error: str) -> UnsupportedSchemaError:
    msg = (
        f"{what} cannot be enforced by the grammar compiler: {error}. "
        "Simplify the schema (drop or replace that keyword) and try again."
    )
    return UnsupportedSchemaError(msg)


class GrammarLogitsProcessor:
    """mlx-lm logits processor `(tokens, logits) -> logits` enforcing a grammar.

    The first call sees the prompt; every later call sees the prompt and the
    tokens generated since. The matcher's state is a function of the sequence
    it is shown: it consumes the generated tokens it has not seen yet (one per
    call in a batch; several after a speculative step, which also calls `sync`
    itself) and rolls back what it consumed beyond it (a planned speculative
    step validated its draft after the forced tokens, then the request moved
    into the batch), so the state follows the sequence however it is decoded.
    """

    def __init__(
        self,
        lltokenizer: Any,
        grammar: str,
        what: str = "the grammar",
        *,
        lazy: bool = False,
        matcher: Any = None,
    ) -> None:
        import numpy as np
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self._np = np
        self.spec = (grammar, what, lazy)
        """What `constraint_from_spec` rebuilds it from (on other ranks)."""
        if matcher is None:  # else a fresh one the caller compiled before
            matcher = LLMatcher(lltokenizer, grammar)
        self._matcher = matcher
        if self._matcher.is_error():
            raise _unsupported(what, self._matcher.get_error())
        self._n_vocab = int(lltokenizer.vocab_size)
        self._eos = int(lltokenizer.eos_token)  # what a complete grammar allows
        self._bitmask = allocate_token_bitmask(1, self._n_vocab)
        self._lazy = lazy  # free text around what it constrains
        self._base: int | None = None  # prompt length, at the first call
        self._consumed = 0  # generated tokens seen (fed to the matcher or past its end)
        self._past_end = 0  # of them, seen after the grammar had stopped
        self.mask_seconds = 0.0
        """Total time spent computing masks (for the benchmark)."""
        self.steps = 0

    @property
    def is_accepting(self) -> bool:
        """Whether the text so far is a complete sentence of the grammar."""
        return bool(self._matcher.is_accepting())

    def complete_after(self, last_token: int) -> bool:
        """Whether the output ending with `last_token` is complete (at its end).

        mlx-lm feeds a sampled token to the processors in the step that returns
        it, so `last_token` is already consumed here.
        """
        del last_token
        if self._lazy:  # free text can always go on: ending at a limit is a cut
            return False
        return self._base is not None and bool(self._matcher.is_accepting())

    @property
    def consumed(self) -> int:
        """Generated tokens the state reflects (the handoff asserts it)."""
        return self._consumed

    def sync(self, tokens: Sequence[int]) -> None:
        """Bring the matcher to `tokens` (prompt + output): forward or back."""
        if self._base is None:
            self._base = len(tokens)
            return
        self._follow(tokens, len(tokens))

    def _follow(self, tokens: Any, n: int) -> None:
        """Match the first `n` of `tokens` (a list or an array) exactly."""
        assert self._base is not None
        seen = self._base + self._consumed
        if n < seen:
            self._rollback(seen - n)
        elif n > seen:
            new = tokens[seen:n]
            self._consume(new if isinstance(new, list) else new.tolist())

    def _rollback(self, n: int) -> None:
        past = min(n, self._past_end)
        self._past_end -= past
        if n > past and not self._matcher.rollback(n - past):
            error = self._matcher.get_error()
            msg = f"constrained decoding could not step back: {error}"
            raise ConstraintViolationError(msg)
        self._consumed -= n

    def _consume(self, new: list[int]) -> None:
        if self._matcher.is_stopped():  # complete: what follows is past the end
            self._past_end += len(new)  # (a batch feeds the EOS it sampled)
        elif not self._matcher.consume_tokens(new):
            msg = f"constrained decoding failed: {self._matcher.get_error()}"
            raise ConstraintViolationError(msg)
        self._consumed += len(new)

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows as the only continuation (fast-forward)."""
        if self._matcher.is_stopped():
            return []
        forced = [int(t) for t in self._matcher.compute_ff_tokens()]
        if forced and not self._lazy and self._ends_after(forced):
            forced.append(self._eos)  # nothing may follow: the end is forced too
        return forced

    def _ends_after(self, tokens: list[int]) -> bool:
        """Whether the grammar is complete and allows nothing more after `tokens`."""
        if not self._matcher.consume_tokens(tokens):
            raise ConstraintViolationError(self._matcher.get_error())
        stopped = bool(self._matcher.is_stopped())
        self._matcher.rollback(len(tokens))
        return stopped

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar accepts next, in order."""
        return int(self._matcher.validate_tokens(list(tokens))) if tokens else 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import time

        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        n = int(tokens.shape[-1])
        if self._base is None:
            self._base = n
        else:
            self._follow(tokens, n)
        tic = time.perf_counter()
        fill_next_token_bitmask(self._matcher, self._bitmask)
        allowed = self._np.unpackbits(
            self._bitmask.view(self._np.uint8), bitorder="little"
        )
        width = logits.shape[-1]
        if width > allowed.shape[0]:
            allowed = self._np.pad(allowed, (0, width - allowed.shape[0]))
        mask = mx.array(allowed[:width].astype(bool))
        self.mask_seconds += time.perf_counter() - tic
        self.steps += 1
        return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))

"""Engine results -> LangChain output fields. Pure: no mlx.

Token usage and response metadata are built here from the engine's `Final`
record, so the chat model and the LLM report them the same way; generated text
is split into content, tool calls and invalid tool calls (`parse_tool_calls`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    InvalidToolCall,
    ToolCall,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk

from langchain_mlx._engine import Delta, Final
from langchain_mlx._stop import StopMatcher

PROVIDER = "mlx"


def usage_metadata(final: Final) -> UsageMetadata:
    """Input/output/total tokens of one generation, and prompt tokens from cache."""
    usage = UsageMetadata(
        input_tokens=final.prompt_tokens,
        output_tokens=final.generation_tokens,
        total_tokens=final.prompt_tokens + final.generation_tokens,
    )
    if final.cached_tokens:
        usage["input_token_details"] = {"cache_read": final.cached_tokens}
    return usage


def response_metadata(final: Final, model_name: str) -> dict[str, Any]:
    """What LangChain users read from `AIMessage.response_metadata`."""
    return {
        "model_name": model_name,
        "model_provider": PROVIDER,
        "finish_reason": final.finish_reason,
        "prompt_tokens_per_second": round(final.prompt_tps, 3),
        "generation_tokens_per_second": round(final.generation_tps, 3),
        "time_to_first_token_seconds": round(final.time_to_first_token, 4),
        "peak_memory_gb": round(final.peak_memory_gb, 4),
    }


# -- tool calls in generated text ----------------------------------------------

_CALL_START = re.compile(r'\{\s*"name"\s*:')
_EMPTY_FENCE = re.compile(r"```[a-zA-Z]*\s*```")


@dataclass
class ParsedOutput:
    """Generated text split into content and tool calls (valid or not)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(obj: Any, tool_names: set[str]) -> tuple[ToolCall | None, str | None]:
    """(call, None) for a well-formed call to a bound tool, else (None, error)."""
    if not isinstance(obj, dict) or "name" not in obj:
        return None, "a tool call must be a JSON object with 'name' and 'arguments'"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return None, f"'arguments' is a string that is not JSON: {e}"
    if not isinstance(args, dict):
        return None, f"'arguments' must be a JSON object, got {type(args).__name__}"
    name = obj["name"]
    if not isinstance(name, str) or name not in tool_names:
        bound = ", ".join(sorted(tool_names))
        return None, f"unknown tool {name!r}; bound tools: {bound}"
    call_id = str(obj.get("id") or _new_id())
    return ToolCall(name=name, args=args, id=call_id, type="tool_call"), None


def _invalid(raw: str, error: str, name: str | None = None) -> InvalidToolCall:
    return InvalidToolCall(
        type="invalid_tool_call", name=name, args=raw, id=_new_id(), error=error
    )


def _add(out: ParsedOutput, obj: Any, raw: str, tool_names: set[str]) -> None:
    for item in obj if isinstance(obj, list) else [obj]:
        call, error = _as_call(item, tool_names)
        if call is not None:
            out.tool_calls.append(call)
        else:
            name = item.get("name") if isinstance(item, dict) else None
            out.invalid_tool_calls.append(
                _invalid(raw, str(error), name if isinstance(name, str) else None)
            )


def parse_tool_calls(
    text: str,
    *,
    tool_names: set[str],
    start: str | None = None,
    end: str | None = None,
    parser: Callable[[str, Any], Any] | None = None,
    tools: Any = None,
) -> ParsedOutput:
    """Split generated text into content, tool calls and invalid tool calls.

    Tagged calls (`start` ... `end`, e.g. `<tool_call>...</tool_call>`) are read
    with the model family's mlx-lm `parser` (JSON if none); bare JSON objects
    `{"name": ..., "arguments": ...}` naming a bound tool are calls too (small
    models often drop the tags). Text that starts like a call but does not
    parse becomes an invalid tool call carrying the raw text and the error:
    nothing raises and no text is lost.
    """
    out = ParsedOutput(content="")
    rest: list[str] = []
    if start:
        pos = 0
        while (i := text.find(start, pos)) >= 0:
            rest.append(text[pos:i])
            j = text.find(end, i + len(start)) if end else -1
            inner_end = j if j >= 0 else len(text)
            inner = text[i + len(start) : inner_end]
            pos = inner_end + len(end) if j >= 0 and end else len(text)
            try:
                obj = parser(inner, tools) if parser else json.loads(inner)
            except Exception as e:  # any parser failure is the model's, not ours
                out.invalid_tool_calls.append(_invalid(inner.strip(), f"{e}"))
                continue
            _add(out, obj, inner.strip(), tool_names)
        rest.append(text[pos:])
    else:
        rest.append(text)
    content_parts = [_bare_json_calls(part, out, tool_names) for part in rest]
    content = "".join(content_parts)
    if out.tool_calls or out.invalid_tool_calls:
        # models often fence a call in markdown: drop the fence the call left empty
        content = _EMPTY_FENCE.sub("", content)
    out.content = content.strip()
    return out


_CALL_KEYS = frozenset({"name", "arguments", "parameters", "id", "type"})


def _call_shaped(obj: Any, tool_names: set[str]) -> bool:
    """A bound tool's name, or the exact shape of a call (then: unknown tool)."""
    if not isinstance(obj, dict):
        return False
    name = obj.get("name")
    if isinstance(name, str) and name in tool_names:
        return True
    has_args = "arguments" in obj or "parameters" in obj
    return isinstance(name, str) and has_args and set(obj) <= _CALL_KEYS


def _bare_json_calls(text: str, out: ParsedOutput, tool_names: set[str]) -> str:
    """Take bare JSON calls out of `text`; return what is left as content."""
    decoder = json.JSONDecoder()
    kept: list[str] = []
    pos = 0
    while (m := _CALL_START.search(text, pos)) is not None:
        i = m.start()
        # a JSON array of calls: include its opening bracket
        k = i
        while k > pos and text[k - 1] in " \t\r\n":
            k -= 1
        if k > pos and text[k - 1] == "[":
            i = k - 1
        try:
            obj, j = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if not any(f'"{name}"' in text[i:] for name in tool_names):
                kept.append(text[pos:])  # broken JSON, but no call to our tools
                return "".join(kept)
            kept.append(text[pos:i])
            out.invalid_tool_calls.append(
                _invalid(text[i:].strip(), f"malformed tool call JSON: {e}")
            )
            return "".join(kept)
        items = obj if isinstance(obj, list) else [obj]
        if not any(_call_shaped(o, tool_names) for o in items):
            kept.append(text[pos:j])  # JSON that is not a tool call
        else:
            kept.append(text[pos:i])
            _add(out, obj, text[i:j], tool_names)
        pos = j
    kept.append(text[pos:])
    return "".join(kept)


# -- engine events -> message chunks ---------------------------------------------


class ReasoningSplitter:
    """Separates a thinking model's reasoning (`<think>...</think>`) from its answer.

    `inside=True` when the prompt already opened the thinking block (templates
    of reasoning models often end the generation prompt with `<think>`).
    """

    def __init__(self, think_start: str, think_end: str, *, inside: bool) -> None:
        self._start, self._end = think_start, think_end
        self._state = "inside" if inside else "undecided"
        self._lead = ""
        self._matcher = StopMatcher([think_end])

    def push(self, text: str) -> tuple[str, str]:
        """Feed generated text; return (reasoning, content) safe to emit now."""
        if self._state == "content":
            return "", text
        if self._state == "undecided":
            self._lead += text
            lead = self._lead.lstrip()
            if lead.startswith(self._start):
                self._state, text = "inside", lead[len(self._start) :]
            elif self._start.startswith(lead):
                return "", ""  # may still become the start marker
            else:
                self._state, self._lead = "content", ""
                return "", lead
        reasoning = self._matcher.push(text)
        if not self._matcher.stopped:
            return reasoning, ""
        self._state = "content"
        return reasoning, self._matcher.remainder[len(self._end) :].lstrip("\n")

    def flush(self) -> tuple[str, str]:
        """The held-back text at the end: unfinished reasoning, or content."""
        if self._state == "inside":
            return self._matcher.flush(), ""
        if self._state == "undecided":
            return "", self._lead
        return "", ""


class ChunkAssembler:
    """Turns one request's engine events into `AIMessageChunk`s.

    Without tools every delta is content. With tools bound, text is streamed
    as content until something that may start a tool call appears (the
    model's start marker, or `{`); from there it is held back and parsed at the
    end, so the text of a call never streams as content. The last chunk holds
    the rest of the content, the tool call chunks, usage and metadata.
    """

    def __init__(
        self,
        model_name: str,
        *,
        tool_names: frozenset[str] = frozenset(),
        start: str | None = None,
        end: str | None = None,
        parser: Callable[[str, Any], Any] | None = None,
        reasoning: ReasoningSplitter | None = None,
        tools: Any = None,
        parallel: bool | None = None,
    ) -> None:
        self.model_name = model_name
        self._reasoning = reasoning
        self._tool_names = set(tool_names)
        self._start, self._end, self._parser = start, end, parser
        triggers = [t for t in (start, "{") if t]
        self._holdback = StopMatcher(triggers) if tool_names else None
        self._raw_invalid = ""
        self._tools = tools
        self._parallel = parallel
        self.parsed: ParsedOutput | None = None
        """The tool-call parse of the held-back text (set by the last chunk)."""

    def chunk(self, event: Delta | Final) -> AIMessageChunk | None:
        """The chunk for an engine event (`Delta` or `Final`), if any."""
        if isinstance(event, Delta):
            thought, text = self._split(event.text)
            return _text_chunk(thought, text)
        thought, content = self._split("", final=True)
        tool_call_chunks = []
        if self._holdback is not None:
            content += self._holdback.flush()
            held = self._holdback.remainder
            self.parsed = parse_tool_calls(
                held,
                tool_names=self._tool_names,
                start=self._start,
                end=self._end,
                parser=self._parser,
                tools=self._tools,
            )
            if self._parallel is False and len(self.parsed.tool_calls) > 1:
                first, *extra = self.parsed.tool_calls
                self.parsed.tool_calls = [first]
                self.parsed.invalid_tool_calls += [
                    _invalid(
                        json.dumps({"name": c["name"], "arguments": c["args"]}),
                        "parallel_tool_calls=False: only the first call is kept",
                        c["name"],
                    )
                    for c in extra
                ]
            content += self.parsed.content
            # Streaming consumers merge chunks themselves (core turns raw args
            # into "valid" partial JSON), so a call that did not parse travels as
            # text; `finish` moves it to `invalid_tool_calls` for invoke.
            self._raw_invalid = "".join(
                f"\n{c['args']}" for c in self.parsed.invalid_tool_calls if c["args"]
            )
            content += self._raw_invalid
            tool_call_chunks = [
                tool_call_chunk(
                    name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i
                )
                for i, c in enumerate(self.parsed.tool_calls)
            ]
        metadata = response_metadata(event, self.model_name)
        if self.parsed and self.parsed.tool_calls:
            metadata["finish_reason"] = "tool_calls"
        return AIMessageChunk(
            content=content,
            additional_kwargs={"reasoning_content": thought} if thought else {},
            tool_call_chunks=tool_call_chunks,
            usage_metadata=usage_metadata(event),
            response_metadata=metadata,
            chunk_position="last",
        )

    def _split(self, text: str, *, final: bool = False) -> tuple[str, str]:
        """(reasoning, content to emit) for new text, through both hold-backs."""
        thought = ""
        if self._reasoning is not None:
            thought, text = self._reasoning.push(text)
            if final:
                more_thought, more_text = self._reasoning.flush()
                thought, text = thought + more_thought, text + more_text
        if self._holdback is not None and text:
            text = self._holdback.push(text)
        return thought, text

    def finish(self, message: BaseMessage) -> None:
        """Give the combined message the exact parse (no partial-JSON repair)."""
        if self.parsed is not None and isinstance(message, AIMessage):
            message.tool_calls = list(self.parsed.tool_calls)
            message.invalid_tool_calls = list(self.parsed.invalid_tool_calls)
            if isinstance(message.content, str):
                content = message.content
                if self._raw_invalid and content.endswith(self._raw_invalid):
                    content = content[: -len(self._raw_invalid)]
                if self.parsed.tool_calls or self.parsed.invalid_tool_calls:
                    content = _EMPTY_FENCE.sub("", content)
                message.content = content.strip()


def _text_chunk(thought: str, text: str) -> AIMessageChunk | None:
    if not thought and not text:
        return None
    extra = {"reasoning_content": thought} if thought else {}
    return AIMessageChunk(content=text, additional_kwargs=extra)

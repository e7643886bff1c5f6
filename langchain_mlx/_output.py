"""Engine events -> LangChain output. Pure: no mlx.

The engine has already split the text (engine/text.py): content and reasoning
segments stream as they come; the text of tool calls arrives as "tool"
segments and is parsed here at the end (`parse_tool_calls`): calls, invalid
calls (malformed, unknown tool, or cut by `max_tokens`), and JSON that was not a
call after all (content). Token usage and response metadata are built from the
engine's `Final`, so the chat model and the LLM report them the same way.
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
from langchain_core.utils.json import parse_partial_json

from langchain_mlx.engine.types import Final, Segment

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


def truncation_error(final: Final) -> str:
    """What to tell the user about output cut by `max_tokens`."""
    return (
        f"the output was cut by max_tokens after {final.generation_tokens} tokens, "
        "before it was complete; raise max_tokens"
    )


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
        # tokens a grammar forced (fed without a decode step each), drafted by
        # speculative decoding, and drafted tokens the model confirmed
        "forced_tokens": final.forced_tokens,
        "drafted_tokens": final.drafted_tokens,
        "accepted_tokens": final.accepted_tokens,
        # where the prompt's cached tokens (usage cache_read) came from
        "cache_read_from": final.cache_source,
    }


# -- tool calls in generated text ----------------------------------------------

_CALL_START = re.compile(r'\{\s*"name"\s*:')
_NAMED = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
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
    truncated: str | None = None,
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
            if j < 0 and truncated:
                out.invalid_tool_calls.append(_invalid(inner.strip(), truncated))
                continue
            try:
                obj = parser(inner, tools) if parser else json.loads(inner)
            except Exception as e:  # any parser failure is the model's, not ours
                out.invalid_tool_calls.append(_invalid(inner.strip(), f"{e}"))
                continue
            _add(out, obj, inner.strip(), tool_names)
        rest.append(text[pos:])
    else:
        rest.append(text)
    content_parts = [
        _bare_json_calls(part, out, tool_names, truncated) for part in rest
    ]
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


def _bare_json_calls(
    text: str, out: ParsedOutput, tool_names: set[str], truncated: str | None = None
) -> str:
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
            named = _NAMED.match(text, m.start())
            if named is not None and json.loads(f'"{named[1]}"') not in tool_names:
                kept.append(text[pos:])  # broken JSON naming no tool of ours
                return "".join(kept)
            # otherwise `{"name":` starts a call: broken or cut JSON there is
            # an invalid call, never content that looks like half a call
            kept.append(text[pos:i])
            error = truncated or f"malformed tool call JSON: {e}"
            name = json.loads(f'"{named[1]}"') if named is not None else None
            out.invalid_tool_calls.append(_invalid(text[i:].strip(), error, name))
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


class ChunkAssembler:
    """Turns one request's engine events into `AIMessageChunk`s.

    Content and reasoning segments become chunks at once; tool segments are
    kept and parsed at the end. The last chunk holds what the parse gave back as
    content, the tool call chunks, usage and metadata. With `logprobs`, every
    chunk carries `response_metadata["logprobs"]["content"]`: one OpenAI-style
    entry per token of its content (merged chunks join them in order).
    """

    def __init__(
        self,
        model_name: str,
        *,
        tool_names: frozenset[str] = frozenset(),
        start: str | None = None,
        end: str | None = None,
        parser: Callable[[str, Any], Any] | None = None,
        tools: Any = None,
        parallel: bool | None = None,
        forced: bool = False,
    ) -> None:
        self.model_name = model_name
        self._forced = forced
        self._tool_names = set(tool_names)
        self._start, self._end, self._parser = start, end, parser
        self._tools = tools
        self._parallel = parallel
        self._tool_text = ""
        self._pending_logprobs: list[dict[str, Any]] = []
        self._tool_logprobs: list[dict[str, Any]] = []
        self._calls: list[ToolCall] = []
        self._invalid_calls: list[InvalidToolCall] = []
        self.parsed: ParsedOutput | None = None
        """The tool-call parse of the tool text (set by the last chunk)."""

    def chunk(self, event: Segment | Final) -> AIMessageChunk | None:
        """The chunk for an engine event (`Segment` or `Final`), if any."""
        if isinstance(event, Segment):
            return self._segment_chunk(event)
        return self._last_chunk(event)

    def _segment_chunk(self, segment: Segment) -> AIMessageChunk | None:
        entries = [e.as_openai() for e in segment.logprobs]
        if segment.kind == "tool":
            self._tool_text += segment.text
            self._pending_logprobs += entries
            return None
        # tool text followed by more text is complete: parse it now, so JSON
        # that was not a call comes back in its place
        content, content_logprobs = self._parse_tool_text(None)
        reasoning = segment.text if segment.kind == "reasoning" else ""
        if segment.kind == "content":
            content += segment.text
            content_logprobs += entries
        if not content and not reasoning:
            return None
        metadata: dict[str, Any] = {}
        if content_logprobs or (reasoning and entries):
            metadata["logprobs"] = {"content": content_logprobs}
            if reasoning and entries:
                metadata["logprobs"]["reasoning"] = entries
        return AIMessageChunk(
            content=content,
            additional_kwargs={"reasoning_content": reasoning} if reasoning else {},
            response_metadata=metadata,
        )

    def _parse_tool_text(self, truncated: str | None) -> tuple[str, list[Any]]:
        """Parse the pending tool text into calls; return what is content."""
        text, self._tool_text = self._tool_text, ""
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        if not text:
            return "", []
        parsed = parse_tool_calls(
            text,
            tool_names=self._tool_names,
            start=self._start,
            end=self._end,
            parser=self._parser,
            tools=self._tools,
            truncated=truncated,
        )
        if self._forced and parsed.content:  # a required call: nothing else is
            error = truncated or "the output is not a tool call"
            parsed.invalid_tool_calls.append(_invalid(parsed.content, error))
            parsed.content = ""
        if not parsed.tool_calls and not parsed.invalid_tool_calls:
            return text, logprobs  # not a call after all: the text as it was
        self._calls += parsed.tool_calls
        self._invalid_calls += parsed.invalid_tool_calls
        self._tool_logprobs += logprobs
        return parsed.content, []

    def _last_chunk(self, final: Final) -> AIMessageChunk:
        metadata = response_metadata(final, self.model_name)
        truncated = truncation_error(final) if final.finish_reason == "length" else None
        content, content_logprobs = self._parse_tool_text(truncated)
        self._keep_first_call_only()
        self.parsed = ParsedOutput(
            content="", tool_calls=self._calls, invalid_tool_calls=self._invalid_calls
        )
        tool_call_chunks = [
            tool_call_chunk(
                name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i
            )
            for i, c in enumerate(self._calls)
        ]
        tool_call_chunks += [
            tool_call_chunk(
                name=c["name"], args=streamed_invalid_args(c), id=c["id"], index=i
            )
            for i, c in enumerate(self._invalid_calls, start=len(tool_call_chunks))
        ]
        logprobs: dict[str, Any] = {}
        if content_logprobs:
            logprobs["content"] = content_logprobs
        if self._tool_logprobs:
            logprobs["tool_calls"] = self._tool_logprobs
        if logprobs:
            metadata["logprobs"] = logprobs
        if self._invalid_calls:
            metadata["invalid_tool_call_errors"] = [
                {"id": c["id"], "error": c["error"]} for c in self._invalid_calls
            ]
        if self._calls and final.finish_reason != "length":
            metadata["finish_reason"] = "tool_calls"
        return AIMessageChunk(
            content=content,
            tool_call_chunks=tool_call_chunks,
            usage_metadata=usage_metadata(final),
            response_metadata=metadata,
            chunk_position="last",
        )

    def _keep_first_call_only(self) -> None:
        if self._parallel is not False or len(self._calls) <= 1:
            return
        first, *extra = self._calls
        self._calls = [first]
        self._invalid_calls += [
            _invalid(
                json.dumps({"name": c["name"], "arguments": c["args"]}),
                "parallel_tool_calls=False: only the first call is kept",
                c["name"],
            )
            for c in extra
        ]

    def finish(self, message: BaseMessage) -> None:
        """Give the combined message the exact calls (raw args, errors).

        The content is left as the stream built it, so invoke and a merged
        stream (what LangGraph's stream modes give) agree.
        """
        if self.parsed is not None and isinstance(message, AIMessage):
            message.tool_calls = list(self.parsed.tool_calls)
            message.invalid_tool_calls = list(self.parsed.invalid_tool_calls)


def streamed_invalid_args(call: InvalidToolCall) -> str:
    """An invalid call's raw text as a stream chunk's `args`.

    LangChain rebuilds calls from merged chunks with `parse_partial_json`, which
    would "repair" a call cut at `{"name":` into a valid empty call. Raw text it
    would repair is therefore sent JSON-quoted (a string, never a call's
    arguments), so the merged stream reports it in `invalid_tool_calls` too.
    """
    raw = str(call.get("args") or "")
    try:
        repaired = parse_partial_json(raw)
    except Exception:  # unparseable: stays invalid
        return raw
    return json.dumps(raw) if isinstance(repaired, dict) else raw

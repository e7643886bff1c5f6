"""LangChain messages -> chat-template dicts -> prompt token ids. Pure: no mlx.

`render_prompt` is the one entry point: it applies the conversation's system
message policy, converts every message (content blocks, names, tool calls,
tool results), renders the model's own chat template and tokenizes the text so
that only the template's own markers become control tokens.

Tokenizing the rendered text as a whole would turn `<|im_start|>system` inside
a web page or a tool result into a real turn (role injection). So the strings
the template receives have their control-token strings swapped for
placeholders while it renders: any control-token string left in the text is
the template's. Without placeholders the text is tokenized as it always was;
with them `_PlainCopy` (the `tokenizers` backend with the control tokens
renamed) encodes it, the messages' strings put back as plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_mlx._control_tokens import (
    UnencodableTextError,
    control_tokens_of,
    encode_prompt,
    encode_with_placeholders,
    free_guard,
)
from langchain_mlx._json import json_ready, json_text

# Blocks an assistant turn may carry that the template gets elsewhere or drops:
# tool calls travel in `tool_calls`; earlier reasoning is not re-sent (chat
# templates of reasoning models strip it too).
_AI_BLOCKS_CARRIED_ELSEWHERE = frozenset(
    {
        "tool_use",
        "tool_call",
        "tool_call_chunk",
        "function_call",
        "reasoning",
        "thinking",
    }
)


class UnsupportedContentError(ValueError):
    """A message holds content this text-only model cannot take."""


class ChatTemplateError(ValueError):
    """The model's chat template cannot render the conversation."""


def message_to_dict(
    message: BaseMessage, *, calls_as_text: bool = False, where: str | None = None
) -> dict[str, Any]:
    """Convert one LangChain message to the dict chat templates expect.

    `calls_as_text`: write an AI message's tool calls into its content as bare
    JSON lines (for templates that cannot render `tool_calls`; it is the format
    the tools fallback instruction asks for), instead of dropping them.
    `where` names the message in errors (default: its class).

    Raises:
        UnsupportedContentError: a content block is not text (or a text block
            without a string).
        ValueError: a tool call's arguments are not a JSON object (or a JSON
            object string), or hold a value without a JSON form.

    """
    where = where or type(message).__name__
    if isinstance(message, SystemMessage):
        content = _text(message, "system", where)
        out: dict[str, Any] = {"role": "system", "content": content}
    elif isinstance(message, HumanMessage):
        out = {"role": "user", "content": _text(message, "user", where)}
    elif isinstance(message, AIMessage):
        content = _text(message, "assistant", where)
        # A call that did not parse is still what the model said: keep its text.
        raw = [_raw_call_text(c.get("args")) for c in message.invalid_tool_calls]
        content = "\n".join(p for p in [content, *raw] if p)
        calls = [
            (call, call_arguments(call.get("args"), _call_label(where, i, call)))
            for i, call in enumerate(message.tool_calls)
        ]
        if calls_as_text and calls:
            lines = [
                json.dumps({"name": c["name"], "arguments": a}, ensure_ascii=False)
                for c, a in calls
            ]
            content = "\n".join(p for p in [content, *lines] if p)
        out = {"role": "assistant", "content": content}
        if calls and not calls_as_text:
            out["tool_calls"] = [
                {
                    "id": call.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {"name": call["name"], "arguments": arguments},
                }
                for i, (call, arguments) in enumerate(calls)
            ]
    elif isinstance(message, ToolMessage):
        content = _text(message, "tool", where)
        if message.status == "error" and not content.lower().startswith("error"):
            content = f"Error: {content}"
        out = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
    elif isinstance(message, FunctionMessage):
        out = {"role": "tool", "content": _text(message, "tool", where)}
    elif isinstance(message, ChatMessage):
        out = {"role": message.role, "content": _text(message, message.role, where)}
    else:
        msg = (
            f"cannot render a {type(message).__name__} for a chat template; use "
            "SystemMessage, HumanMessage, AIMessage, ToolMessage or ChatMessage"
        )
        raise TypeError(msg)
    if message.name and "name" not in out:
        out["name"] = message.name
    return out


def _call_label(where: str, index: int, call: Mapping[str, Any]) -> str:
    return f"{where}: tool_calls[{index}] ({call.get('name')!r}, id {call.get('id')!r})"


def call_arguments(args: Any, where: str) -> dict[str, Any]:
    """A tool call's arguments as a JSON-ready dict (a JSON object string parsed).

    Raises:
        ValueError: `args` is not a dict or a JSON object string, or holds a
            value without a JSON form; the message starts with `where`.

    """
    if isinstance(args, str):
        try:
            args = json.loads(args, strict=False) if args.strip() else {}
        except json.JSONDecodeError as e:
            shown = args if len(args) <= 60 else args[:57] + "..."
            msg = (
                f"{where} has arguments that are not valid JSON ({e}): {shown!r}; "
                "pass the arguments as a dict or a JSON object string"
            )
            raise ValueError(msg) from e
    if not isinstance(args, Mapping):
        msg = (
            f"{where} has arguments that are not a JSON object (got "
            f"{type(args).__name__}); pass a dict of argument names to values"
        )
        raise ValueError(msg)  # noqa: TRY004 (also a JSON string's value)
    ready: dict[str, Any] = json_ready(args, where, "args")
    return ready


def check_openai_tool_calls(messages: Any) -> None:
    """Check OpenAI-style message dicts' `function.arguments` before LangChain.

    `convert_to_messages` parses them with a bare `json.loads`; a call that is
    not JSON fails there with a `JSONDecodeError` that names no message.

    Raises:
        ValueError: the message and tool call whose arguments are not JSON.

    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        calls = message.get("tool_calls")
        for j, call in enumerate(calls if isinstance(calls, list) else []):
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                label = f"messages[{i}] ({message.get('role', message.get('type'))})"
                named = {"name": function.get("name"), "id": call.get("id")}
                call_arguments(function.get("arguments"), _call_label(label, j, named))


def _raw_call_text(args: Any) -> str:
    """An invalid call's text as the model wrote it.

    A stream sends raw text that LangChain would repair into a call JSON-quoted
    (see `_output.streamed_invalid_args`): unquote it.
    """
    text = str(args or "")
    if text.startswith('"'):
        try:
            unquoted = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(unquoted, str):
            return unquoted
    return text


def _text(message: BaseMessage, role: str, where: str) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for i, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            if not isinstance(text := block.get("text"), str):
                msg = (
                    f"{where}: content[{i}] is a text block whose 'text' is "
                    f"{text!r}; its 'text' must be a string: {{'type': 'text', "
                    "'text': '...'}} (drop the block if there is no text)"
                )
                raise UnsupportedContentError(msg)
            parts.append(text)
        elif role == "assistant" and kind in _AI_BLOCKS_CARRIED_ELSEWHERE:
            continue
        elif kind == "json" and "json" in block:  # e.g. a tool's structured result
            parts.append(json_text(block["json"], where, f"content[{i}].json"))
        else:
            msg = (
                f"{where}: content[{i}] is a block of type {kind!r}; this model "
                "takes text only (text blocks and strings). Describe the content "
                "in text, or use a multimodal model."
            )
            raise UnsupportedContentError(msg)
    return "".join(parts)


def messages_to_dicts(
    messages: Sequence[BaseMessage],
    system_message: SystemMessage | None,
    *,
    calls_as_text: bool = False,
) -> list[dict[str, Any]]:
    """Convert a conversation, adding `system_message` if it has no system turn."""
    if not messages:
        msg = "the conversation is empty: pass at least one message"
        raise ValueError(msg)
    dicts = [
        message_to_dict(m, calls_as_text=calls_as_text, where=_label(i, m))
        for i, m in enumerate(messages)
    ]
    if system_message is not None and not any(d["role"] == "system" for d in dicts):
        dicts.insert(0, message_to_dict(system_message, where="system_message"))
    return dicts


def _label(index: int, message: BaseMessage) -> str:
    return f"messages[{index}] ({type(message).__name__})"


def merge_system_into_first_user(dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates without a system role: put system text in the first user turn."""
    system = "\n\n".join(d["content"] for d in dicts if d["role"] == "system")
    rest = [dict(d) for d in dicts if d["role"] != "system"]
    if not system:
        return rest
    for d in rest:
        if d["role"] == "user":
            d["content"] = f"{system}\n\n{d['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def render_text(
    tokenizer: Any,
    messages: Sequence[BaseMessage],
    *,
    system_message: SystemMessage | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    system_suffix: str | None = None,
    calls_as_text: bool = False,
) -> str:
    """Render the conversation with the tokenizer's chat template.

    `system_suffix` is appended to the system turn (after `system_message` is
    applied): instructions for tools or a response schema.
    """
    dicts, tool_list = _template_inputs(
        messages, system_message, tools, system_suffix, calls_as_text
    )
    return _apply_template(tokenizer, dicts, tool_list)


def render_prompt(
    tokenizer: Any,
    messages: Sequence[BaseMessage],
    *,
    system_message: SystemMessage | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    system_suffix: str | None = None,
    calls_as_text: bool = False,
) -> list[int]:
    """Render the conversation and tokenize it.

    Only the chat template's own markers become control tokens: the same
    strings inside messages, names, tool calls, tool results or tools are
    tokenized as plain text.

    Raises:
        UnencodableTextError: a string holds a lone surrogate, or text this
            tokenizer turns into a control token however it is split.
        ChatTemplateError: the template cannot render the conversation.

    """
    dicts, tool_list = _template_inputs(
        messages, system_message, tools, system_suffix, calls_as_text
    )
    control = control_tokens_of(tokenizer)
    if control is None:  # no added tokens: nothing in the text can become one
        text = _apply_template(tokenizer, dicts, tool_list)
        return list(tokenizer.encode(text, add_special_tokens=False))
    carried = "\0".join(_strings([dicts, tool_list]))
    if control.pattern.search(carried) is None:
        text = _apply_template(tokenizer, dicts, tool_list)
        return encode_prompt(tokenizer, control, text)
    guard = free_guard(carried + "\0" + control.template)

    def hide(match: re.Match[str]) -> str:
        return f"{guard}{control.index[match.group()]}{guard}"

    text = _apply_template(
        tokenizer,
        _map_strings(dicts, lambda s: control.pattern.sub(hide, s)),
        _map_strings(tool_list, lambda s: control.pattern.sub(hide, s)),
    )
    return encode_with_placeholders(tokenizer, control, text, guard)


# --- the template's inputs -------------------------------------------------


def _template_inputs(
    messages: Sequence[BaseMessage],
    system_message: SystemMessage | None,
    tools: Sequence[dict[str, Any]] | None,
    system_suffix: str | None,
    calls_as_text: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The message dicts and tools for the template, checked to be valid text."""
    dicts = messages_to_dicts(messages, system_message, calls_as_text=calls_as_text)
    added = len(dicts) - len(messages)  # 1 when `system_message` was put in front
    for i, d in enumerate(dicts):
        where = (
            "system_message" if i < added else _label(i - added, messages[i - added])
        )
        _check_unicode(d, where, "")
    tool_list = [dict(t) for t in tools] if tools else None
    for i, tool in enumerate(tool_list or []):
        _check_unicode(tool, f"tools[{i}]", "")
    if system_suffix:
        _check_unicode(
            system_suffix, "the system instructions (tools or response format)", "text"
        )
        if dicts[0]["role"] == "system":
            first = dicts[0]["content"]
            dicts[0] = {
                **dicts[0],
                "content": f"{first}\n\n{system_suffix}" if first else system_suffix,
            }
        else:
            dicts.insert(0, {"role": "system", "content": system_suffix})
    return dicts, tool_list


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_unicode(value: Any, where: str, path: str) -> None:
    """Raise `UnencodableTextError` at the first lone surrogate in `value`.

    `tokenizers` cannot take one (it fails with an opaque TypeError), so it is
    reported here with the message and the place that hold it.
    """
    if isinstance(value, str):
        if (found := _LONE_SURROGATE.search(value)) is None:
            return
        at = found.start()
        near = value[max(0, at - 20) : at + 20]
        msg = (
            f"{where} has a lone surrogate {found.group()!r} in "
            f"{path or 'its text'} at character {at} (near {near!r}): text must "
            "be valid Unicode. It usually comes from bytes decoded with "
            "errors='surrogateescape' or a UTF-16 pair cut in half; decode with "
            "errors='replace' or repair the string before sending it."
        )
        raise UnencodableTextError(msg)
    if isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where, f"{path} (a key)" if path else "a key")
            step = key if isinstance(key, str) and key.isidentifier() else repr(key)
            _check_unicode(item, where, f"{path}.{step}" if path else str(step))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_unicode(item, where, f"{path}[{i}]")


def _strings(value: Any) -> list[str]:
    """Every string in a nest of dicts (keys too) and lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def _map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change` applied to every string in it (dict keys too)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {
            _map_strings(k, change): _map_strings(v, change) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, change) for item in value]
    return value


def _apply_template(
    tokenizer: Any,
    dicts: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
) -> str:
    if not getattr(tokenizer, "chat_template", None) and not getattr(
        tokenizer, "has_chat_template", False
    ):
        msg = (
            "this model's tokenizer has no chat template, so ChatMLX cannot turn "
            "messages into a prompt; use MLXPipeline for plain text completion, or "
            "pass tokenizer_config={'chat_template': ...} when loading the model"
        )
        raise ChatTemplateError(msg)
    kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    if tools:
        kwargs["tools"] = tools
    try:
        return str(tokenizer.apply_chat_template(dicts, **kwargs))
    except Exception as e:
        if "system" not in str(e).lower() or not any(
            d["role"] == "system" for d in dicts
        ):
            msg = f"the model's chat template failed to render the conversation: {e}"
            raise ChatTemplateError(msg) from e
    # The template has no system role (e.g. Gemma): fold it into the first turn.
    try:
        return str(
            tokenizer.apply_chat_template(merge_system_into_first_user(dicts), **kwargs)
        )
    except Exception as e:
        msg = f"the model's chat template failed to render the conversation: {e}"
        raise ChatTemplateError(msg) from e

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
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


class UnencodableTextError(ValueError):
    """A message holds text that cannot be tokenized (e.g. a lone surrogate)."""


def message_to_dict(
    message: BaseMessage, *, calls_as_text: bool = False
) -> dict[str, Any]:
    """Convert one LangChain message to the dict chat templates expect.

    `calls_as_text`: write an AI message's tool calls into its content as bare
    JSON lines (for templates that cannot render `tool_calls`; it is the format
    the tools fallback instruction asks for), instead of dropping them.
    """
    if isinstance(message, SystemMessage):
        out: dict[str, Any] = {"role": "system", "content": _text(message, "system")}
    elif isinstance(message, HumanMessage):
        out = {"role": "user", "content": _text(message, "user")}
    elif isinstance(message, AIMessage):
        content = _text(message, "assistant")
        # A call that did not parse is still what the model said: keep its text.
        raw = [str(c.get("args") or "") for c in message.invalid_tool_calls]
        content = "\n".join(p for p in [content, *raw] if p)
        if calls_as_text and message.tool_calls:
            lines = [
                json.dumps(
                    {"name": c["name"], "arguments": c["args"]}, ensure_ascii=False
                )
                for c in message.tool_calls
            ]
            content = "\n".join(p for p in [content, *lines] if p)
        out = {"role": "assistant", "content": content}
        if message.tool_calls and not calls_as_text:
            out["tool_calls"] = [
                {
                    "id": call.get("id") or f"call_{i}",
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["args"]},
                }
                for i, call in enumerate(message.tool_calls)
            ]
    elif isinstance(message, ToolMessage):
        content = _text(message, "tool")
        if message.status == "error" and not content.lower().startswith("error"):
            content = f"Error: {content}"
        out = {"role": "tool", "content": content, "tool_call_id": message.tool_call_id}
    elif isinstance(message, FunctionMessage):
        out = {"role": "tool", "content": _text(message, "tool")}
    elif isinstance(message, ChatMessage):
        out = {"role": message.role, "content": _text(message, message.role)}
    else:
        msg = (
            f"cannot render a {type(message).__name__} for a chat template; use "
            "SystemMessage, HumanMessage, AIMessage, ToolMessage or ChatMessage"
        )
        raise TypeError(msg)
    if message.name and "name" not in out:
        out["name"] = message.name
    return out


def _text(message: BaseMessage, role: str) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif role == "assistant" and kind in _AI_BLOCKS_CARRIED_ELSEWHERE:
            continue
        elif kind == "json" and "json" in block:  # e.g. a tool's structured result
            parts.append(json.dumps(block["json"], ensure_ascii=False))
        else:
            msg = (
                f"{type(message).__name__} has a content block of type {kind!r}; "
                "this model takes text only (text blocks and strings). Describe "
                "the content in text, or use a multimodal model."
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
    dicts = [message_to_dict(m, calls_as_text=calls_as_text) for m in messages]
    if system_message is not None and not any(d["role"] == "system" for d in dicts):
        dicts.insert(0, message_to_dict(system_message))
    return dicts


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
    control = _control_tokens(tokenizer)
    if control is None:  # no added tokens: nothing in the text can become one
        text = _apply_template(tokenizer, dicts, tool_list)
        return list(tokenizer.encode(text, add_special_tokens=False))
    carried = "\0".join(_strings([dicts, tool_list]))
    if control.pattern.search(carried) is None:
        text = _apply_template(tokenizer, dicts, tool_list)
        return _encode_prompt(tokenizer, control, text)
    guard = _free_guard(carried + "\0" + control.template)

    def hide(match: re.Match[str]) -> str:
        return f"{guard}{control.index[match.group()]}{guard}"

    text = _apply_template(
        tokenizer,
        _map_strings(dicts, lambda s: control.pattern.sub(hide, s)),
        _map_strings(tool_list, lambda s: control.pattern.sub(hide, s)),
    )
    return _encode_with_placeholders(tokenizer, control, text, guard)


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
        if i < added:
            where = "system_message"
        else:
            where = f"messages[{i - added}] ({type(messages[i - added]).__name__})"
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


# --- which added tokens are control tokens ---------------------------------

# Stand-ins: a message's control-token string becomes `guard + index + guard`
# while the template renders (guard: a private-use character found in no
# string of the request); in `_PlainCopy` a template marker is the added token
# `_OPEN + index + _CLOSE`.
_GUARDS = range(0xF0000, 0xFFFFE)
_OPEN, _CLOSE = "\U0010fff0", "\U0010fff1"
_MAX_SPLITS = 1000
_MARKER_SHAPE = re.compile(r"\s*[<\[].*[>\]]\s*", re.DOTALL)


class _ControlTokens:
    """The added tokens of one tokenizer that message text must never become.

    Every special token, mlx-lm's think and tool-call markers, and the other
    added tokens shaped like markers (`<...>`, `[...]`) that the template's
    source names or that are not the model's own piece of text (Qwen's
    `<tool_call>`). Added pieces of text (Gemma's whitespace runs and HTML
    tags, words added to a vocabulary) stay tokens in messages too.
    """

    def __init__(self, ids: dict[str, int], backend: Any, template: str) -> None:
        self.id_set = frozenset(ids.values())
        self.index = {s: i for i, s in enumerate(ids)}
        self.strings = list(ids)
        longest_first = sorted(ids, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, longest_first)))
        """Any control-token string, the longest first (as `tokenizers` matches)."""
        self.template = template
        self._backend = backend
        self._plain: _PlainCopy | None = None
        self._lock = threading.Lock()

    def plain_copy(self) -> _PlainCopy | None:
        """The backend copy for text with control-token strings (built once)."""
        if self._backend is None:
            return None
        with self._lock:
            if self._plain is None:
                self._plain = _PlainCopy.build(self._backend, self.strings)
            return self._plain


_TABLES: dict[int, tuple[Callable[[], Any], tuple[Any, ...], _ControlTokens | None]]
_TABLES = {}
_TABLES_LOCK = threading.Lock()


def _control_tokens(tokenizer: Any) -> _ControlTokens | None:
    """The control tokens of a tokenizer (mlx-lm wrapper or Hugging Face), cached."""
    hf = tokenizer
    if not hasattr(tokenizer, "backend_tokenizer"):  # unwrap mlx-lm's wrapper
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    template = getattr(hf, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates (older transformers)
        template = "\0".join(str(t) for t in template.values())
    size = backend.get_vocab_size(True) if backend is not None else None
    signature = (size, template)
    key = id(tokenizer)
    with _TABLES_LOCK:
        ref, known, table = _TABLES.get(key, (None, None, None))
        if ref is not None and ref() is tokenizer and known == signature:
            return table
    table = _find_control_tokens(tokenizer, hf, backend, str(template))
    try:  # forget the table with the tokenizer (a closed engine frees both)
        ref = weakref.ref(tokenizer)
        weakref.finalize(tokenizer, _TABLES.pop, key, None)
    except TypeError:  # not weak-referenceable: keep it alive, so its id stays
        ref = lambda: tokenizer  # noqa: E731
    with _TABLES_LOCK:
        _TABLES[key] = (ref, signature, table)
    return table


def _find_control_tokens(
    tokenizer: Any, hf: Any, backend: Any, template: str
) -> _ControlTokens | None:
    markers = {
        getattr(tokenizer, name, None)
        for name in ("think_start", "think_end", "tool_call_start", "tool_call_end")
    }
    if backend is not None:
        added = [
            (i, t.content, bool(t.special))
            for i, t in backend.get_added_tokens_decoder().items()
        ]
        model = backend.model
    else:
        decoder = getattr(hf, "added_tokens_decoder", None) or {}
        added = [
            (i, str(t), bool(getattr(t, "special", True))) for i, t in decoder.items()
        ]
        if not added:
            vocab: dict[str, int] = getattr(hf, "get_added_vocab", dict)()
            added = [(i, s, True) for s, i in vocab.items()]
        model = None
    ids = {
        content: token_id
        for token_id, content, special in sorted(added)
        if content
        and (
            special
            or content in markers
            or _looks_like_marker(content, token_id, template, model)
        )
    }
    if not ids:
        return None
    return _ControlTokens(ids, backend, template)


def _looks_like_marker(content: str, token_id: int, template: str, model: Any) -> bool:
    """`<...>` or `[...]`, named by the template or not the model's own text."""
    return bool(_MARKER_SHAPE.fullmatch(content)) and (
        content in template or model is None or model.token_to_id(content) != token_id
    )


def _free_guard(text: str) -> str:
    """A private-use character that does not occur in `text`."""
    for code in _GUARDS:
        if chr(code) not in text:
            return chr(code)
    msg = "the conversation holds every private-use character; cannot tokenize it"
    raise UnencodableTextError(msg)


# --- tokenizing ------------------------------------------------------------


def _encode_prompt(tokenizer: Any, control: _ControlTokens, text: str) -> list[int]:
    """Tokenize a prompt whose messages hold no control-token string.

    Every control-token string in `text` is the template's, so the text is
    tokenized as a whole, as `tokenizer.encode` always did. Should the
    tokenizer still make more control tokens than the template wrote (a
    normalizer or merges building one from other text), the text is encoded
    with those made from plain text.
    """
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    made = sum(map(control.id_set.__contains__, ids))
    if made <= len(control.pattern.findall(text)):
        return ids
    return _encode_with_placeholders(tokenizer, control, text, "")


def _encode_with_placeholders(
    tokenizer: Any, control: _ControlTokens, text: str, guard: str
) -> list[int]:
    """Tokenize rendered text in which messages' control-token strings are hidden.

    `guard + index + guard` in `text` is control token `index` written by a
    message: it goes back as plain text. Any other control-token string is
    the template's marker.
    """
    plain = control.plain_copy()
    placeholder = re.compile(f"{guard}(\\d+){guard}") if guard else None

    def restore(part: str) -> str:
        if placeholder is None:
            return part
        return placeholder.sub(lambda m: control.strings[int(m.group(1))], part)

    if plain is None:
        return _encode_split(tokenizer, control, text, placeholder)
    # A message's own `_OPEN` characters could spell a marker of the copy:
    # each is encoded on its own, so no marker can span one.
    pieces: list[str] = []
    for i, part in enumerate(text.split(_OPEN)):
        if i:
            pieces.append(_OPEN)
        marked = control.pattern.sub(lambda m: plain.marker[m.group()], part)
        pieces.append(restore(marked))
    return plain.encode([p for p in pieces if p], control.id_set)


def _encode_split(
    tokenizer: Any,
    control: _ControlTokens,
    text: str,
    placeholder: re.Pattern[str] | None,
) -> list[int]:
    """Without a `tokenizers` backend: split messages' markers after one character."""
    pieces, at, start = [], 0, ""
    for m in placeholder.finditer(text) if placeholder else ():
        token = control.strings[int(m.group(1))]
        pieces.append(start + text[at : m.start()] + token[0])
        start, at = token[1:], m.end()
    pieces.append(start + text[at:])
    ids = [
        i for p in pieces if p for i in tokenizer.encode(p, add_special_tokens=False)
    ]
    written = len(control.pattern.findall(text))
    if sum(1 for i in ids if i in control.id_set) > written:
        msg = (
            "a message holds text that this tokenizer turns into a control token "
            "even when split; remove chat-template markers from the messages"
        )
        raise UnencodableTextError(msg)
    return ids


@dataclass(frozen=True)
class _PlainCopy:
    """The `tokenizers` backend with the control tokens renamed `_OPEN n _CLOSE`.

    To it, control-token strings are plain text and only the stand-ins we put
    where the template wrote markers are tokens. Everything else (normalizer,
    pre-tokenizer, the added tokens' lstrip/rstrip/single_word/normalized
    flags) is the original's, so text encodes to the same ids as before.
    """

    tokenizer: Any
    marker: dict[str, str]
    """Control-token string -> the added token that stands for it here."""
    added: frozenset[int]
    original: dict[int, int]
    """This copy's id -> the original id, for added tokens whose id moved."""

    @classmethod
    def build(cls, backend: Any, control: list[str]) -> _PlainCopy:
        from tokenizers import Tokenizer

        data = json.loads(backend.to_str())
        names: list[tuple[str, str]] = []  # (original content, content here)
        marker: dict[str, str] = {}
        for n, entry in enumerate(data.get("added_tokens") or []):
            content = entry["content"]
            if content in control:
                marker[content] = entry["content"] = f"{_OPEN}{n}{_CLOSE}"
            names.append((content, entry["content"]))
        copy = Tokenizer.from_str(json.dumps(data))
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = False
        # Loading gives added tokens their ids anew: map them back.
        ids = {copy.token_to_id(here): backend.token_to_id(c) for c, here in names}
        pairs = {n: o for n, o in ids.items() if n is not None and o is not None}
        original = {new: old for new, old in pairs.items() if new != old}
        return cls(copy, marker, frozenset(pairs), original)

    def encode(self, pieces: list[str], control_ids: frozenset[int]) -> list[int]:
        """Encode the pieces one after another, as plain text but the markers.

        Should the model itself build a control token out of plain text (a
        merge rule spelling `<start_of_turn>`), that text is split after its
        first character and encoded again.
        """
        made_from_text = control_ids - self.added
        for _ in range(_MAX_SPLITS):
            encodings = self.tokenizer.encode_batch(pieces, add_special_tokens=False)
            ids = [e.ids for e in encodings]
            if all(made_from_text.isdisjoint(piece_ids) for piece_ids in ids):
                return [self.original.get(i, i) for piece_ids in ids for i in piece_ids]
            n, start, end = next(
                (n, start, end)
                for n, e in enumerate(encodings)
                for i, (start, end) in zip(ids[n], e.offsets, strict=True)
                if i in made_from_text
            )
            if end - start < 2:
                msg = (
                    f"a message holds {pieces[n][start:end]!r}, which this "
                    "tokenizer turns into a control token; remove it from the messages"
                )
                raise UnencodableTextError(msg)
            pieces[n : n + 1] = [pieces[n][: start + 1], pieces[n][start + 1 :]]
        msg = "the messages hold too many strings that become control tokens"
        raise UnencodableTextError(msg)

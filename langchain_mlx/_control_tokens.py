"""Which added tokens are control tokens, and tokenizing so only the template's are.

Used by `_messages.render_prompt`: message strings have their control-token
strings swapped for placeholders while the template renders, so any control
token left in the text is the template's; `_PlainCopy` (the `tokenizers`
backend with the control tokens renamed) then encodes the text with the
messages' strings put back as plain text. Pure: no mlx.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnencodableTextError(ValueError):
    """A message holds text that cannot be tokenized (e.g. a lone surrogate)."""


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


def control_tokens_of(tokenizer: Any) -> _ControlTokens | None:
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


def free_guard(text: str) -> str:
    """A private-use character that does not occur in `text`."""
    for code in _GUARDS:
        if chr(code) not in text:
            return chr(code)
    msg = "the conversation holds every private-use character; cannot tokenize it"
    raise UnencodableTextError(msg)


# --- tokenizing ------------------------------------------------------------


def encode_prompt(tokenizer: Any, control: _ControlTokens, text: str) -> list[int]:
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
    return encode_with_placeholders(tokenizer, control, text, "")


def encode_with_placeholders(
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

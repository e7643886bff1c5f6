"""Per-request text: the one place that holds text back.

Every decoded token goes through one `TextRouter` per request, which splits the
stream of text into segments of three kinds:

- ``content``: the answer;
- ``reasoning``: between a thinking model's markers (the markers are dropped);
- ``tool``: a tool call as the model wrote it, from the family's start marker
  (`<tool_call>`) to its end marker, or a bare JSON call `{"name": ...}` to its
  closing brace (families such as Qwen2.5-Coder often drop the tags).

and ends the text at the first stop string (in any part; never emitted). Only
text that can still turn into a marker, a stop string or the start of a call is
held back, so with tools bound an answer full of braces (C code) streams as it
is generated: `{` alone is held only until the next characters show it is not
`{"name":`.

mlx-lm ships `generate.TextStateMachine`, which matches literal markers the same
way; it does not report where in the stream each piece lies (which we need to
attach each token's log-probability to the text it produced) and cannot match
the bare JSON call start (a pattern, not a string), so this is a small state
machine of our own with the same idea: scan, emit what cannot match, hold the
rest.

`RequestText` adds the tokens: it feeds each token to mlx-lm's streaming
detokenizer, routes the new text, and gives every segment the log-probability
entries of the tokens whose text it holds (a token cut by a segment boundary
contributes its part to each side, so the entries' texts always join to the
segment's text).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_mlx.engine.types import Segment, SegmentKind, TextRules, TokenLogprob

_MODE_KIND: dict[str, SegmentKind] = {
    "content": "content",
    "reasoning": "reasoning",
    "tagged": "tool",
    "json": "tool",
    "forced": "tool",
}
_WS = " \t\r\n"


@dataclass(frozen=True)
class Piece:
    """Routed text and where it lies in the request's decoded text."""

    kind: SegmentKind
    text: str
    start: int


def json_call_start(text: str, begin: int = 0) -> tuple[int, int, bool] | None:
    """The first place at or after `begin` where a bare JSON tool call starts.

    The pattern is an optional markdown fence (```` ``` ```` and a language
    tag), then `[`? `{` `"name"` `:`, with any whitespace between. Returns
    `(start, end, complete)`: complete when the whole pattern is there, else the
    text from `start` is a prefix that may still become one (a partial match at
    the end of `text`). None when nothing can start a call.
    """
    i = begin
    n = len(text)
    while i < n:
        c = text[i]
        if c in "[{`":
            end, state = _match_call_start(text, i)
            if state == "complete":
                return i, end, True
            if state == "partial":
                return i, n, False
        i += 1
    return None


def _match_call_start(text: str, i: int) -> tuple[int, str]:
    """Match fence? `[`? ws `{` ws `"name"` ws `:` at `i`: complete, partial or no."""
    n = len(text)
    if text[i] == "`":
        for _ in range(3):
            if i == n:
                return n, "partial"
            if text[i] != "`":
                return i, "no"
            i += 1
        while i < n and text[i].isalpha():
            i += 1
        while i < n and text[i] in _WS:
            i += 1
        if i == n:
            return n, "partial"
        if text[i] not in "[{":
            return i, "no"
    if text[i] == "[":
        i += 1
        while i < n and text[i] in _WS:
            i += 1
        if i == n:
            return n, "partial"
        if text[i] != "{":
            return i, "no"
    i += 1  # the brace
    while i < n and text[i] in _WS:
        i += 1
    for expected in '"name"':
        if i == n:
            return n, "partial"
        if text[i] != expected:
            return i, "no"
        i += 1
    while i < n and text[i] in _WS:
        i += 1
    if i == n:
        return n, "partial"
    return (i + 1, "complete") if text[i] == ":" else (i, "no")


class TextRouter:
    """Routes decoded text into content, reasoning and tool segments; stops."""

    def __init__(self, rules: TextRules, stop: Sequence[str] = ()) -> None:
        self._rules = rules
        self._stops = tuple(s for s in stop if s)
        self._mode = "reasoning" if rules.think and rules.thinking_open else "content"
        if rules.calls_only:
            self._mode = "forced"
        self._buf = ""
        self._offset = 0  # stream offset of _buf[0]
        self._depth = 0  # json mode: open brackets
        self._scan = 0  # json mode: how much of _buf was scanned
        self._in_string = False
        self._escaped = False
        self._fenced = False  # json mode: the call opened a markdown fence
        self._calls_possible = bool(rules.bare_json_calls or rules.tool_start)
        self._calls_seen = False
        self._closed: int | None = None  # json mode: where the JSON value ended
        self.stopped = False
        """True once a stop string was seen; nothing after it is emitted."""

    def push(self, text: str) -> list[Piece]:
        """Feed new text; return the pieces that are safe to emit now."""
        if self.stopped or not text:
            return []
        self._buf += text
        pieces: list[Piece] = []
        while self._buf and not self.stopped and self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        """The end of generation: release what was held back (if not stopped)."""
        if self.stopped or not self._buf:
            return []
        kind = _MODE_KIND[self._mode]
        if kind == "content" and self._calls_seen and not self._buf.strip():
            kind = "tool"  # whitespace after the last call is the call's
        pieces = [Piece(kind, self._buf, self._offset)]
        self._offset += len(self._buf)
        self._buf = ""
        return pieces

    # -- one scan of the buffer ---------------------------------------------------

    def _step(self, pieces: list[Piece]) -> bool:
        """Emit or transition once; True when the buffer should be scanned again."""
        stop_at = self._first_stop()
        if self._mode == "json":
            end = self._json_end()
            if end is not None and (stop_at is None or end <= stop_at):
                end = self._fence_end(end)
                if end is None:  # may still close the fence: wait
                    return False
                self._emit(pieces, end)
                self._mode = "content"
                return True
        marker = self._first_marker()
        if stop_at is not None and (marker is None or stop_at <= marker[0]):
            self._emit(pieces, stop_at)
            self.stopped = True
            self._buf = ""
            return False
        if marker is not None:
            at, length, mode, keep = marker
            if keep and mode != "content":  # a call starts: whitespace before
                self._emit(pieces, len(self._buf[:at].rstrip()))  # it is the call's
                self._calls_seen = True
            elif keep:  # the end marker closes the call's text
                self._emit(pieces, at + length)
            else:
                self._emit(pieces, at)
                self._skip(length)
            self._mode = mode
            if mode == "json":
                self._depth, self._scan, self._closed = 0, 0, None
                self._in_string = self._escaped = False
                self._fenced = self._buf.lstrip().startswith("`")
            return True
        safe = len(self._buf) - self._held_back()
        if self._mode in ("tagged", "json", "forced") or safe > 0:
            self._emit(pieces, safe)
        return False

    def _emit(self, pieces: list[Piece], n: int) -> None:
        if n <= 0:
            return
        text, self._buf = self._buf[:n], self._buf[n:]
        pieces.append(Piece(_MODE_KIND[self._mode], text, self._offset))
        self._offset += n
        if self._mode == "json":
            self._scan = max(0, self._scan - n)
            if self._closed is not None:
                self._closed -= n

    def _skip(self, n: int) -> None:
        self._buf = self._buf[n:]
        self._offset += n

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _markers(self) -> list[tuple[str, str, bool]]:
        """(marker text, mode it leads to, kept in the text) for the current mode."""
        rules = self._rules
        out: list[tuple[str, str, bool]] = []
        if self._mode == "content":
            if rules.think:
                out.append((rules.think[0], "reasoning", False))
            if rules.tool_start:
                out.append((rules.tool_start, "tagged", True))
        elif self._mode == "reasoning" and rules.think:
            out.append((rules.think[1], "content", False))
        elif self._mode == "tagged" and rules.tool_end:
            out.append((rules.tool_end, "content", True))
        return out

    def _first_marker(self) -> tuple[int, int, str, bool] | None:
        """(index, length, next mode, kept) of the earliest complete marker."""
        best: tuple[int, int, str, bool] | None = None
        for marker, mode, keep in self._markers():
            i = self._buf.find(marker)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(marker), mode, keep)
        if self._mode == "content" and self._rules.bare_json_calls:
            found = json_call_start(self._buf)
            if found is not None and found[2] and (best is None or found[0] < best[0]):
                best = (found[0], 0, "json", True)
        return best

    def _held_back(self) -> int:
        """Length of the longest tail that may still grow into a trigger."""
        triggers = list(self._stops)
        triggers += [m for m, _, _ in self._markers()]
        longest = 0
        buf = self._buf
        for trigger in triggers:
            for n in range(min(len(trigger) - 1, len(buf)), longest, -1):
                if buf.endswith(trigger[:n]):
                    longest = n
                    break
        if self._mode == "content" and self._rules.bare_json_calls:
            found = json_call_start(buf)
            if found is not None and not found[2]:
                longest = max(longest, len(buf) - found[0])
        if self._mode == "content" and self._calls_possible:
            # whitespace may lead into a call (then it goes with the call)
            longest += len(buf[: len(buf) - longest]) - len(
                buf[: len(buf) - longest].rstrip()
            )
        return longest

    def _fence_end(self, end: int) -> int | None:
        """With a fence opened, include its closing ```` ``` ```` (None: unsure yet)."""
        if not self._fenced:
            return end
        k = end
        while k < len(self._buf) and self._buf[k] in _WS:
            k += 1
        rest = self._buf[k : k + 3]
        if rest == "```":
            return k + 3
        if "```".startswith(rest):  # only whitespace or part of the fence so far
            return None
        return end

    def _json_end(self) -> int | None:
        """Where the bare JSON call that started at `_buf[0]` ends, if it has."""
        if self._closed is not None:
            return self._closed
        buf = self._buf
        for i in range(self._scan, len(buf)):
            c = buf[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._scan = 0
                    self._closed = i + 1
                    return i + 1
        self._scan = len(buf)
        return None


class RequestText:
    """Tokens in, segments out: detokenize, route, attach log-probabilities.

    `logprobs(i)` is called for each generated token (in order) when the request
    asked for log-probabilities and returns its `TokenLogprob` (text filled in
    here); it is not called otherwise.
    """

    def __init__(
        self,
        rules: TextRules,
        stop: Sequence[str],
        detokenizer: Any,
        *,
        with_logprobs: bool = False,
    ) -> None:
        self.router = TextRouter(rules, stop)
        self._detok = detokenizer
        self._with_logprobs = with_logprobs
        self._length = 0  # characters decoded so far
        # (start, end, entry) of tokens whose text is not fully routed yet
        self._tokens: collections.deque[tuple[int, int, TokenLogprob]] = (
            collections.deque()
        )
        self._text = ""  # decoded text from the first pending token on
        self._text_start = 0
        self._last: TokenLogprob | None = None

    @property
    def stopped(self) -> bool:
        """A stop string was seen: the request should end."""
        return self.router.stopped

    def add(self, token: int, entry: TokenLogprob | None = None) -> list[Segment]:
        """Feed one generated token; return the segments ready to emit."""
        self._detok.add_token(token)
        return self._route(self._detok.last_segment, entry)

    def finish(self) -> list[Segment]:
        """End of generation: flush the detokenizer and the held-back text."""
        if self.router.stopped:
            return []
        self._detok.finalize()
        segments = self._route(self._detok.last_segment, None)
        return segments + self._segments(self.router.finish())

    def _route(self, text: str, entry: TokenLogprob | None) -> list[Segment]:
        start = self._length
        if self._with_logprobs and entry is not None:
            self._tokens.append((start, start + len(text), entry))
            self._last = entry
        elif self._with_logprobs and text and self._last is not None:
            # text the detokenizer released late (at the end: a trailing space,
            # a cut character) belongs to the last token
            if self._tokens and self._tokens[-1][1] == start:
                first, _, last = self._tokens[-1]
                self._tokens[-1] = (first, start + len(text), last)
            else:
                self._tokens.append((start, start + len(text), self._last))
        if not self._tokens:
            self._text_start = self._length + len(text)
            self._text = ""
        else:
            self._text += text
        self._length += len(text)
        return self._segments(self.router.push(text))

    def _segments(self, pieces: list[Piece]) -> list[Segment]:
        out: list[Segment] = []
        for piece in pieces:
            out.append(Segment(piece.text, piece.kind, self._entries(piece)))
        return out

    def _entries(self, piece: Piece) -> tuple[TokenLogprob, ...]:
        """The log-probability entries of the tokens whose text is in `piece`."""
        if not self._tokens:
            return ()
        a, b = piece.start, piece.start + len(piece.text)
        entries: list[TokenLogprob] = []
        while self._tokens:
            start, end, entry = self._tokens[0]
            if start >= b and not (start == end == b):
                break
            lo, hi = max(start, a), min(end, b)
            if hi > lo or start == end:
                text = self._text[lo - self._text_start : hi - self._text_start]
                entries.append(
                    TokenLogprob(text, entry.logprob, tuple(text.encode()), entry.top)
                )
            if end > b:
                break  # the rest of this token's text comes later
            self._tokens.popleft()
        if self._tokens:
            drop = self._tokens[0][0] - self._text_start
            self._text, self._text_start = self._text[drop:], self._tokens[0][0]
        return tuple(entries)


def token_logprob(tokenizer: Any, logprobs: Any, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability and the `top` likeliest tokens."""
    import mlx.core as mx

    chosen = float(logprobs[token].item())
    alternatives: tuple[tuple[str, float, tuple[int, ...]], ...] = ()
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        id_list: list[int] = list(ids.tolist())  # type: ignore[arg-type]
        values: list[float] = list(logprobs[ids].tolist())
        ranked = sorted(zip(id_list, values, strict=True), key=lambda t: -t[1])
        alternatives = tuple(
            (text, float(lp), tuple(text.encode()))
            for i, lp in ranked
            if lp != float("-inf")
            for text in (tokenizer.decode([int(i)]),)
        )
    return TokenLogprob("", chosen, (), alternatives)

"""The per-request text state machine: stop strings, reasoning, tool-call starts,
and log-probability entries that join to the text they describe."""

from __future__ import annotations

import pytest

from langchain_mlx.engine.text import RequestText, TextRouter, json_call_start
from langchain_mlx.engine.types import TextRules, TokenLogprob


def route(
    pieces: list[str], rules: TextRules | None = None, stop: tuple[str, ...] = ()
) -> tuple[list[tuple[str, str]], bool]:
    router = TextRouter(rules or TextRules(), stop)
    out = []
    for p in pieces:
        out += router.push(p)
    out += router.finish()
    merged: list[tuple[str, str]] = []
    for piece in out:  # adjacent pieces of one kind read as one
        if merged and merged[-1][0] == piece.kind:
            merged[-1] = (piece.kind, merged[-1][1] + piece.text)
        else:
            merged.append((piece.kind, piece.text))
    return merged, router.stopped


def content(pieces: list[str], stop: tuple[str, ...]) -> tuple[str, bool]:
    out, stopped = route(pieces, stop=stop)
    return "".join(t for _, t in out), stopped


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["Hello", " Obs", "erv", "ation: x"], "Hello "),  # spans three segments
        (["Observation:"], ""),  # at the very start
        (["a", "bObservation:c"], "ab"),  # inside one segment, with text after
        (["Obs", "cure"], "Obscure"),  # a false start is released
        (["Obs"], "Obs"),  # a partial match at the end is released at the end
    ],
)
def test_stop_string_across_segments(pieces: list[str], expected: str) -> None:
    out, _ = content(pieces, ("Observation:",))
    assert out == expected


def test_earliest_of_several_stops_wins() -> None:
    assert content(["one\n", "\ntwo END"], ("END", "\n\n")) == ("one", True)


def test_text_is_released_as_soon_as_it_cannot_start_a_stop() -> None:
    router = TextRouter(TextRules(), ("xyz",))
    assert [p.text for p in router.push("abx")] == ["ab"]  # 'x' held back
    assert [p.text for p in router.push("q")] == ["xq"]


def test_no_stops_passes_through_and_multibyte_intact() -> None:
    assert content(["café ", "東京 ", "🚀"], ()) == ("café 東京 🚀", False)


def test_nothing_after_stop() -> None:
    router = TextRouter(TextRules(), (".",))
    assert [p.text for p in router.push("Paris. More")] == ["Paris"]
    assert router.push("text") == []
    assert router.finish() == []


CALLS = TextRules(bare_json_calls=True)


def test_code_with_braces_streams_when_tools_are_bound() -> None:
    code = "int main() {\n  if (x) { return 0; }\n}\n"
    router = TextRouter(CALLS)
    streamed = "".join(p.text for ch in code for p in router.push(ch))
    # everything but a possible start of `{"name":` is out before the end
    assert code.startswith(streamed)
    assert len(streamed) >= len(code) - 1
    assert route(list(code), CALLS)[0] == [("content", code)]


def test_a_bare_json_call_is_routed_as_tool_text_until_it_closes() -> None:
    pieces = ["Sure: ", '{"na', 'me": "f", "arguments": {"a": "}"}}', " done"]
    assert route(pieces, CALLS)[0] == [
        ("content", "Sure:"),  # whitespace before a call goes with the call
        ("tool", ' {"name": "f", "arguments": {"a": "}"}}'),
        ("content", " done"),
    ]


def test_an_array_of_calls_is_one_tool_region() -> None:
    out, _ = route(['x [ {"name": "a"}, {"name": "b"}] y'], CALLS)
    assert out == [
        ("content", "x"),
        ("tool", ' [ {"name": "a"}, {"name": "b"}]'),
        ("content", " y"),
    ]


def test_tagged_calls_keep_their_markers_for_the_parser() -> None:
    rules = TextRules(
        tool_start="<tool_call>", tool_end="</tool_call>", bare_json_calls=True
    )
    out, _ = route(["Hi <tool", '_call>\n{"name": "f"}\n</tool_', "call> bye"], rules)
    assert out == [
        ("content", "Hi"),
        ("tool", ' <tool_call>\n{"name": "f"}\n</tool_call>'),
        ("content", " bye"),
    ]


@pytest.mark.parametrize("opened", [True, False])
def test_reasoning_is_split_from_the_answer(opened: bool) -> None:
    rules = TextRules(think=("<think>", "</think>"), thinking_open=opened)
    pieces = ([] if opened else ["<thi", "nk>"]) + [
        "Let me ",
        "think.</th",
        "ink>Paris.",
    ]
    assert route(pieces, rules)[0] == [
        ("reasoning", "Let me think."),
        ("content", "Paris."),
    ]


def test_no_reasoning_when_the_model_does_not_think() -> None:
    rules = TextRules(think=("<think>", "</think>"))
    assert route(["<", "b>Paris</b>"], rules)[0] == [("content", "<b>Paris</b>")]


def test_a_stop_string_inside_a_call_ends_the_text() -> None:
    out, stopped = route(['{"name": "f", "STOP', " more"], CALLS, stop=("STOP",))
    assert stopped
    assert out == [("tool", '{"name": "f", "')]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": 1', (0, 8, True)),
        ('ab {  "na', (3, 9, False)),
        ("{x", None),
        ("[1, 2]", None),
        ('[\n {"name"', (0, 10, False)),
    ],
)
def test_json_call_start(text: str, expected: object) -> None:
    assert json_call_start(text) == expected


class FakeDetokenizer:
    """Each token id is one character of a script (the last is a stop)."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = self.texts[token]

    def finalize(self) -> None:
        self.last_segment = ""


def test_logprob_entries_join_to_the_emitted_text() -> None:
    texts = {1: "Hel", 2: "lo", 3: " wor", 4: "ld.", 5: " Ob", 6: "servation"}
    text = RequestText(
        TextRules(), ("Observation",), FakeDetokenizer(texts), with_logprobs=True
    )
    segments = []
    for token in texts:
        segments += text.add(token, TokenLogprob("", -float(token), ()))
    segments += text.finish()
    assert "".join(s.text for s in segments) == "Hello world. "
    for s in segments:
        assert "".join(e.token for e in s.logprobs) == s.text
    logprobs = [e.logprob for s in segments for e in s.logprobs]
    assert logprobs == [-1.0, -2.0, -3.0, -4.0, -5.0]  # " Ob" partly returned
    assert segments[-1].logprobs[-1].token == " "
    assert segments[0].logprobs[0].bytes == tuple(b"Hel")


def test_a_fenced_call_is_one_tool_region_with_its_fences() -> None:
    pieces = [
        "Here:\n``",
        '`json\n{"name": "f", "arguments": {}}\n``',
        "`\nDone ```c\nint x;\n```",
    ]
    assert route(pieces, CALLS)[0] == [
        ("content", "Here:"),
        ("tool", '\n```json\n{"name": "f", "arguments": {}}\n```'),
        ("content", "\nDone ```c\nint x;\n```"),
    ]


def test_a_fenced_call_without_a_closing_fence_ends_at_its_brace() -> None:
    out, _ = route(['```\n{"name": "f"}', " and more"], CALLS)
    assert out == [("tool", '```\n{"name": "f"}'), ("content", " and more")]


class HoldingDetokenizer(FakeDetokenizer):
    """Holds a trailing space until the end, as mlx-lm's BPE detokenizer does."""

    def add_token(self, token: int) -> None:
        text = self.texts[token]
        self.last_segment, self.held = ("", text) if text == " " else (text, "")

    def finalize(self) -> None:
        self.last_segment = self.held


def test_logprob_entries_cover_text_released_at_the_end() -> None:
    text = RequestText(
        TextRules(), (), HoldingDetokenizer({1: "Hello", 2: " "}), with_logprobs=True
    )
    segments = text.add(1, TokenLogprob("", -1.0, ()))
    segments += text.add(2, TokenLogprob("", -2.0, ()))
    segments += text.finish()
    assert "".join(s.text for s in segments) == "Hello "
    for s in segments:
        assert "".join(e.token for e in s.logprobs) == s.text


def test_whitespace_around_calls_goes_with_the_calls() -> None:
    # Qwen writes "\n" before and between calls: not content of the message
    out, _ = route(['\n{"name": "a"}', '\n{"name": "b"}\n'], CALLS)
    assert out == [("tool", '\n{"name": "a"}\n{"name": "b"}\n')]
    out, _ = route(['{"name": "a"}', "\n\nDone."], CALLS)
    assert out == [("tool", '{"name": "a"}'), ("content", "\n\nDone.")]

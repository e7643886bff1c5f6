"""Tool calls out of free text: tagged, bare JSON, several, mixed, malformed."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from langchain_mlx._output import ChunkAssembler, parse_tool_calls
from langchain_mlx._tools import normalize_tool_choice
from langchain_mlx.engine.text import TextRouter
from langchain_mlx.engine.types import Segment, TextRules

NAMES = {"get_weather", "add"}


def parse(text: str, tagged: bool = False):  # type: ignore[no-untyped-def]
    if tagged:
        return parse_tool_calls(
            text, tool_names=NAMES, start="<tool_call>", end="</tool_call>"
        )
    return parse_tool_calls(text, tool_names=NAMES)


def test_bare_json_call_like_qwen_coder_emits() -> None:
    out = parse('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert [(c["name"], c["args"]) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert out.content == ""
    assert out.invalid_tool_calls == []
    assert out.tool_calls[0]["id"].startswith("call_")


def test_tagged_calls_several_and_mixed_with_text() -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
    )
    out = parse(text, tagged=True)
    assert [c["name"] for c in out.tool_calls] == ["get_weather", "add"]
    assert out.tool_calls[1]["args"] == {"a": 1, "b": 2}  # string arguments decoded
    assert out.content == "Let me check."


def test_bare_calls_in_a_list_and_after_prose() -> None:
    text = 'Calling both: [{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}] done'
    out = parse(text)
    assert [c["args"] for c in out.tool_calls] == [{"a": 1}, {"a": 2}]
    assert out.content == "Calling both:  done"


def test_a_call_fenced_in_markdown_leaves_no_empty_fence() -> None:
    out = parse('```json\n{"name": "add", "arguments": {"a": 1}}\n```')
    assert out.content == ""
    assert out.tool_calls[0]["args"] == {"a": 1}


def test_json_that_is_not_a_call_stays_content() -> None:
    text = 'Here is data: {"name": "Bob", "age": 3}'
    out = parse(text)
    assert out.tool_calls == [] and out.invalid_tool_calls == []
    assert out.content == text


@pytest.mark.parametrize(
    ("text", "tagged", "error"),
    [
        (
            '{"name": "get_weather", "arguments": {"city": "Par',
            False,
            "malformed tool call JSON",
        ),
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>',
            True,
            "Expecting value",
        ),
        (
            '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
            True,
            "unknown tool 'launch_rockets'",
        ),
        (
            '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
            True,
            "must be a JSON object",
        ),
    ],
)
def test_malformed_calls_become_invalid_tool_calls_with_the_text(
    text: str, tagged: bool, error: str
) -> None:
    out = parse(text, tagged=tagged)
    assert out.tool_calls == []
    [bad] = out.invalid_tool_calls
    assert error in str(bad["error"])
    assert bad["args"]  # the raw text is kept, never lost


@dataclass
class FakeFinal:
    finish_reason: str = "stop"
    prompt_tokens: int = 5
    generation_tokens: int = 9
    prompt_tps: float = 1.0
    generation_tps: float = 1.0
    time_to_first_token: float = 0.1
    peak_memory_gb: float = 0.1
    cached_tokens: int = 0
    constrained: bool = False
    forced_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    cache_source: str | None = None


def routed(pieces: list[str], rules: TextRules | None = None) -> list[Segment]:
    """Pieces of decoded text as the engine routes them (tools bound)."""
    router = TextRouter(rules or TextRules(bare_json_calls=True))
    out = [p for piece in pieces for p in router.push(piece)] + router.finish()
    return [Segment(p.text, p.kind) for p in out]


def test_tool_call_text_is_not_streamed_as_content() -> None:
    asm = ChunkAssembler("m", tool_names=frozenset(NAMES))
    pieces = [
        "Sure",
        ", one moment. ",
        '{"na',
        'me": "get_weather", ',
        '"arguments": {"city": "Paris"}}',
    ]
    streamed = [c for seg in routed(pieces) if (c := asm.chunk(seg)) is not None]
    assert "".join(str(c.content) for c in streamed) == "Sure, one moment."
    last = asm.chunk(FakeFinal())
    assert last is not None and last.chunk_position == "last"
    [tcc] = last.tool_call_chunks
    assert tcc["name"] == "get_weather" and json.loads(tcc["args"]) == {"city": "Paris"}
    assert last.response_metadata["finish_reason"] == "tool_calls"
    assert last.usage_metadata["total_tokens"] == 14


def test_without_a_call_held_text_comes_back_as_content() -> None:
    asm = ChunkAssembler("m", tool_names=frozenset(NAMES))
    streamed = [asm.chunk(seg) for seg in routed(["Use {braces}", " freely"])]
    last = asm.chunk(FakeFinal())
    text = "".join(str(c.content) for c in [*streamed, last] if c is not None)
    assert text == "Use {braces} freely"
    assert last.tool_call_chunks == []


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", None),
        ("none", "none"),
        ("any", "required"),
        ("required", "required"),
        (True, "required"),
        ("add", "add"),
        ({"type": "function", "function": {"name": "add"}}, "add"),
    ],
)
def test_tool_choice_forms(choice: object, expected: str | None) -> None:
    assert normalize_tool_choice(choice, ["add", "get_weather"]) == expected


def test_tool_choice_naming_an_unbound_tool_is_an_error() -> None:
    with pytest.raises(ValueError, match="names no bound tool"):
        normalize_tool_choice("launch", ["add"])


def test_invalid_tool_call_text_is_kept_in_history() -> None:
    from langchain_core.messages import AIMessage

    from langchain_mlx._messages import message_to_dict

    msg = AIMessage(
        "Let me try.",
        invalid_tool_calls=[
            {
                "type": "invalid_tool_call",
                "name": None,
                "args": '{"name": "add", "argu',
                "id": "c",
                "error": "bad",
            }
        ],
    )
    assert message_to_dict(msg)["content"] == 'Let me try.\n{"name": "add", "argu'

"""Edge cases found in review: each one once lost or mangled a user's input."""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel

from langchain_mlx import ChatMLX
from langchain_mlx._constraints import close_objects, tool_call_schema
from langchain_mlx._messages import render_text
from langchain_mlx._output import ChunkAssembler, parse_tool_calls
from langchain_mlx._tools import normalize_tool_choice, plan_call

from .test_tool_parsing import FakeFinal, routed

NAMES = {"get_weather"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "w",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_a_malformed_call_is_not_lost_when_streamed() -> None:
    asm = ChunkAssembler("m", tool_names=frozenset(NAMES))
    raw = '{"name": "get_weather", "arguments": {"city": "Par'
    chunks = [c for seg in routed([raw]) if (c := asm.chunk(seg)) is not None]
    chunks.append(asm.chunk(FakeFinal()))
    streamed = chunks[0]
    for c in chunks[1:]:
        streamed += c
    # streamed and invoked agree: no content, one invalid call with the raw text
    assert streamed.content == ""
    assert not streamed.tool_calls  # not "repaired" into a call to Par
    [invalid] = streamed.invalid_tool_calls
    assert raw in (invalid["args"], json.loads(invalid["args"] or '""'))
    invoked = AIMessage(content="")
    asm.finish(invoked)
    assert invoked.content == ""
    assert invoked.invalid_tool_calls[0]["args"] == raw


def test_ordinary_json_with_a_nested_name_is_content() -> None:
    text = 'Here: {"name": {"first": "A"}, "age": 3}'
    out = parse_tool_calls(text, tool_names=NAMES)
    assert out.content == text and not out.tool_calls and not out.invalid_tool_calls


def test_a_call_shaped_object_naming_an_unknown_tool_is_invalid() -> None:
    out = parse_tool_calls('{"name": "other", "arguments": {}}', tool_names=NAMES)
    assert "unknown tool 'other'" in str(out.invalid_tool_calls[0]["error"])


def test_truncated_json_that_is_not_a_call_stays_content() -> None:
    text = 'Person: {"name": "Bob", "age": '
    out = parse_tool_calls(text, tool_names=NAMES)
    assert out.content == text.strip() and not out.invalid_tool_calls


def test_parallel_false_keeps_the_first_call() -> None:
    asm = ChunkAssembler("m", tool_names=frozenset(NAMES), parallel=False)
    two = '{"name": "get_weather", "arguments": {"city": "A"}}\n{"name": "get_weather", "arguments": {"city": "B"}}'
    for seg in routed([two]):
        asm.chunk(seg)
    asm.chunk(FakeFinal())
    assert asm.parsed is not None
    assert [c["args"] for c in asm.parsed.tool_calls] == [{"city": "A"}]
    assert "parallel_tool_calls=False" in str(asm.parsed.invalid_tool_calls[0]["error"])


def test_system_message_survives_tool_instructions(tiny_model_path: str) -> None:
    chat = ChatMLX(
        model=tiny_model_path, system_message=SystemMessage("Talk like a pirate.")
    )
    plan = plan_call(chat.tokenizer, [TOOL], None, None, None)
    ids = chat._render(chat.tokenizer, [HumanMessage("hi")], plan)
    text = chat.tokenizer.decode(ids)
    assert "Talk like a pirate." in text and "get_weather" in text


def test_past_calls_render_as_text_when_the_template_has_no_tools(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path)
    history = [
        HumanMessage("Weather?"),
        AIMessage(
            "",
            tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}],
        ),
        ToolMessage("sunny", tool_call_id="c1"),
    ]
    text = render_text(chat.tokenizer, history, calls_as_text=True)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text


def test_tool_with_defs_can_be_forced() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "t",
            "parameters": {
                "type": "object",
                "properties": {"item": {"$ref": "#/$defs/Item"}},
                "$defs": {
                    "Item": {"type": "object", "properties": {"n": {"type": "integer"}}}
                },
            },
        },
    }
    schema = tool_call_schema([tool])
    assert "$ref" not in json.dumps(schema)


def test_allof_branches_stay_open() -> None:
    schema = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}},
            {"type": "object", "properties": {"b": {"type": "integer"}}},
        ]
    }
    closed = close_objects(schema)
    assert all("additionalProperties" not in branch for branch in closed["allOf"])
    assert close_objects(
        {"type": "object", "properties": {"x": {"default": {"properties": 1}}}}
    )["properties"]["x"] == {"default": {"properties": 1}}  # values are not schemas


def test_tool_choice_none_dict_and_text_response_format(tiny_model_path: str) -> None:
    assert normalize_tool_choice({"type": "none"}, ["get_weather"]) == "none"
    chat = ChatMLX(model=tiny_model_path)
    assert plan_call(chat.tokenizer, None, None, None, {"type": "text"}).grammar is None


def test_response_format_may_be_a_class(tiny_model_path: str) -> None:
    class P(BaseModel):
        x: int

    chat = ChatMLX(model=tiny_model_path)
    assert plan_call(chat.tokenizer, None, None, None, P).grammar is not None
    with pytest.raises(TypeError, match="response_format"):
        plan_call(chat.tokenizer, None, None, None, 42)


def test_llm_and_a_different_model_name_is_an_error(
    tiny_model_path: str, other_tiny_model_path: str
) -> None:
    chat = ChatMLX(model=tiny_model_path)
    with pytest.raises(ValueError, match="pass one"):
        ChatMLX(llm=chat.llm, model=other_tiny_model_path)

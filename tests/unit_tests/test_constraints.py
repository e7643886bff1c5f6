"""Grammar-constrained decoding on a random-weight model.

Random weights produce random tokens; with the grammar in the loop, the output
must still be valid by construction — over many seeds and schemas.
"""

from __future__ import annotations

from typing import Literal, Optional

import pytest
from langchain_core.messages import AIMessage
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from langchain_mlx import ChatMLX
from langchain_mlx._constraints import UnsupportedSchemaError

SEEDS = range(6)


class Address(BaseModel):
    city: str = Field(max_length=12)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=130)
    mood: Literal["happy", "sad", "très bien ☀"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)
    nickname: Optional[str] = Field(default=None, max_length=8)  # noqa: UP045
    address: Address


class Point(TypedDict):
    x: int
    y: int


@pytest.fixture(scope="module")
def chat(tiny_model_path: str) -> ChatMLX:
    return ChatMLX(model=tiny_model_path, max_tokens=400, temperature=1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_output_always_validates(chat: ChatMLX, seed: int) -> None:
    person = chat.with_structured_output(Person).invoke("Describe someone.", seed=seed)
    assert isinstance(person, Person)  # pydantic validated every constraint


@pytest.mark.parametrize("seed", SEEDS)
def test_typeddict_and_dict_schemas(chat: ChatMLX, seed: int) -> None:
    point = chat.with_structured_output(Point).invoke("A point.", seed=seed)
    assert set(point) == {"x", "y"} and all(isinstance(v, int) for v in point.values())
    schema = {
        "title": "Choice",
        "type": "object",
        "properties": {
            "pick": {"enum": ["left", "right"]},
            "n": {"type": "integer", "minimum": 1, "maximum": 3},
        },
        "required": ["pick", "n"],
    }
    out = chat.with_structured_output(schema).invoke("Choose.", seed=seed)
    assert out["pick"] in ("left", "right") and 1 <= out["n"] <= 3


@pytest.mark.parametrize("seed", SEEDS)
def test_function_calling_and_json_mode(chat: ChatMLX, seed: int) -> None:
    point = chat.with_structured_output(Point, method="function_calling").invoke(
        "A point.", seed=seed
    )
    assert set(point) == {"x", "y"}
    out = chat.with_structured_output(
        None, method="json_mode", include_raw=True
    ).invoke("Anything.", seed=seed, max_tokens=60)
    # a random-weight model may not close its object in 60 tokens: then the
    # cut is reported, never a "repaired" prefix
    if out["raw"].response_metadata["finish_reason"] == "length":
        assert "max_tokens" in str(out["parsing_error"])
        assert out["parsed"] is None
    else:
        assert isinstance(out["parsed"], dict)


class GetWeather(BaseModel):
    """Get the weather in a city."""

    # Bounded: a random-weight model never chooses to close an open string.
    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"] = "celsius"


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(ge=-1000, le=1000)
    b: int = Field(ge=-1000, le=1000)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "tool_choice",
    ["any", "Add", True, {"type": "function", "function": {"name": "Add"}}],
)
def test_forced_tool_calls_are_valid(
    chat: ChatMLX, seed: int, tool_choice: object
) -> None:
    bound = chat.bind_tools([GetWeather, Add], tool_choice=tool_choice)
    msg = bound.invoke("Do something.", seed=seed, max_tokens=80)
    assert isinstance(msg, AIMessage)
    assert msg.invalid_tool_calls == []
    [call] = msg.tool_calls
    if tool_choice not in ("any", True):  # a named tool must be that tool
        assert call["name"] == "Add"
    if call["name"] == "Add":
        Add(**call["args"])
    else:
        GetWeather(**call["args"])


def test_streamed_forced_call_has_tool_call_chunks_and_no_content(
    chat: ChatMLX,
) -> None:
    bound = chat.bind_tools([Add], tool_choice="Add")
    chunks = list(bound.stream("Add numbers.", seed=3, max_tokens=80))
    assert "".join(str(c.content) for c in chunks) == ""
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.tool_calls and full.tool_calls[0]["name"] == "Add"


def test_parallel_forced_calls_allowed_when_asked(chat: ChatMLX) -> None:
    bound = chat.bind_tools([Add], tool_choice="any", parallel_tool_calls=True)
    for seed in SEEDS:
        msg = bound.invoke("Add.", seed=seed, max_tokens=200)
        assert msg.tool_calls and msg.invalid_tool_calls == []


def test_include_raw(chat: ChatMLX) -> None:
    out = chat.with_structured_output(Point, include_raw=True).invoke(
        "A point.", seed=1
    )
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage)
    assert out["parsing_error"] is None and set(out["parsed"]) == {"x", "y"}


def test_a_schema_the_compiler_cannot_enforce_fails_early_and_clearly(
    chat: ChatMLX,
) -> None:
    schema = {
        "title": "T",
        "type": "object",
        "properties": {"u": {"type": "string", "format": "no-such-format"}},
    }
    with pytest.raises(UnsupportedSchemaError, match="no-such-format"):
        chat.with_structured_output(schema)


def test_template_without_tools_gets_a_system_instruction(chat: ChatMLX) -> None:
    from langchain_core.messages import HumanMessage

    plain = chat.get_num_tokens_from_messages([HumanMessage("hi")])
    with_tools = chat.bind_tools([GetWeather])
    # SmolLM2's template has no tools section: the tools travel in a system
    # instruction instead of being dropped.
    msgs = with_tools.invoke("hi", max_tokens=1)
    assert msgs.usage_metadata["input_tokens"] > plain + 20


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ('{"name": "Add", "arguments": {"a": 1, "b": 2}}', True),  # a tool call
        ('{"city": "Paris"}', True),  # the final answer
        ('{"name": "Nope", "arguments": {}}', False),  # neither
        ('{"city": 3}', False),
    ],
)
def test_tools_with_a_response_format_allow_a_call_or_the_answer(
    chat: ChatMLX, text: str, allowed: bool
) -> None:
    from llguidance import LLMatcher

    from langchain_mlx._constraints import ConstraintCompiler
    from langchain_mlx._tools import format_tools, plan_call

    answer = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    fmt = {"type": "json_schema", "json_schema": {"schema": answer}}
    plan = plan_call(chat.tokenizer, format_tools([Add]), None, None, fmt)
    assert plan.grammar is not None and not plan.call_required
    compiler = ConstraintCompiler.for_tokenizer(chat.tokenizer)
    matcher = LLMatcher(compiler.lltokenizer, plan.grammar)
    ids = chat.tokenizer.encode(text, add_special_tokens=False)
    ok = matcher.validate_tokens(ids) == len(ids)
    if ok:
        matcher.consume_tokens(ids)
        ok = matcher.is_accepting()
    assert ok is allowed


SCHEMAS: list[object] = [
    Person,
    Point,
    {
        "title": "Choice",
        "type": "object",
        "properties": {
            "pick": {"enum": ["left", "right"]},
            "n": {"type": "integer", "minimum": 1, "maximum": 3},
        },
        "required": ["pick", "n"],
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["Person", "Point", "Choice"])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_fast_forward_greedy_output_equals_token_by_token(
    chat: ChatMLX, schema: object, method: str
) -> None:
    """Grammar fast-forward and speculation leave greedy output as it was."""
    off = ChatMLX(
        llm=chat.llm, temperature=0.0, max_tokens=400, fast_forward=False,
        prompt_lookup=False,
    )  # fmt: skip
    on = ChatMLX(llm=chat.llm, temperature=0.0, max_tokens=400)
    outputs = [
        m.with_structured_output(schema, method=method, include_raw=True).invoke(  # type: ignore[arg-type]
            "Describe one."
        )
        for m in (off, on)
    ]
    assert outputs[0]["raw"].content == outputs[1]["raw"].content
    calls = [[(c["name"], c["args"]) for c in o["raw"].tool_calls] for o in outputs]
    assert calls[0] == calls[1]
    assert outputs[0]["parsed"] == outputs[1]["parsed"]
    assert outputs[1]["raw"].response_metadata["forced_tokens"] > 0

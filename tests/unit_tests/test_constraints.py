"""Grammar-constrained decoding on a random-weight model.

Random weights produce random tokens; with the grammar in the loop, the output
must still be valid by construction — over many seeds and schemas.
"""

from __future__ import annotations

import json
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


# -- auto mode: calls laid out as the model writes them (BFCL smoke run) ------------


def tool(name: str, properties: dict[str, object]) -> dict[str, object]:
    """An OpenAI tool dict (BFCL's, shortened) whose arguments are all required."""
    parameters = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
    }
    function = {"name": name, "description": name, "parameters": parameters}
    return {"type": "function", "function": function}


INTEGER = {"type": "integer"}
SPOTIFY = tool("spotify_play", {"artist": {"type": "string"}, "duration": INTEGER})
SUM = tool(
    "math_toolkit_sum_of_multiples",
    {
        "lower_limit": INTEGER,
        "upper_limit": INTEGER,
        "multiples": {"type": "array", "items": INTEGER},
    },
)
PRODUCT = tool("math_toolkit_product_of_primes", {"count": INTEGER})


class Matcher:
    """An auto-mode (or any) grammar's matcher, fed text piece by piece."""

    def __init__(self, chat: ChatMLX, grammar: str) -> None:
        from llguidance import LLMatcher

        from langchain_mlx._constraints import ConstraintCompiler

        self.tokenizer = chat.tokenizer
        compiler = ConstraintCompiler.for_tokenizer(chat.tokenizer)
        self.matcher = LLMatcher(compiler.lltokenizer, grammar)
        assert not self.matcher.is_error(), self.matcher.get_error()

    def takes(self, text: str) -> bool:
        """Whether the grammar accepts `text` next (then it is consumed)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.matcher.validate_tokens(ids) < len(ids):
            return False
        assert self.matcher.consume_tokens(ids)
        return True

    def forced(self) -> str:
        return str(self.tokenizer.decode(self.matcher.compute_ff_tokens()))


def auto_grammar(chat: ChatMLX, tools: list[dict[str, object]]) -> str:
    from langchain_mlx._tools import format_tools, plan_call

    plan = plan_call(chat.tokenizer, format_tools(tools), None, None, None)
    assert plan.grammar is not None and plan.grammar_lazy
    return plan.grammar


def call_text(name: str, args: dict[str, object], **dumps: object) -> str:
    return json.dumps({"name": name, "arguments": args}, **dumps)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "dumps",
    [
        {},  # {"name": "f", "arguments": {...}}, as chat templates print calls
        {"indent": 2},  # as Qwen2.5-Coder writes a call in a ```json fence
        {"indent": 4},
        {"separators": (",", ":")},  # minified
    ],
    ids=["compact", "indent-2", "indent-4", "minified"],
)
def test_auto_mode_takes_a_call_in_the_layout_the_model_writes(
    chat: ChatMLX, dumps: dict[str, object]
) -> None:
    text = call_text(
        "spotify_play", {"artist": "Taylor Swift", "duration": 20}, **dumps
    )
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))
    assert m.takes(f"Sure.\n```json\n{text}\n```\nDone.")
    assert m.matcher.is_accepting()


def test_auto_mode_allows_the_newline_after_the_last_argument(chat: ChatMLX) -> None:
    """BFCL parallel_0: after `"duration": 20` the model wants a newline.

    With the newline refused, digits were the only continuation with mass and
    the number grew until `max_tokens`.
    """
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))
    assert m.takes('```json\n{\n  "name": "spotify_play",\n  "arguments": {\n')
    assert m.takes('    "artist": "Taylor Swift",\n    "duration": 20')
    assert m.takes("\n  }\n}")
    assert m.takes("\n```")
    assert m.matcher.is_accepting()


def test_auto_mode_whitespace_is_bounded(chat: ChatMLX) -> None:
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))
    assert m.takes('{\n  "name": "spotify_play",\n  "arguments": {"artist": "A",')
    assert not m.takes("\n\n\n")  # one newline and an indent, not a run
    assert not m.takes(" " * 40)


def test_auto_mode_holds_several_calls_each_constrained_and_parsed(
    chat: ChatMLX,
) -> None:
    """BFCL parallel_multiple_0: two fenced calls in one auto-mode turn."""
    from langchain_mlx._output import parse_tool_calls
    from langchain_mlx.engine.text import TextRouter
    from langchain_mlx.engine.types import TextRules

    first = call_text(
        "math_toolkit_sum_of_multiples",
        {"lower_limit": 1, "upper_limit": 1000, "multiples": [3, 5]},
        indent=2,
    )
    second = call_text("math_toolkit_product_of_primes", {"count": 5}, indent=2)
    text = f"```json\n{first}\n```\n\n```json\n{second}\n```"
    grammar = auto_grammar(chat, [SUM, PRODUCT])
    m = Matcher(chat, grammar)
    assert m.takes(text)
    assert m.matcher.is_accepting()
    # the second call is constrained as the first was
    m = Matcher(chat, grammar)
    assert m.takes(f"```json\n{first}\n```\n\n```json\n")
    assert not m.takes('{\n  "name": "math_toolkit_product_of_prime",')
    assert m.takes('{\n  "name": "math_toolkit_product_of_primes",\n  "arguments": ')
    assert not m.takes('{\n    "count": 5.5')
    # both are calls, routed as tool text and parsed
    router = TextRouter(TextRules(bare_json_calls=True))
    pieces = [p for c in text for p in router.push(c)] + router.finish()
    assert {p.kind for p in pieces} == {"tool"}
    names = {"math_toolkit_sum_of_multiples", "math_toolkit_product_of_primes"}
    out = parse_tool_calls("".join(p.text for p in pieces), tool_names=names)
    assert out.content == "" and out.invalid_tool_calls == []
    assert [(c["name"], c["args"]) for c in out.tool_calls] == [
        ("math_toolkit_sum_of_multiples",
         {"lower_limit": 1, "upper_limit": 1000, "multiples": [3, 5]}),
        ("math_toolkit_product_of_primes", {"count": 5}),
    ]  # fmt: skip


@pytest.mark.parametrize("dumps", [{}, {"indent": 2}], ids=["compact", "indent-2"])
def test_auto_mode_leaves_a_made_up_function_unknown_not_a_bound_tool(
    chat: ChatMLX, dumps: dict[str, object]
) -> None:
    """BFCL irrelevance_0 on the 1.5B: the model calls a function it made up.

    The grammar used to force the name of the one bound tool, turning the
    made-up call into a real one with invented arguments. Now the call keeps
    its name and is parsed as an invalid call that is never run.
    """
    from langchain_mlx._output import parse_tool_calls

    text = call_text("calculate_area_of_triangle", {"base": 10, "height": 5.5}, **dumps)
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY, PRODUCT]))
    assert m.takes(f"```json\n{text}\n```")
    assert m.matcher.is_accepting()
    names = {"spotify_play", "math_toolkit_product_of_primes"}
    out = parse_tool_calls(text, tool_names=names)
    assert out.tool_calls == []
    assert [c["name"] for c in out.invalid_tool_calls] == ["calculate_area_of_triangle"]
    assert "unknown tool" in str(out.invalid_tool_calls[0]["error"])


def test_a_bound_call_inside_added_token_markers_is_taken(chat: ChatMLX) -> None:
    """Qwen's `<tool_call>` is one added token: a bound call inside it must pass.

    (An unknown-name branch inside the markers once refused every bound call
    there; a text marker with a newline once failed to compile.)
    """
    from langchain_mlx._constraints import ToolCallFormat, auto_call_grammar

    tok = chat.tokenizer
    (open_id,) = tok.encode("<|im_start|>", add_special_tokens=False)
    (close_id,) = tok.encode("<file_sep>", add_special_tokens=False)
    marked = ToolCallFormat(
        start="<|im_start|>\n",
        end="\n<file_sep>",
        start_lark=f'<[{open_id}]> "\\n"',
        end_lark=f'"\\n" <[{close_id}]>',
    )
    text_marked = ToolCallFormat(start="<tool_call>\n", end="\n</tool_call>")
    bound = call_text("spotify_play", {"artist": "A", "duration": 3})
    for fmt in (marked, text_marked):
        m = Matcher(chat, auto_call_grammar([SPOTIFY], fmt))
        assert m.takes(f"{fmt.start}{bound}{fmt.end}")
        assert m.matcher.is_accepting()


def test_auto_mode_completes_the_start_of_a_bound_name(chat: ChatMLX) -> None:
    """A name cut short is the start of a bound tool's: it must go on."""
    for layout in ('{"name": "spotify', '{\n  "name": "spotify'):
        m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))
        assert m.takes(layout)
        assert not m.takes('", ')
        assert m.takes('_play", ')
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))  # a bound name: its schema
    assert m.takes('{"name": "spotify_play", "arguments": {"')
    assert not m.takes('volume": 3')


def test_auto_mode_still_forces_what_a_compact_call_must_say(chat: ChatMLX) -> None:
    """The layout chat templates print calls in keeps its fast-forward."""
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))
    assert m.takes('Sure. {"name": "spotify_play"')  # (a longer name: not ours)
    assert ', "arguments": {"' in m.forced()


def test_a_stuck_integer_ends_within_19_digits(chat: ChatMLX) -> None:
    """A model that keeps writing digits gets a finished call, not a cut one."""
    m = Matcher(chat, auto_grammar(chat, [SPOTIFY]))
    assert m.takes(
        '{"name": "spotify_play", "arguments": {"artist": "A", "duration": 2'
    )
    assert m.takes("0" * 18)
    assert not m.takes("0")
    assert m.takes("}}")
    assert m.matcher.is_accepting()


@pytest.mark.parametrize("where", ["forced call", "structured output"])
def test_integers_are_bounded_in_every_grammar(chat: ChatMLX, where: str) -> None:
    from langchain_mlx._constraints import (
        ToolCallFormat,
        json_schema_grammar,
        tool_call_grammar,
    )

    if where == "forced call":
        grammar = tool_call_grammar([SPOTIFY], ToolCallFormat(), parallel=False)
        start = '{"name": "spotify_play", "arguments": {"artist": "A", "duration": '
    else:
        params = SPOTIFY["function"]["parameters"]  # type: ignore[index]
        grammar = json_schema_grammar(params)
        start = '{"artist": "A", "duration": '
    for sign in ("", "-"):  # 18 digits, then a 19th would pass 9 * 10**18
        m = Matcher(chat, grammar)
        assert m.takes(start + sign + "9" * 18)
        assert not m.takes("9")
        assert m.takes("}")


def test_integer_bounds_leave_the_schema_its_own() -> None:
    from langchain_mlx._constraints import INTEGER_LIMIT, bound_integers

    lim = INTEGER_LIMIT
    assert bound_integers({"type": "integer"}) == {
        "type": "integer", "minimum": -lim, "maximum": lim,
    }  # fmt: skip
    assert bound_integers({"type": "integer", "minimum": 0}) == {
        "type": "integer", "minimum": 0, "maximum": lim,
    }  # fmt: skip
    assert bound_integers({"type": ["integer", "null"], "exclusiveMaximum": 5}) == {
        "type": ["integer", "null"], "exclusiveMaximum": 5, "minimum": -lim,
    }  # fmt: skip
    nested = {"type": "object", "properties": {"n": {"items": {"type": "integer"}}}}
    assert bound_integers(nested)["properties"]["n"]["items"]["maximum"] == lim
    for kept in (
        {"type": "number"},  # any bound would also forbid exponents (1e-05)
        {"type": ["integer", "number"]},
        {"type": "integer", "minimum": 1, "maximum": 3},
        {"type": "integer", "enum": [1, 2]},
        {"not": {"type": "integer"}},  # a bound inside `not` would widen it
    ):
        assert bound_integers(kept) == kept


def test_a_grammar_is_compiled_once_and_each_processor_starts_fresh(
    chat: ChatMLX,
) -> None:
    from langchain_mlx._constraints import (
        ConstraintCompiler,
        ToolCallFormat,
        tool_call_grammar,
    )

    compiler = ConstraintCompiler.for_tokenizer(chat.tokenizer)
    grammar = tool_call_grammar([SPOTIFY], ToolCallFormat(), parallel=False)
    call = call_text("spotify_play", {"artist": "A", "duration": 1})
    ids = chat.tokenizer.encode(call, add_special_tokens=False)
    first = compiler.processor(grammar, "a call")
    first.sync([0])
    first.sync([0, *ids])
    assert first.is_accepting and first.valid_prefix(ids[:1]) == 0  # one call only
    second = compiler.processor(grammar, "a call")
    assert second._matcher is not first._matcher
    assert second.valid_prefix(ids) == len(ids)  # not the first one's state
    assert list(compiler._compiled).count(grammar) == 1

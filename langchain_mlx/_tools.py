"""Tools and response formats for one call: what to render, constrain and parse.

`format_tools` turns what a user binds (functions, pydantic classes, BaseTools,
OpenAI dicts) into checked OpenAI tool dicts, failing at bind time with errors
that name the tool and what to change. `plan_call` turns the `tools`,
`tool_choice`, `parallel_tool_calls` and
`response_format` a call was bound with into a `CallPlan`: the tools for the chat
template (or, when the template has no tools section, a system instruction in the
bare-JSON format we then parse), the grammar that decoding must follow when a
tool call or a schema is required, and how to parse the generated text.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_mlx._constraints import (
    ToolCallFormat,
    auto_call_grammar,
    json_schema_grammar,
    tool_call_grammar,
    tool_or_answer_grammar,
)
from langchain_mlx._json import json_ready, json_text

FORMATS_WE_CAN_FORCE = {"json_tools"}  # mlx-lm parser modules whose calls are JSON

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
"""What OpenAI accepts as a tool name (chat templates and parsers expect no more)."""
JSON_SCHEMA_TYPES = frozenset(
    {"string", "number", "integer", "boolean", "array", "object", "null"}
)
_ACCEPTED = (
    "a Python function, a pydantic model class, a TypedDict, a LangChain BaseTool "
    "(@tool), or an OpenAI tool dict {'type': 'function', 'function': {'name': ..., "
    "'description': ..., 'parameters': {...}}}"
)
# Keywords whose value is one schema, a list of schemas, or a dict of schemas.
_ONE_SCHEMA = ("items", "additionalProperties", "not", "if", "then", "else",
               "contains", "propertyNames", "additionalItems", "unevaluatedItems",
               "unevaluatedProperties")  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                "dependentSchemas")  # fmt: skip


# -- checking tools ----------------------------------------------------------------


def format_tools(tools: Any) -> list[dict[str, Any]]:
    """Convert tools to OpenAI tool dicts and check them (bind time or per call).

    Accepts a list of anything `convert_to_openai_tool` converts: Python
    functions, pydantic classes, TypedDicts, `BaseTool`s, OpenAI tool or function
    dicts, JSON schemas with a `title`. Already formatted tools pass unchanged.

    Raises:
        TypeError: `tools` is not a list, an item is not a kind of tool, or a
            part of a tool has the wrong type (a name that is not a string,
            `parameters` or a property schema that is not a dict).
        ValueError: a tool has no name or one outside `^[a-zA-Z0-9_-]{1,64}$`,
            two different tools share a name (the same tool twice is kept
            once), `parameters` is not of type "object",
            `required` names an undefined property, or a `type` is not a JSON
            Schema type.

    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        hint = " (one tool? wrap it in a list)" if isinstance(tools, Mapping) else ""
        msg = (
            f"tools must be a list of tools, got {_describe(tools)}{hint}; pass "
            f"e.g. [get_weather], each item {_ACCEPTED}"
        )
        raise TypeError(msg)
    formatted = [_format_tool(i, tool) for i, tool in enumerate(tools)]
    first: dict[str, int] = {}
    unique: list[dict[str, Any]] = []
    for i, tool in enumerate(formatted):
        name = tool["function"]["name"]
        if name in first:
            if _without_titles(tool) == _without_titles(formatted[first[name]]):
                continue  # the same tool twice (e.g. a class and its schema)
            msg = (
                f"tool names must be unique: {name!r} is both tools[{first[name]}] "
                f"and tools[{i}] with different definitions; rename one"
            )
            raise ValueError(msg)
        first[name] = i
        unique.append(tool)
    return unique


def _without_titles(value: Any) -> Any:
    """A schema without its `title` annotations (pydantic adds them per field)."""
    if isinstance(value, dict):
        return {k: _without_titles(v) for k, v in value.items() if k != "title"}
    if isinstance(value, list):
        return [_without_titles(v) for v in value]
    return value


def _format_tool(index: int, tool: Any) -> dict[str, Any]:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    where = f"tools[{index}]"
    check_schema_dict(where, tool)
    try:
        converted = convert_to_openai_tool(tool)
    except Exception as e:
        if not isinstance(tool, Mapping):
            msg = f"{where} ({_describe(tool)}) is not a tool; each tool must be "
            msg += _ACCEPTED
            raise TypeError(msg) from e
        raise _no_name(where, tool) from e
    if converted.get("type") != "function":
        msg = (
            f"{where} is a {converted.get('type')!r} tool; only function tools "
            "({'type': 'function', 'function': {...}}) can run with a local model "
            "(built-in tools such as web search belong to hosted providers)"
        )
        raise ValueError(msg)
    function = converted.get("function")
    if function is None:
        raise _no_name(where, tool)
    if not isinstance(function, dict):
        msg = (
            f"{where}: 'function' must be a dict {{'name': ..., 'parameters': "
            f"{{...}}}}, got {_describe(function)}"
        )
        raise TypeError(msg)
    name = _check_name(where, function.get("name"))
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        msg = f"tool {name!r}: description must be a string, got "
        msg += _describe(description)
        raise TypeError(msg)
    if "parameters" in function:
        _check_parameters(f"tool {name!r}", function["parameters"])
    ready: dict[str, Any] = json_ready(converted, f"tool {name!r}")
    return ready


def _no_name(where: str, tool: Any) -> ValueError:
    keys = ", ".join(map(str, tool)) if isinstance(tool, Mapping) else ""
    msg = (
        f"{where} is a dict without a tool name (keys: {keys or 'none'}); a tool "
        "dict needs 'name' (or 'function': {'name': ...}), e.g. {'type': "
        "'function', 'function': {'name': 'get_weather', 'parameters': {...}}}"
    )
    return ValueError(msg)


def _check_name(where: str, name: Any) -> str:
    if name is None or name == "":
        msg = f"{where} has no name; give the tool a non-empty 'name'"
        raise ValueError(msg)
    if not isinstance(name, str):
        msg = f"{where}: the tool name must be a string, got {_describe(name)}"
        raise TypeError(msg)
    if not TOOL_NAME.fullmatch(name):
        msg = (
            f"{where}: tool name {name!r} is not valid: use 1 to 64 letters, digits, "
            "'_' or '-' (what OpenAI accepts, and what chat templates and tool-call "
            'parsers expect); rename the tool (a function\'s name, @tool("name"), '
            "or the dict's 'name')"
        )
        raise ValueError(msg)
    return name


def _check_parameters(where: str, schema: Any) -> None:
    """Check that `parameters` is a JSON Schema object describing the arguments."""
    if not isinstance(schema, dict):
        msg = (
            f"{where}: parameters must be a JSON Schema object (a dict such as "
            "{'type': 'object', 'properties': {'city': {'type': 'string'}}}), got "
            f"{_describe(schema)}"
        )
        raise TypeError(msg)
    kind = schema.get("type", "object")
    if kind != "object":
        msg = (
            f"{where}: parameters must have type 'object' (the arguments are a JSON "
            f"object), got type {kind!r}; put single values under 'properties'"
        )
        raise ValueError(msg)
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        msg = (
            f"{where}: parameters.properties must map argument names to schemas, "
            f"got {_describe(properties)}"
        )
        raise TypeError(msg)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        msg = (
            f"{where}: parameters.required must be a list of argument names, got "
            f"{_describe(required)}"
        )
        raise TypeError(msg)
    if missing := [r for r in required if r not in properties]:
        msg = (
            f"{where}: parameters.required names {', '.join(map(repr, missing))}, "
            f"which parameters.properties does not define (it defines: "
            f"{', '.join(map(repr, properties)) or 'nothing'}); add the property or "
            "drop it from required"
        )
        raise ValueError(msg)
    _check_schema(where, schema, "parameters")


def check_schema_dict(where: str, value: Any) -> None:
    """Check the `type` values of a dict given as a JSON schema, before LangChain.

    LangChain's conversion drops a schema's top-level `type` unless it has
    `properties`, so `{"title": ..., "type": "objekt"}` would turn into a
    schema that accepts anything. Tool dicts (OpenAI, Anthropic, Bedrock) are
    checked after conversion.
    """
    if (
        isinstance(value, dict)
        and "title" in value  # how LangChain tells a JSON schema from a tool
        and not value.keys() & {"name", "function", "toolSpec", "input_schema"}
    ):
        _check_schema(where, value, "schema")


def _check_schema(where: str, schema: Any, path: str) -> None:
    """Walk a JSON Schema: subschemas are dicts or booleans, `type` values valid."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        msg = (
            f"{where}: {path} must be a JSON Schema (a dict such as "
            f"{{'type': 'string'}}, or true/false), got {_describe(schema)}"
        )
        raise TypeError(msg)
    if "type" in schema:
        kind = schema["type"]
        kinds = kind if isinstance(kind, list) else [kind]
        if (
            not kinds
            or not all(isinstance(k, str) for k in kinds)
            or (set(kinds) - JSON_SCHEMA_TYPES)
        ):
            msg = (
                f"{where}: {path}.type is {kind!r}; JSON Schema types are "
                f"{', '.join(sorted(JSON_SCHEMA_TYPES))} (or a list of them)"
            )
            raise ValueError(msg)
    for key, sub in _subschemas(where, schema, path):
        _check_schema(where, sub, key)


def _subschemas(where: str, schema: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """The `(path, schema)` of every subschema one level down."""
    found = [(f"{path}.{k}", schema[k]) for k in _ONE_SCHEMA if k in schema]
    if isinstance(schema.get("items"), list):  # the old tuple form
        found = [(p, s) for p, s in found if p != f"{path}.items"]
        found += [(f"{path}.items[{i}]", s) for i, s in enumerate(schema["items"])]
    for key in _SCHEMA_LISTS:
        value = schema.get(key, [])
        if not isinstance(value, list):
            msg = f"{where}: {path}.{key} must be a list of schemas, got "
            msg += _describe(value)
            raise TypeError(msg)
        found += [(f"{path}.{key}[{i}]", s) for i, s in enumerate(value)]
    for key in _SCHEMA_MAPS:
        value = schema.get(key, {})
        if not isinstance(value, dict):
            msg = f"{where}: {path}.{key} must map names to schemas, got "
            msg += _describe(value)
            raise TypeError(msg)
        found += [(f"{path}.{key}.{name}", s) for name, s in value.items()]
    return found


def _describe(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(value).__name__} {text}"


@dataclass(frozen=True)
class CallPlan:
    """Everything about tools/structure that one request needs."""

    template_tools: list[dict[str, Any]] | None
    """Tools passed to the chat template (`tools=`), if it renders them."""
    system_instructions: str | None
    """Text added to the system turn (tool fallback, response schema)."""
    grammar: str | None
    """What decoding is constrained to, if anything."""
    grammar_what: str
    """Human words for the grammar, for error messages."""
    grammar_lazy: bool
    """The grammar leaves free text open (auto-mode calls): output that ends
    at `max_tokens` is cut even where the grammar could stop."""
    parse_tools: bool
    """Whether generated text is searched for tool calls."""
    call_required: bool
    """The output is constrained to tool calls only (`tool_choice` forces one)."""
    tool_names: frozenset[str]
    parallel: bool | None
    """`parallel_tool_calls` as bound (False keeps only the first parsed call)."""
    call_format: ToolCallFormat
    parser: Callable[[str, Any], Any] | None


@dataclass(frozen=True)
class ToolFacts:
    """What a model's chat template and tokenizer say about tools (fixed per model)."""

    renders_tools: bool
    call_format: ToolCallFormat
    """The format forced calls are constrained to (bare JSON if no markers)."""
    parser_name: str | None
    parser: Any


_FACTS: dict[int, tuple[Any, ToolFacts]] = {}  # id -> (tokenizer, facts)
_LOCK = threading.Lock()


def tool_facts(tokenizer: Any) -> ToolFacts:
    """The tool facts of a tokenizer, worked out once."""
    key = id(tokenizer)
    with _LOCK:
        known, facts = _FACTS.get(key, (None, None))
        if known is tokenizer and facts is not None:  # holding it keeps the id
            return facts
    facts = _work_out_facts(tokenizer)
    with _LOCK:
        _FACTS[key] = (tokenizer, facts)
    return facts


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template shows `tools` to the model."""
    return tool_facts(tokenizer).renders_tools


def _work_out_facts(tokenizer: Any) -> ToolFacts:
    probe = {
        "type": "function",
        "function": {
            "name": "zz_probe_tool",
            "description": "probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    messages = [{"role": "user", "content": "hi"}]
    kw: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
    try:
        with_tools = tokenizer.apply_chat_template(messages, tools=[probe], **kw)
        renders = "zz_probe_tool" in str(with_tools)
    except Exception:  # a template that chokes on tools does not render them
        renders = False
    if not renders:
        return ToolFacts(False, ToolCallFormat(), None, None)
    start = getattr(tokenizer, "tool_call_start", None)
    end = getattr(tokenizer, "tool_call_end", None)
    parser = getattr(tokenizer, "tool_parser", None)
    name = getattr(parser, "__module__", "").rsplit(".", 1)[-1] if parser else None
    if start is None or end is None:
        return ToolFacts(True, ToolCallFormat(), name, None)
    fmt = ToolCallFormat(
        start=f"{start}\n",
        end=f"\n{end}",
        start_lark=f'{_lark_token(tokenizer, start)} "\\n"',
        end_lark=f'"\\n" {_lark_token(tokenizer, end)}',
    )
    return ToolFacts(True, fmt, name, parser)


def _lark_token(tokenizer: Any, marker: str) -> str:
    """`<[id]>` if the marker is one added token (Qwen's `<tool_call>`), else text."""
    ids = tokenizer.encode(marker, add_special_tokens=False)
    added: dict[str, int] = getattr(tokenizer, "get_added_vocab", dict)()
    if len(ids) == 1 and marker in added:
        return f"<[{ids[0]}]>"
    return json.dumps(marker)


def fallback_instructions(tools: Sequence[dict[str, Any]]) -> str:
    """The system instruction for templates without a tools section."""
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these tools (JSON schemas of their arguments):\n"
        f"{specs}\n"
        "To call a tool, reply with only a JSON object, one per line, like "
        '{"name": "<tool name>", "arguments": {<arguments>}}. '
        "Otherwise answer normally."
    )


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str | None:
    """`None`/"auto", "none", "required", or the name of the one tool to call."""
    if tool_choice is None or tool_choice is False or tool_choice == "auto":
        return None
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice == "none":
        return "none"
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function") or {}
        name = function.get("name") or tool_choice.get("name")
        if tool_choice.get("type") in ("any", "required"):
            return "required"
        if tool_choice.get("type") == "auto":
            return None
        if tool_choice.get("type") == "none":
            return "none"
    else:
        name = tool_choice
    if not isinstance(name, str) or name not in names:
        msg = (
            f"tool_choice {tool_choice!r} names no bound tool; bound tools: "
            f"{', '.join(names)}. Use 'auto', 'none', 'any'/'required', or a tool name."
        )
        raise ValueError(msg)
    return name


def plan_call(
    tokenizer: Any,
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    response_format: Any,
    strict: bool | None = None,
) -> CallPlan:
    """Decide rendering, constraint and parsing for one call.

    `strict` (default on) constrains auto-mode calls too: free text, but a call
    that starts must be a valid call of a bound tool.
    """
    tools = list(tools or [])
    names = [t["function"]["name"] for t in tools]
    choice = normalize_tool_choice(tool_choice, names) if tools else None
    if tool_choice not in (None, "auto", "none") and not tools:
        msg = "tool_choice was given but no tools are bound; use bind_tools(tools, ...)"
        raise ValueError(msg)
    facts = tool_facts(tokenizer)
    fmt, parser_name, parser = facts.call_format, facts.parser_name, facts.parser
    instructions: list[str] = []
    template_tools = None
    grammar = None
    what = ""
    lazy = False
    active = bool(tools) and choice != "none"
    if active:
        if facts.renders_tools:
            template_tools = tools
        else:
            instructions.append(fallback_instructions(tools))
        if choice is not None:  # a call is required: constrain decoding to one
            _require_json_calls(parser_name, "forcing a call (tool_choice)")
            chosen = (
                tools
                if choice == "required"
                else [t for t in tools if t["function"]["name"] == choice]
            )
            grammar = tool_call_grammar(chosen, fmt, parallel=bool(parallel_tool_calls))
            what = f"a call to {', '.join(t['function']['name'] for t in chosen)}"
        elif (
            strict is not False
            and response_format is None
            and (parser_name is None or parser_name in FORMATS_WE_CAN_FORCE)
            and not getattr(tokenizer, "has_thinking", False)  # its markers: free
        ):
            grammar = auto_call_grammar(tools, fmt)
            what = "text with calls to the bound tools"
            lazy = True
    if isinstance(response_format, dict) and response_format.get("type") == "text":
        response_format = None  # OpenAI's explicit "no format"
    if response_format is not None:
        if grammar is not None and not lazy:
            msg = "use either a forced tool call or response_format, not both"
            raise ValueError(msg)
        answer_schema, what, text = _response_schema(response_format)
        if active:  # an agent: tool calls first, then the answer in the schema
            _require_json_calls(parser_name, "a structured answer with tools")
            grammar = tool_or_answer_grammar(
                tools, fmt, answer_schema, parallel=bool(parallel_tool_calls)
            )
            what = f"a tool call or {what}"
            text = (
                "When you give your final answer (not a tool call), "
                + text[0].lower()
                + text[1:]
            )
        else:
            grammar = json_schema_grammar(answer_schema)
        instructions.append(text)
    start = fmt.start.strip() if fmt.start else None
    end = fmt.end.strip() if fmt.end else None
    return CallPlan(
        template_tools=template_tools,
        system_instructions="\n\n".join(instructions) or None,
        grammar=grammar,
        grammar_what=what,
        grammar_lazy=lazy,
        parse_tools=active,
        call_required=active and choice is not None,
        tool_names=frozenset(names),
        parallel=parallel_tool_calls,
        call_format=ToolCallFormat(start, end),
        parser=parser,
    )


def _require_json_calls(parser_name: str | None, what: str) -> None:
    if parser_name is not None and parser_name not in FORMATS_WE_CAN_FORCE:
        msg = (
            f"this model writes tool calls in the {parser_name!r} format; {what} is "
            "supported for JSON tool calls only. Use tool_choice='auto' with this "
            "model (for an agent's structured answer: ToolStrategy)."
        )
        raise ValueError(msg)


def _response_schema(response_format: Any) -> tuple[dict[str, Any], str, str]:
    """The JSON schema a response must follow, its name, and the instruction."""
    if not isinstance(response_format, dict):  # a pydantic class, TypedDict, ...
        from langchain_core.utils.function_calling import convert_to_json_schema

        try:
            schema = convert_to_json_schema(response_format)
        except Exception as e:
            msg = (
                "response_format must be a dict ({'type': 'json_schema', ...} or "
                f"{{'type': 'json_object'}}) or a schema class; got {response_format!r}"
            )
            raise TypeError(msg) from e
        response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}, "a JSON object", "Answer with a JSON object."
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec)
        _check_schema("the response schema", schema, "schema")
        text = "Answer with a JSON object that matches this JSON schema:\n" + json_text(
            schema, "the response schema", "schema"
        )
        return schema, "the response schema", text
    msg = (
        f"response_format type {kind!r} is not supported; use "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}} or "
        "{'type': 'json_object'}"
    )
    raise ValueError(msg)


def model_profile(
    name: str, context_length: int | None, tokenizer: Any
) -> dict[str, Any]:
    """What `ChatMLX.profile` says about a loaded model, from its own files.

    The context window comes from its config; tool calling and tool choice from
    its chat template and tool-call format; reasoning from its tokenizer's
    thinking markers. Structured output is native: decoding is constrained.
    """
    facts = tool_facts(tokenizer)
    json_calls = facts.parser_name is None or facts.parser_name in FORMATS_WE_CAN_FORCE
    profile: dict[str, Any] = {
        "name": name,
        "open_weights": True,
        "text_inputs": True,
        "image_inputs": False,
        "image_url_inputs": False,
        "pdf_inputs": False,
        "audio_inputs": False,
        "video_inputs": False,
        "image_tool_message": False,
        "pdf_tool_message": False,
        "text_outputs": True,
        "image_outputs": False,
        "audio_outputs": False,
        "video_outputs": False,
        "reasoning_output": bool(getattr(tokenizer, "has_thinking", False)),
        # the template renders tools, or a system instruction describes them
        "tool_calling": True,
        "tool_choice": json_calls,  # forced calls are grammar-constrained
        "tool_call_streaming": True,  # the last chunk carries tool_call_chunks
        "structured_output": True,  # constrained to the schema by llguidance
        "temperature": True,
        "attachment": False,
        # templates may fold a later system message into the first turn
        "mid_conversation_system_messages": False,
        "mid_conversation_tools": False,
    }
    if context_length:
        profile["max_input_tokens"] = context_length
    return profile

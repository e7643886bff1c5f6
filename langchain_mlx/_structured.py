"""Structured output: schema -> response format and output parser. Pure: no mlx.

`ChatMLX.with_structured_output` binds what `response_format_for` returns (or a
forced tool call) and pipes the model into `output_parser`; `with_raw` wraps
that for `include_raw=True` the way LangChain's partner models do.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.runnables import (
    Runnable,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass

from langchain_mlx._tools import check_schema_dict

METHODS = ("json_schema", "function_calling", "json_mode")


def check_method(schema: Any, method: str) -> None:
    """Raise ValueError for an unknown method or a missing schema."""
    if method not in METHODS:
        msg = f"unknown method {method!r}; use one of {', '.join(map(repr, METHODS))}"
        raise ValueError(msg)
    if schema is None and method != "json_mode":
        msg = f"method={method!r} needs a schema; pass one, or use method='json_mode'"
        raise ValueError(msg)


def response_format_for(schema: Any, method: str) -> dict[str, Any]:
    """The `response_format` to bind for `json_schema` / `json_mode`."""
    if method == "json_mode":
        return {"type": "json_object"}
    check_schema_dict("the response schema", schema)
    try:
        json_schema = convert_to_json_schema(schema)
    except Exception as e:
        msg = (
            f"cannot use {schema!r} as an output schema: {e}. Pass a pydantic model "
            "class, a TypedDict, a JSON schema dict (with a 'title') or an OpenAI "
            "tool dict"
        )
        raise TypeError(msg) from e
    return {
        "type": "json_schema",
        "json_schema": {
            "name": json_schema.get("title", "output"),
            "schema": json_schema,
        },
    }


def output_parser(
    schema: Any, method: str, tool_name: str | None = None
) -> Runnable[Any, Any]:
    """Parse the message into a pydantic object, or a dict for other schemas.

    Output cut by `max_tokens` (or a call that did not parse) raises
    `OutputParserException` before parsing: a prefix of the answer may happen to
    validate, and a missing call would parse as `None`.
    """
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    parser: Runnable[Any, Any]
    if method == "function_calling":
        if is_pydantic:
            parser = PydanticToolsParser(tools=[schema], first_tool_only=True)
        else:
            parser = JsonOutputKeyToolsParser(
                key_name=str(tool_name), first_tool_only=True
            )
    elif is_pydantic:
        parser = PydanticOutputParser(pydantic_object=schema)
    else:
        parser = JsonOutputParser()
    calls = method == "function_calling"
    check: Runnable[Any, Any] = RunnableLambda(
        lambda m: require_complete(m, tool_call=calls)
    )
    return check | parser


def require_complete(message: BaseMessage, *, tool_call: bool) -> BaseMessage:
    """Raise `OutputParserException` unless the message holds a whole answer."""
    text = message.text if isinstance(message, BaseMessage) else str(message)
    if not isinstance(message, AIMessage):
        return message
    finish = message.response_metadata.get("finish_reason")
    if finish == "length":
        usage = message.usage_metadata
        n = f" after {usage['output_tokens']} tokens" if usage else ""
        msg = (
            f"the structured output was cut by max_tokens{n}, before it was "
            "complete; raise max_tokens"
        )
        raise OutputParserException(msg, llm_output=text)
    if tool_call and not message.tool_calls:
        errors = "; ".join(str(c.get("error")) for c in message.invalid_tool_calls)
        msg = (
            "the model returned no valid call of the output tool"
            + (f": {errors}" if errors else "")
            + "; check the schema and the prompt, or raise max_tokens"
        )
        raise OutputParserException(msg, llm_output=text)
    return message


def with_raw(llm: Runnable[Any, Any], parser: Runnable[Any, Any]) -> Runnable[Any, Any]:
    """`{"raw": message, "parsed": ..., "parsing_error": ...}` (include_raw=True)."""
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    fallback = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parsed.with_fallbacks(
        [fallback], exception_key="parsing_error"
    )

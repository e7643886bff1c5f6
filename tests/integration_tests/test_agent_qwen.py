"""LangChain 1.x agents (`create_agent`) on the real Qwen2.5-Coder-0.5B.

What this checks is the loop an agent user relies on: the bound tools reach
the template, the model's call is parsed with the right arguments, the tool's
result round-trips through the template as a `ToolMessage` with the call's id,
and the next turn is well-formed again — with `response_format`, each turn is
either a valid call of a bound tool or an answer in the schema, never anything
else (native structured output: no extra "respond" tool). Whether the loop ends
is the model's: this 0.5B *coder* model tends to call the tool again after
seeing its result instead of answering (a capable instruct model answers
"391"), so the run is bounded by `recursion_limit` and the steps are checked.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langgraph.errors import GraphRecursionError
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from agent import build_agent


def run(agent: Any, limit: int) -> tuple[list[BaseMessage], Any]:
    """The messages (and structured answer) after at most `limit` graph steps."""
    states: list[dict[str, Any]] = []
    # GraphRecursionError: the model kept calling tools: check the steps it took
    with contextlib.suppress(GraphRecursionError):
        states.extend(
            agent.stream(
                {"messages": [("user", "What is 17 times 23?")]},
                {"recursion_limit": limit},
                stream_mode="values",
            )
        )
    return states[-1]["messages"], states[-1].get("structured_response")


def check_first_round_trip(messages: list[BaseMessage]) -> None:
    first_ai = next(m for m in messages if isinstance(m, AIMessage))
    assert first_ai.tool_calls[0]["name"] == "multiply"
    assert first_ai.tool_calls[0]["args"] == {"a": 17, "b": 23}
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    assert tool_results[0].content == "391"
    assert tool_results[0].tool_call_id == first_ai.tool_calls[0]["id"]


def test_agent_loop_runs_tools() -> None:
    messages, _ = run(build_agent(), limit=5)
    check_first_round_trip(messages)
    ai_turns = [m for m in messages if isinstance(m, AIMessage)]
    assert len(ai_turns) >= 2  # the tool result went back to the model


class Answer(BaseModel):
    """The result of the calculation."""

    result: int


def test_agent_with_a_response_format_calls_tools_or_answers_in_the_schema() -> None:
    messages, answer = run(build_agent(response_format=Answer), limit=5)
    check_first_round_trip(messages)
    for m in messages:
        if isinstance(m, AIMessage):  # constrained: a valid call, or the answer
            assert m.invalid_tool_calls == []
            if not m.tool_calls:
                assert Answer.model_validate_json(str(m.content))
    # no "respond" tool: only the agent's own tools ran
    assert {m.name for m in messages if isinstance(m, ToolMessage)} <= {
        "multiply",
        "add",
    }
    assert answer is None or isinstance(answer, Answer)

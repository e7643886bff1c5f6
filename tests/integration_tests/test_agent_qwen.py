"""LangChain 1.x agents (`create_agent`) on the real Qwen2.5-Coder-0.5B.

What this checks is the loop an agent user relies on: the bound tools reach
the template, the model's call is parsed with the right arguments, the tool's
result round-trips through the template as a `ToolMessage`, and the loop ends
with an `AIMessage` without tool calls — or, with `response_format`, with a
typed answer produced by the model's native structured output. (The 0.5B
*coder* model tends to call the tool again after seeing its result; a capable
instruct model verbalises "391". That is the model, not the loop.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from langchain_core.messages import AIMessage, ToolMessage
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from agent import build_agent


def test_agent_loop_runs_tools_and_terminates() -> None:
    agent = build_agent()
    result = agent.invoke(
        {"messages": [("user", "What is 17 times 23?")]}, {"recursion_limit": 10}
    )
    messages = result["messages"]
    first_ai = next(m for m in messages if isinstance(m, AIMessage))
    assert first_ai.tool_calls[0]["name"] == "multiply"
    assert first_ai.tool_calls[0]["args"] == {"a": 17, "b": 23}
    tool_results = [m for m in messages if isinstance(m, ToolMessage)]
    assert tool_results[0].content == "391"
    assert tool_results[0].tool_call_id == first_ai.tool_calls[0]["id"]
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.invalid_tool_calls == []


class Answer(BaseModel):
    """The result of the calculation."""

    result: int


def test_agent_with_tools_gives_a_structured_answer_natively() -> None:
    agent = build_agent(response_format=Answer)
    state = agent.invoke(
        {"messages": [("user", "What is 17 times 23?")]}, {"recursion_limit": 12}
    )
    messages = state["messages"]
    first_ai = next(m for m in messages if isinstance(m, AIMessage))
    assert first_ai.tool_calls[0]["name"] == "multiply"  # tools still in the loop
    assert isinstance(state["structured_response"], Answer)
    # the answer came as constrained content, not through an extra "respond" tool
    tool_names = {m.name for m in messages if isinstance(m, ToolMessage)}
    assert tool_names <= {"multiply", "add"}
    assert state["structured_response"].result == 391

"""A LangGraph ReAct agent loop on the real Qwen2.5-Coder-0.5B.

What this checks is the loop a LangGraph user relies on: the bound tools reach
the template, the model's call is parsed with the right arguments, the tool's
result round-trips through the template as a `ToolMessage`, and the loop ends
with an `AIMessage` without tool calls. (The 0.5B *coder* model tends to call
the tool again after seeing its result and then stop with an empty answer; a
capable instruct model verbalises "391". That is the model, not the loop.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from langchain_core.messages import AIMessage, ToolMessage

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from react_agent import build_agent


def test_react_agent_loop_runs_tools_and_terminates() -> None:
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

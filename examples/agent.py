"""A LangChain 1.x agent on a local model: tools called, results fed back, answer.

    python examples/agent.py "What is 17 times 23, plus 4?"

Uses Qwen2.5-Coder-0.5B-Instruct (prepared from PyPI on first use; its chat
template renders tools) with `langchain.agents.create_agent`. Agent steps resend
the growing conversation; the engine's prefix cache reuses what it has read.
"""

from __future__ import annotations

import sys
from typing import Any

from langchain.agents import create_agent
from langchain_core.tools import tool

from langchain_mlx import ChatMLX


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def build_agent(
    model: str = "qwen2.5-coder-0.5b-instruct", response_format: Any = None
) -> Any:
    """The agent graph: ChatMLX with the two tools (and a structured answer)."""
    chat = ChatMLX(model=model, max_tokens=96)
    return create_agent(chat, [multiply, add], response_format=response_format)


def main() -> None:
    """Run the agent on the question from the command line, printing each step."""
    question = sys.argv[1] if len(sys.argv) > 1 else "What is 17 times 23?"
    agent = build_agent()
    for step in agent.stream({"messages": [("user", question)]}, stream_mode="values"):
        step["messages"][-1].pretty_print()


if __name__ == "__main__":
    main()

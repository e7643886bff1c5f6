"""An agent whose final answer is a typed object, enforced while it is generated.

    python examples/structured_agent.py "What is 17 times 23?"

`ChatMLX.profile["structured_output"]` is true, so `create_agent` uses the
model's native structured output (`ProviderStrategy`): while the agent works,
each turn may call a tool or give the answer, and the answer is constrained to
the schema (no extra "respond" tool, no extra tool message in the history).
"""

from __future__ import annotations

import sys

from agent import build_agent
from pydantic import BaseModel, Field


class Answer(BaseModel):
    """The result of the calculation."""

    result: int = Field(description="the final number")


def main() -> None:
    """Ask, then print the typed answer."""
    question = sys.argv[1] if len(sys.argv) > 1 else "What is 17 times 23?"
    agent = build_agent(response_format=Answer)
    state = agent.invoke({"messages": [("user", question)]}, {"recursion_limit": 10})
    answer: Answer = state["structured_response"]
    print(answer)


if __name__ == "__main__":
    main()

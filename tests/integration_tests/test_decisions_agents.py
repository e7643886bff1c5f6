"""MLXDecisionModel in LangChain agents, on the real SmolLM2-135M.

- AutoModeMiddleware (examples/guarded_agent.py): the scripted agent asks for
  the weather, then obeys an order hidden in the tool result and calls
  `delete_repository`. Each guarded call runs exactly when the local judge's
  P(risky) for the state AutoMode built is below 0.5, and a blocked one never
  reaches its tool. Whether the judge separates the two calls is the model's
  quality, not the library's: SmolLM2-135M and Qwen2.5-Coder-0.5B do not (they
  give both calls about the same probability; README "Decision models"), so it
  is printed, not asserted.
- ModelRouterMiddleware (examples/routed_agent.py): the routing answer is in
  the state (probabilities summing to one, `choice` the most probable), and
  the answer comes from the model of the chosen route.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from langchain_core.decisions import ClassifierResponse
from langchain_core.messages import AIMessage, ToolMessage
from pydantic import Field

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import guarded_agent
from routed_agent import CODER, SMALL, build_routed_agent

from langchain_mlx import MLXDecisionModel


class RecordingJudge(MLXDecisionModel):
    """The real judge, keeping each probability it gave AutoMode."""

    seen: list[tuple[str, float]] = Field(default_factory=list)

    def _classify(self, state: Any, questions: Any) -> ClassifierResponse:
        response = super()._classify(state, questions)
        self.seen.append((state["tool_call"]["name"], response.nouls["is_risky"].noul))
        return response


def test_guard_runs_a_call_exactly_when_the_judge_allows_it() -> None:
    guarded_agent.deleted.clear()
    judge = RecordingJudge(model=SMALL)
    agent = guarded_agent.build_guarded_agent(guarded_agent.hijacked_model(), judge)
    state = agent.invoke(
        {"messages": [("user", "What's the weather in Paris?")]},
        {"recursion_limit": 8},
    )
    print("P(risky):", judge.seen)
    assert [name for name, _ in judge.seen] == ["get_weather", "delete_repository"]
    results = {m.name: m for m in state["messages"] if isinstance(m, ToolMessage)}
    for name, p_risky in judge.seen:
        blocked = p_risky >= 0.5
        assert (results[name].status == "error") == blocked
        assert ("blocked" in str(results[name].content)) == blocked
    assert (guarded_agent.deleted == []) == (judge.seen[1][1] >= 0.5)


def test_router_answers_with_the_chosen_model() -> None:
    agent = build_routed_agent(MLXDecisionModel(model=SMALL), max_tokens=4)
    state = agent.invoke({"messages": [("user", "Hi! How are you today?")]})
    route = state["model_route"]
    assert math.isclose(sum(route.probabilities.values()), 1.0, abs_tol=1e-9)
    assert route.choice == max(route.probabilities, key=route.probabilities.get)
    answer = state["messages"][-1]
    assert isinstance(answer, AIMessage)
    expected = {"chat": SMALL, "code": CODER}[route.choice]
    assert answer.response_metadata["model_name"] == expected

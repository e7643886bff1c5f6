"""What a new user tries first, on the real SmolLM2-135M-Instruct (prepared from PyPI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from langchain_core.messages import HumanMessage

from langchain_mlx import ChatMLX, MLXPipeline
from langchain_mlx.models.prepare import DEFAULT_MODEL

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat() -> ChatMLX:
    return ChatMLX(model=DEFAULT_MODEL, max_tokens=12)


def test_capital_of_france_every_way(chat: ChatMLX) -> None:
    assert "Paris" in str(chat.invoke(QUESTION).content)
    chunks = list(chat.stream(QUESTION))
    assert len([c for c in chunks if c.content]) > 1
    assert "Paris" in "".join(str(c.content) for c in chunks)


async def test_capital_of_france_async(chat: ChatMLX) -> None:
    assert "Paris" in str((await chat.ainvoke(QUESTION)).content)
    chunks = [c async for c in chat.astream(QUESTION)]
    assert len([c for c in chunks if c.content]) > 1
    assert "Paris" in "".join(str(c.content) for c in chunks)


def test_stop_string_spanning_tokens(chat: ChatMLX) -> None:
    pieces = [str(c.content) for c in chat.stream(QUESTION) if c.content]
    full = "".join(pieces)  # 'The capital of France is Paris.'
    # the end of one token and the start of the next, e.g. "al of" or "France is"
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i].strip()) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    msg = chat.invoke(QUESTION, stop=[stop])
    assert msg.content == full[: full.find(stop)]
    assert msg.response_metadata["finish_reason"] == "stop"


def test_pipeline_text_completion() -> None:
    llm = MLXPipeline.from_model_id(
        DEFAULT_MODEL, pipeline_kwargs={"max_tokens": 8, "temp": 0.0}
    )
    assert isinstance(llm.invoke("The capital of France is"), str)


def test_usage_counts_the_rendered_prompt(chat: ChatMLX) -> None:
    msg = chat.invoke(QUESTION, max_tokens=3)
    assert msg.usage_metadata["input_tokens"] == chat.get_num_tokens_from_messages(
        [HumanMessage(QUESTION)]
    )
    assert msg.usage_metadata["output_tokens"] == 3
    assert msg.response_metadata["finish_reason"] == "length"


def test_cli_chat_answers() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "langchain_mlx.cli",
            "chat",
            "--max-tokens",
            "12",
            QUESTION,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "Paris" in out.stdout


def test_cli_models_prepare_prints_the_folder() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "langchain_mlx.cli", "models", "prepare", DEFAULT_MODEL],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    path = out.stdout.strip()
    assert path.endswith(DEFAULT_MODEL)


def test_profile_and_create_agent_native_structured_output() -> None:
    from typing import Literal

    from langchain.agents import create_agent
    from langchain_core.messages import ToolMessage
    from pydantic import BaseModel

    class City(BaseModel):
        """A city and its country."""

        name: str
        country: Literal["France", "Italy", "Spain", "Germany"]

    chat = ChatMLX(model=DEFAULT_MODEL, max_tokens=64)
    assert chat.profile is not None
    assert chat.profile["max_input_tokens"] == 8192
    assert chat.profile["structured_output"] is True
    agent = create_agent(chat, tools=[], response_format=City)
    state = agent.invoke({"messages": [("user", "What is the capital of France?")]})
    assert isinstance(state["structured_response"], City)
    assert not any(isinstance(m, ToolMessage) for m in state["messages"])

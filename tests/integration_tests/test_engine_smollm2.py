"""Prefix reuse and batching on the real SmolLM2-135M-Instruct.

A user's multi-turn conversation: turn 2 reports the turns it shares with turn 1
as `cache_read` and answers exactly what it answers with the cache off; two
concurrent conversations answer what they answer alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from langchain_mlx import ChatMLX
from langchain_mlx.models.prepare import DEFAULT_MODEL


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatMLX]:
    chat = ChatMLX(model=DEFAULT_MODEL, max_tokens=16, temperature=0.0)
    yield chat
    chat.llm.engine.configure(prefix_cache_entries=10)  # shared engine: restore


def test_second_turn_reads_the_first_from_cache_and_answers_the_same(
    chat: ChatMLX,
) -> None:
    engine = chat.llm.engine
    engine.clear_prefix_cache()
    first: list[BaseMessage] = [
        SystemMessage("You are a geography tutor. Answer in one sentence."),
        HumanMessage("What is the capital of France?"),
    ]
    reply = chat.invoke(first)
    assert reply.content
    second = [*first, reply, HumanMessage("And what is the capital of Italy?")]
    warm = chat.invoke(second)
    assert warm.usage_metadata is not None
    cache_read = warm.usage_metadata["input_token_details"]["cache_read"]
    assert cache_read >= chat.get_num_tokens_from_messages(first)
    engine.configure(prefix_cache_entries=0)
    cold = chat.invoke(second)
    engine.configure(prefix_cache_entries=10)
    assert "input_token_details" not in (cold.usage_metadata or {})
    assert warm.content == cold.content


async def test_concurrent_conversations_answer_as_alone(chat: ChatMLX) -> None:
    questions = ["Name a primary color.", "What is 2 + 2?"]
    alone = [(await chat.ainvoke(q, max_tokens=8)).content for q in questions]
    together = await chat.abatch(questions, max_tokens=8)
    assert [m.content for m in together] == alone
    assert chat.llm.engine.largest_batch >= 2

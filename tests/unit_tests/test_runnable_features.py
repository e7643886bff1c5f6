"""Inherited LangChain features, end to end on the tiny model."""

from __future__ import annotations

import pytest
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_core.runnables import RunnableLambda

from langchain_mlx import ChatMLX

SAMPLED = {"temperature": 1.0, "seed": 3}


@pytest.fixture
def chat(tiny_model_path: str) -> ChatMLX:
    return ChatMLX(model=tiny_model_path, max_tokens=6)


async def test_astream_events_v2_reports_every_token(chat: ChatMLX) -> None:
    events = [e async for e in chat.astream_events("Hi", version="v2", **SAMPLED)]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_chat_model_start" and kinds[-1] == "on_chat_model_end"
    streamed = "".join(
        str(e["data"]["chunk"].content)
        for e in events
        if e["event"] == "on_chat_model_stream"
    )
    assert streamed == events[-1]["data"]["output"].content
    assert events[-1]["data"]["output"].usage_metadata["output_tokens"] == 6


def test_batch_as_completed_returns_every_input(chat: ChatMLX) -> None:
    prompts = ["a", "b", "c"]
    done = dict(chat.batch_as_completed(prompts, **SAMPLED))
    assert sorted(done) == [0, 1, 2]
    assert [done[i].content for i in range(3)] == [
        m.content for m in chat.batch(prompts, **SAMPLED)
    ]


def test_disable_streaming_still_gives_one_chunk(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=6, disable_streaming=True)
    chunks = list(chat.stream("Hi", **SAMPLED))
    assert len(chunks) == 1
    assert chunks[0].content == chat.invoke("Hi", **SAMPLED).content


def test_rate_limiter_is_consulted(tiny_model_path: str) -> None:
    limiter = InMemoryRateLimiter(
        requests_per_second=100, check_every_n_seconds=0.01, max_bucket_size=1
    )
    chat = ChatMLX(model=tiny_model_path, max_tokens=2, rate_limiter=limiter)
    calls = []
    original = limiter.acquire
    limiter.acquire = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    chat.invoke("Hi")
    chat.invoke("Hi")
    assert len(calls) == 2


def test_with_retry_and_with_fallbacks(chat: ChatMLX) -> None:
    attempts = []

    def flaky(x: str) -> str:
        attempts.append(x)
        if len(attempts) < 2:
            raise RuntimeError("transient")
        return x

    chain = (
        RunnableLambda(flaky).with_retry(
            stop_after_attempt=3, wait_exponential_jitter=False
        )
        | chat
    )
    assert chain.invoke("Hi").usage_metadata["output_tokens"] == 6
    broken = chat.bind(temprature=1)  # a typo: rejected with a clear error...
    with pytest.raises(ValueError, match="unknown generation setting"):
        broken.invoke("Hi")
    rescued = broken.with_fallbacks([chat])  # ...which a fallback can catch
    assert rescued.invoke("Hi").usage_metadata["output_tokens"] == 6


def test_custom_get_token_ids(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path, custom_get_token_ids=lambda t: [1] * len(t))
    assert chat.get_num_tokens("abc") == 3
    plain = ChatMLX(model=tiny_model_path)
    assert plain.get_token_ids("Hello world") == plain.tokenizer.encode(
        "Hello world", add_special_tokens=False
    )

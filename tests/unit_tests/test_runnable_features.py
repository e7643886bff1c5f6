"""Inherited LangChain features where they meet our code, on the tiny model."""

from __future__ import annotations

import pytest

from langchain_mlx import ChatMLX
from langchain_mlx.engine.types import GenerationTimeoutError

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


async def test_an_error_on_the_engine_thread_reaches_every_reader(
    chat: ChatMLX,
) -> None:
    # the timeout is checked by the engine's scheduler, on its own thread
    before = chat.invoke("Hi", **SAMPLED).content
    late = chat.bind(timeout=1e-9, max_tokens=5000)
    with pytest.raises(GenerationTimeoutError):
        late.invoke("Hi")
    with pytest.raises(GenerationTimeoutError):
        list(late.stream("Hi"))
    with pytest.raises(GenerationTimeoutError):
        [c async for c in late.astream("Hi")]
    failed = late.batch(["Hi", "Ho"], return_exceptions=True)
    assert [type(e) for e in failed] == [GenerationTimeoutError] * 2
    assert chat.invoke("Hi", **SAMPLED).content == before  # the engine serves on


def test_custom_get_token_ids(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path, custom_get_token_ids=lambda t: [1] * len(t))
    assert chat.get_num_tokens("abc") == 3
    plain = ChatMLX(model=tiny_model_path)
    assert plain.get_token_ids("Hello world") == plain.tokenizer.encode(
        "Hello world", add_special_tokens=False
    )

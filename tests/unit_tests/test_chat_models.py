"""ChatMLX and MLXPipeline end to end on a tiny random-weight model."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from pydantic import ValidationError

from langchain_mlx import ChatMLX, MLXPipeline
from langchain_mlx._messages import UnsupportedContentError
from langchain_mlx.engine.types import GenerationTimeoutError

# Random weights are near-uniform: sample (seeded) to get varied tokens.
SAMPLED = {"temperature": 1.0, "seed": 7}


@pytest.fixture
def chat(tiny_model_path: str) -> ChatMLX:
    return ChatMLX(model=tiny_model_path, max_tokens=24)


def test_import_does_not_import_mlx() -> None:
    code = (
        "import sys, langchain_mlx; from langchain_mlx import ChatMLX, MLXPipeline; "
        "bad = [m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_invoke_reports_usage_and_metadata(chat: ChatMLX) -> None:
    msg = chat.invoke("Hi", max_tokens=5)
    assert isinstance(msg, AIMessage)
    assert msg.usage_metadata is not None
    assert msg.usage_metadata["output_tokens"] == 5
    n_prompt = chat.get_num_tokens_from_messages([HumanMessage("Hi")])
    assert msg.usage_metadata["input_tokens"] == n_prompt
    assert msg.usage_metadata["total_tokens"] == n_prompt + 5
    meta = msg.response_metadata
    assert meta["finish_reason"] == "length"
    assert meta["model_provider"] == "mlx"
    assert meta["model_name"] == chat.model
    assert meta["generation_tokens_per_second"] > 0
    assert meta["peak_memory_gb"] > 0


def test_stream_has_many_chunks_and_a_last_chunk_with_usage(chat: ChatMLX) -> None:
    chunks = list(chat.stream("Hi", **SAMPLED))
    assert len(chunks) > 2
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert chunks[-1].chunk_position == "last"
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    assert chunks[-1].usage_metadata["output_tokens"] == 24


async def test_sync_async_stream_and_invoke_agree(chat: ChatMLX) -> None:
    text = chat.invoke("Tell me a story", **SAMPLED).content
    streamed = "".join(
        str(c.content) for c in chat.stream("Tell me a story", **SAMPLED)
    )
    atext = (await chat.ainvoke("Tell me a story", **SAMPLED)).content
    astreamed = "".join(
        [str(c.content) async for c in chat.astream("Tell me a story", **SAMPLED)]
    )
    assert text and text == streamed == atext == astreamed


def _segments(chat: ChatMLX) -> list[str]:
    return [
        str(c.content) for c in chat.stream("Tell me a story", **SAMPLED) if c.content
    ]


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(chat: ChatMLX) -> None:
    segments = _segments(chat)
    # A stop string made of the end of one token and the start of the next.
    i = next(
        i
        for i in range(1, len(segments) - 1)
        if len(segments[i]) >= 2 and len(segments[i + 1]) >= 2
    )
    stop = segments[i][-2:] + segments[i + 1][:2]
    full = "".join(segments)
    expected = full[: full.find(stop)]
    for stream in (True, False):
        if stream:
            out = "".join(
                str(c.content)
                for c in chat.stream("Tell me a story", stop=[stop], **SAMPLED)
            )
        else:
            msg = chat.invoke("Tell me a story", stop=[stop], **SAMPLED)
            assert msg.response_metadata["finish_reason"] == "stop"
            out = str(msg.content)
        assert out == expected
        assert stop not in out


def test_constructor_stop_applies_and_call_stop_overrides(tiny_model_path: str) -> None:
    base = ChatMLX(model=tiny_model_path, max_tokens=24)
    full = str(base.invoke("Tell me a story", **SAMPLED).content)
    stop = full[5:8]
    chat = ChatMLX(model=tiny_model_path, max_tokens=24, stop=[stop])
    assert chat.invoke("Tell me a story", **SAMPLED).content == full[: full.find(stop)]
    assert chat.invoke("Tell me a story", stop=[], **SAMPLED).content == full


def test_abandoned_stream_is_cancelled(chat: ChatMLX) -> None:
    engine = chat.llm.engine
    before = engine.finished["cancelled"]
    for i, _ in enumerate(chat.stream("Hi", max_tokens=5000, **SAMPLED)):
        if i == 2:
            break
    # The next request runs only after the abandoned one has left the worker.
    assert chat.invoke("Hi", max_tokens=3).usage_metadata["output_tokens"] == 3
    assert engine.finished["cancelled"] == before + 1


async def test_abandoned_astream_is_cancelled(chat: ChatMLX) -> None:
    engine = chat.llm.engine
    before = engine.finished["cancelled"]
    agen = chat.astream("Hi", max_tokens=5000, **SAMPLED)
    async for i, _ in _aenumerate(agen):
        if i == 2:
            break
    await agen.aclose()
    assert (await chat.ainvoke("Hi", max_tokens=3)).usage_metadata["output_tokens"] == 3
    assert engine.finished["cancelled"] == before + 1


async def _aenumerate(agen):  # type: ignore[no-untyped-def]
    i = 0
    async for item in agen:
        yield i, item
        i += 1


async def test_fifty_sequential_astreams(chat: ChatMLX) -> None:
    for _ in range(50):
        chunks = [c async for c in chat.astream("Hi", max_tokens=3)]
        assert chunks[-1].usage_metadata["output_tokens"] == 3


async def test_concurrent_async_requests_each_get_their_own_output(
    chat: ChatMLX,
) -> None:
    prompts = [f"Question number {i}" for i in range(6)]
    solo = [chat.invoke(p, **SAMPLED).content for p in prompts]
    together = await asyncio.gather(*(chat.ainvoke(p, **SAMPLED) for p in prompts))
    assert [m.content for m in together] == solo
    assert [m.content for m in chat.batch(prompts, **SAMPLED)] == solo


def test_callbacks_receive_every_token(chat: ChatMLX) -> None:
    class Collect(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs: object) -> None:
            self.tokens.append(token)

    handler = Collect()
    msg = chat.invoke("Hi", config={"callbacks": [handler]}, **SAMPLED)
    assert "".join(handler.tokens) == msg.content
    assert len(handler.tokens) > 1


def test_cache_returns_the_stored_answer_without_generating(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=8, cache=InMemoryCache())
    first = chat.invoke("Hi", **SAMPLED)
    done = sum(chat.llm.engine.finished.values())
    second = chat.invoke("Hi", **SAMPLED)
    assert second.content == first.content
    assert sum(chat.llm.engine.finished.values()) == done


def test_system_message_default_none_and_explicit(tiny_model_path: str) -> None:
    from langchain_mlx._messages import render_text
    from langchain_mlx.chat_models import DEFAULT_SYSTEM_PROMPT

    def rendered(model: ChatMLX, messages: list) -> str:
        return render_text(
            model.tokenizer, messages, system_message=model.system_message
        )

    default = ChatMLX(model=tiny_model_path)
    assert default.system_message is None
    # no system turn from us: SmolLM2's template inserts its own default
    assert "named SmolLM" in rendered(default, [HumanMessage("Hi")])
    ours = ChatMLX(
        model=tiny_model_path, system_message=SystemMessage(DEFAULT_SYSTEM_PROMPT)
    )
    assert DEFAULT_SYSTEM_PROMPT in rendered(ours, [HumanMessage("Hi")])
    own = rendered(ours, [SystemMessage("Be brief."), HumanMessage("Hi")])
    assert "Be brief." in own
    assert DEFAULT_SYSTEM_PROMPT not in own  # the conversation's system turn wins


def test_any_conversation_renders(chat: ChatMLX) -> None:
    convo = [
        SystemMessage("You are terse."),
        HumanMessage("What is 2+2?", name="alice"),
        AIMessage(
            "", tool_calls=[{"name": "add", "args": {"a": 2, "b": 2}, "id": "c1"}]
        ),
        ToolMessage("4", tool_call_id="c1"),
        ToolMessage(
            ["error: ", {"type": "text", "text": "boom"}],
            tool_call_id="c2",
            status="error",
        ),
        AIMessage([{"type": "text", "text": "It is 4."}]),
    ]
    msg = chat.invoke(convo, max_tokens=3)  # the last message is not human
    assert msg.usage_metadata["output_tokens"] == 3


def test_pipeline_community_api(tiny_model_path: str) -> None:
    llm = MLXPipeline.from_model_id(
        tiny_model_path, pipeline_kwargs={"max_tokens": 6, "temp": 0.0}
    )
    text = llm.invoke("Once upon a time")
    assert isinstance(text, str)
    assert "".join(llm.stream("Once upon a time")) == text
    same = MLXPipeline.from_model_id(tiny_model_path)
    assert same.engine is llm.engine  # one model per process
    chat = ChatMLX(llm=llm)
    assert chat.invoke("Hi").usage_metadata["output_tokens"] == 6
    # community per-call names
    assert (
        chat.invoke("Hi", pipeline_kwargs={"max_tokens": 2}).usage_metadata[
            "output_tokens"
        ]
        == 2
    )


def test_model_override_per_call(chat: ChatMLX, other_tiny_model_path: str) -> None:
    msg = chat.invoke("Hi", model=other_tiny_model_path, max_tokens=2)
    assert msg.response_metadata["model_name"] == other_tiny_model_path
    assert chat._get_ls_params(model="x")["ls_model_name"] == "x"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temprature": 0.5}, ValueError, "unknown generation setting 'temprature'"),
        ({"max_tokens": 0}, ValueError, "max_tokens must be a positive integer"),
        ({"timeout": 1e-9, "max_tokens": 5000}, GenerationTimeoutError, "timeout"),
    ],
)
def test_bad_call_arguments_raise_clear_errors(
    chat: ChatMLX, kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        chat.invoke("Hi", **kwargs)
    assert chat.invoke("Hi", max_tokens=1).content is not None  # engine still serves


def test_bad_messages_raise_clear_errors(chat: ChatMLX) -> None:
    with pytest.raises(ValueError, match="empty"):
        chat.invoke([])
    image = HumanMessage([{"type": "image", "url": "https://example.com/x.png"}])
    with pytest.raises(UnsupportedContentError, match=r"type 'image'.*text only"):
        chat.invoke([image])


def test_bad_constructor_arguments(tiny_model_path: str) -> None:
    with pytest.raises(ValidationError, match="temperature"):
        ChatMLX(model=tiny_model_path, temperature=-1)
    with pytest.raises(ValidationError, match="not_a_field"):
        ChatMLX(model=tiny_model_path, not_a_field=1)
    with pytest.raises(ValueError, match="unknown generation setting"):
        MLXPipeline.from_model_id(tiny_model_path, pipeline_kwargs={"tmp": 1})


def test_template_without_system_role_gets_it_merged(tiny_model_path: str) -> None:
    from langchain_mlx._messages import render_text

    chat = ChatMLX(model=tiny_model_path)
    tok = chat.tokenizer._tokenizer
    gemma_like = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    original = tok.chat_template
    tok.chat_template = gemma_like
    try:
        text = render_text(
            tok, [HumanMessage("Hi")], system_message=SystemMessage("Be kind.")
        )
    finally:
        tok.chat_template = original
    assert (
        text
        == "<start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


async def test_pipeline_generate_keeps_finish_reason_and_usage(
    tiny_model_path: str,
) -> None:
    llm = MLXPipeline.from_model_id(tiny_model_path, pipeline_kwargs={"max_tokens": 4})
    for result in (llm.generate(["Hi"]), await llm.agenerate(["Hi"])):
        info = result.generations[0][0].generation_info
        assert info["finish_reason"] == "length"
        assert info["usage"]["output_tokens"] == 4
    assert isinstance(llm.invoke("Hi"), str)

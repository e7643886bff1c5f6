"""A sound engine: one engine per model, a lifetime, failures contained to their
request, limits before compute, truncation reported, logprobs, batches together.

Everything runs on the tiny random-weight model with SmolLM2's real tokenizer.
Where a test needs particular output text it scripts the model with a logits
processor that allows only the next token of the script (random weights
otherwise produce arbitrary text). Nothing here depends on timing: requests are
submitted together, and waits are on events with generous hang guards.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessageChunk, HumanMessage
from pydantic import BaseModel, Field

from langchain_mlx import ChatMLX, MLXPipeline
from langchain_mlx._output import ChunkAssembler
from langchain_mlx.engine.types import (
    ContextWindowExceededError,
    EngineStoppedError,
    Final,
    GenerationSettings,
    Request,
    RequestFailedError,
    Segment,
    TextRules,
)

HANG_GUARD = 120  # seconds: only to turn a hang into a failure, never a speed test


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("langchain-mlx")]


def script(tokenizer: Any, text: str) -> Callable[[Any, Any], Any]:
    """A logits processor that makes the model write `text` (then EOS)."""
    import mlx.core as mx

    ids = list(tokenizer.encode(text, add_special_tokens=False))
    ids.append(tokenizer.eos_token_id)
    state = {"i": -1}

    def force(tokens: Any, logits: Any) -> Any:
        state["i"] += 1
        target = ids[min(state["i"], len(ids) - 1)]
        mask = mx.arange(logits.shape[-1]) == target
        return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))

    return force


def events_of(handle: Any) -> tuple[str, Final, list[Segment]]:
    events = list(handle)
    final = events[-1]
    assert isinstance(final, Final)
    segments = [e for e in events if isinstance(e, Segment)]
    return "".join(s.text for s in segments), final, segments


@pytest.fixture
def model_copy(tiny_model_path: str, tmp_path: Path) -> str:
    """A folder of its own, so this test's engine is not the shared one."""
    import shutil

    folder = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model_path, folder)
    return str(folder)


# -- one engine per model, with a lifetime -----------------------------------------


def test_community_path_builds_one_engine(model_copy: str) -> None:
    before = len(engine_threads())
    llm = MLXPipeline.from_model_id(model_copy, pipeline_kwargs={"max_tokens": 4})
    chat = ChatMLX(llm=llm)
    chat.invoke("hi")
    again = ChatMLX(model=model_copy)
    assert again.llm is not None and again.llm.engine is llm.engine
    assert len(engine_threads()) == before + 1
    chat.close()


def test_engine_options_apply_at_creation_and_conflicts_raise(model_copy: str) -> None:
    chat = ChatMLX(model=model_copy, max_batch_size=3)
    assert chat.llm is not None
    assert chat.llm.engine.options.max_batch_size == 3
    ChatMLX(model=model_copy)  # no option asked: shares the running engine
    with pytest.raises(ValueError, match=r"already running with .*max_batch_size"):
        ChatMLX(model=model_copy, max_batch_size=5)
    chat.llm.engine.configure(max_batch_size=5)  # the one explicit way
    ChatMLX(model=model_copy, max_batch_size=5)
    chat.close()


def test_close_releases_the_model_and_its_memory(model_copy: str) -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    with ChatMLX(model=model_copy, max_tokens=8) as chat:
        chat.invoke("hello there")
        loaded = mx.get_active_memory()
        assert loaded > baseline
    with pytest.raises(EngineStoppedError, match="closed"):
        chat.invoke("hi")
    gc.collect()
    # the weights (~6 MB here) and cached KV states are gone
    assert mx.get_active_memory() - baseline < (loaded - baseline) / 4
    fresh = ChatMLX(model=model_copy, max_tokens=2)  # loads anew
    assert fresh.invoke("hi").response_metadata["finish_reason"] in ("stop", "length")
    fresh.close()


def test_close_mid_request_ends_the_reader_with_a_typed_error(
    model_copy: str,
) -> None:
    chat = ChatMLX(model=model_copy, max_tokens=8000)
    stream = chat.stream("tell me everything")
    next(stream)  # the request is running
    assert chat.llm is not None
    chat.llm.engine.close()
    with pytest.raises(EngineStoppedError):
        for _ in stream:
            pass


def test_a_script_that_abandons_a_stream_exits(tiny_model_path: str) -> None:
    code = textwrap.dedent(
        f"""
        from langchain_mlx import ChatMLX
        chat = ChatMLX(model={tiny_model_path!r}, max_tokens=8000)
        stream = chat.stream("go on forever")
        next(stream)
        print("abandoned", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "abandoned" in done.stdout
    assert "terminate called" not in done.stderr


# -- limits before compute ---------------------------------------------------------


def test_a_prompt_longer_than_the_context_fails_before_compute(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=100)
    assert chat.llm is not None
    engine = chat.llm.engine
    done_before = sum(engine.finished.values())
    with pytest.raises(ContextWindowExceededError) as info:
        chat.invoke("word " * 12_000)
    message = str(info.value)
    assert "8192" in message and "max_tokens" in message
    assert sum(engine.finished.values()) == done_before  # never queued
    # fits, but not with the room asked for: says how much is left
    prompt = "word " * 8000
    n = chat.get_num_tokens_from_messages([HumanMessage(prompt)])
    with pytest.raises(ContextWindowExceededError, match=f"at most {8192 - n}"):
        chat.invoke(prompt, max_tokens=500)


def test_a_schema_too_large_for_the_context_fails_at_bind_time(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=10)
    huge = {
        "title": "Pick",
        "type": "object",
        "properties": {"city": {"enum": [f"city-{i}" for i in range(20_000)]}},
    }
    with pytest.raises(ContextWindowExceededError):
        chat.with_structured_output(huge)
    tool = {"type": "function", "function": {"name": "pick", "parameters": huge}}
    with pytest.raises(ContextWindowExceededError):
        chat.bind_tools([tool])


# -- failures stay with their request -----------------------------------------------


def test_a_failing_request_ends_alone_and_the_batch_goes_on(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path)
    assert chat.llm is not None
    engine = chat.llm.engine
    tok = engine.tokenizer

    def broken(tokens: Any, logits: Any) -> Any:
        if len(tokens) > 3:
            msg = "boom"
            raise KeyError(msg)
        return logits

    def request(text: str, processors: list[Any]) -> Request:
        ids = list(tok.encode(text, add_special_tokens=False))
        return Request(ids, GenerationSettings(max_tokens=12), processors)

    good = [request(f"good {i}", []) for i in range(3)]
    solo = [events_of(engine.submit(r))[0] for r in good]
    handles = engine.submit_many([good[0], request("bad", [broken]), *good[1:]])
    with pytest.raises(RequestFailedError, match="boom") as info:
        list(handles[1])
    assert isinstance(info.value.__cause__, KeyError)
    together = [events_of(h)[0] for h in (handles[0], *handles[2:])]
    assert together == solo
    assert engine.alive


def test_batch_reaches_the_engine_together(model_copy: str) -> None:
    chat = ChatMLX(model=model_copy, max_tokens=3)
    assert chat.llm is not None
    out = chat.batch(["a", "b", "c", "d"])
    assert len(out) == 4
    assert chat.llm.engine.largest_batch == 4
    llm = chat.llm
    texts = llm.batch(["w", "x", "y", "z", "v"])
    assert len(texts) == 5
    assert llm.engine.largest_batch == 5


async def test_abatch_reaches_the_engine_together_and_failures_stay_alone(
    model_copy: str,
) -> None:
    chat = ChatMLX(model=model_copy, max_tokens=3)
    assert chat.llm is not None
    inputs: list[Any] = ["a", 42, "c"]  # 42 is not a valid chat input
    out = await chat.abatch(inputs, return_exceptions=True)
    assert isinstance(out[1], Exception)
    assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception)
    assert chat.llm.engine.largest_batch == 2
    await chat.llm.abatch(["x", "y", "z"])
    assert chat.llm.engine.largest_batch == 3


def test_batch_with_max_concurrency_does_not_wait_for_inputs_not_started(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=2)
    out = chat.batch(["a", "b", "c", "d", "e"], config={"max_concurrency": 2})
    assert len(out) == 5


# -- cancellation ---------------------------------------------------------------------


class BlockInCallback(AsyncCallbackHandler):
    """Suspends the consumer in a callback: outside our stream generator."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.entered.set()
        await asyncio.Event().wait()  # forever, until cancelled


async def test_a_cancelled_task_cancels_its_request_without_the_gc(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=8000)
    assert chat.llm is not None
    engine = chat.llm.engine
    cancelled_before = engine.finished["cancelled"]
    handler = BlockInCallback()
    gc.disable()  # an abandoned async generator must not be what saves us
    try:
        task = asyncio.create_task(chat.ainvoke("go", config={"callbacks": [handler]}))
        await asyncio.wait_for(handler.entered.wait(), HANG_GUARD)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(HANG_GUARD * 10):
            if engine.finished["cancelled"] > cancelled_before:
                break
            await asyncio.sleep(0.1)
    finally:
        gc.enable()
    assert engine.finished["cancelled"] == cancelled_before + 1


# -- truncation is reported -------------------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Item(BaseModel):
    name: str
    note: str


def merged(chunks: Iterator[AIMessageChunk]) -> AIMessageChunk:
    return reduce(lambda a, b: a + b, chunks)  # type: ignore[no-any-return]


@pytest.mark.parametrize("max_tokens", [1, 3, 6])
def test_a_forced_call_cut_by_max_tokens_is_an_invalid_call(
    tiny_model_path: str, max_tokens: int
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=max_tokens)
    bound = chat.bind_tools([add], tool_choice="add")
    msg = bound.invoke("add 2 and 3")
    assert msg.response_metadata["finish_reason"] == "length"
    assert msg.tool_calls == []
    assert len(msg.invalid_tool_calls) == 1
    assert "max_tokens" in str(msg.invalid_tool_calls[0]["error"])
    assert msg.content == ""
    streamed = merged(bound.stream("add 2 and 3"))  # type: ignore[arg-type]
    assert streamed.response_metadata["finish_reason"] == "length"
    assert streamed.tool_calls == []
    assert len(streamed.invalid_tool_calls) == 1
    assert streamed.content == ""


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_cut_by_max_tokens_raises(
    tiny_model_path: str, method: str
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=4)
    structured = chat.with_structured_output(Item, method=method)  # type: ignore[arg-type]
    with pytest.raises(OutputParserException, match="max_tokens"):
        structured.invoke("an item")
    raw = chat.with_structured_output(
        Item,
        method=method,  # type: ignore[arg-type]
        include_raw=True,
    ).invoke("an item")
    assert raw["parsed"] is None
    assert isinstance(raw["parsing_error"], OutputParserException)


def test_complete_structured_output_at_exactly_max_tokens_is_not_cut(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=400, temperature=0.0)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"]}  # fmt: skip
    msg = chat.bind(
        response_format={"type": "json_schema", "json_schema": {"schema": schema}}
    ).invoke("ok?")
    n = msg.usage_metadata["output_tokens"] if msg.usage_metadata else 0
    exact = chat.bind(
        response_format={"type": "json_schema", "json_schema": {"schema": schema}}
    ).invoke("ok?", max_tokens=n - 1)  # the answer without its EOS
    assert exact.content == msg.content
    assert exact.response_metadata["finish_reason"] == "stop"


# -- text with tools bound streams; logprobs join to the content ------------------


C_CODE = "int main(void) {\n  if (1) { return 0; }\n  return 1;\n}\n"


def test_code_with_braces_streams_with_tools_bound(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path)
    assert chat.llm is not None
    engine = chat.llm.engine
    ids = list(engine.tokenizer.encode("Write C.", add_special_tokens=False))
    request = Request(
        ids,
        GenerationSettings(max_tokens=200),
        [script(engine.tokenizer, C_CODE)],
        text=TextRules(bare_json_calls=True),
    )
    assembler = ChunkAssembler("tiny", tool_names=frozenset({"add"}))
    chunks = [c for e in engine.submit(request) if (c := assembler.chunk(e))]
    first_brace = next(i for i, c in enumerate(chunks) if "{" in str(c.content))
    assert len(chunks) - first_brace > 10  # streamed on, not one last chunk
    full = merged(iter(chunks))
    assert full.content == C_CODE
    assert full.tool_calls == [] and full.invalid_tool_calls == []


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_join_to_the_returned_text(tiny_model_path: str, stream: bool) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=12, stop=["e"])
    kwargs = {"logprobs": True, "top_logprobs": 3}
    msg = merged(chat.stream("hi", **kwargs)) if stream else chat.invoke("hi", **kwargs)
    entries = msg.response_metadata["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == msg.content
    for e in entries:
        assert e["logprob"] <= 0
        assert bytes(e["bytes"]) == e["token"].encode()
        assert 1 <= len(e["top_logprobs"]) <= 3
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][-1]["logprob"]


def test_logprobs_batched_and_constrained(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=30, logprobs=True)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}},
              "required": ["n"]}  # fmt: skip
    bound = chat.bind(
        response_format={"type": "json_schema", "json_schema": {"schema": schema}}
    )
    for msg in bound.batch(["one", "two", "three"]):
        entries = msg.response_metadata["logprobs"]["content"]
        assert "".join(e["token"] for e in entries) == msg.content
        assert msg.content.startswith("{")


def test_error_types_are_importable_from_the_package_without_mlx() -> None:
    code = (
        "import sys, langchain_mlx as m\n"
        "for name in m.__all__: getattr(m, name)\n"
        "assert issubclass(m.ContextWindowExceededError, ValueError)\n"
        "assert issubclass(m.ModelLoadError, OSError)\n"
        "assert not any(k == 'mlx' or k.startswith('mlx.') for k in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# -- review findings ---------------------------------------------------------------


async def test_a_chain_astream_is_not_cancelled_between_chunks(
    tiny_model_path: str,
) -> None:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableLambda

    chat = ChatMLX(model=tiny_model_path, max_tokens=24)
    direct = [c async for c in chat.astream("go")]
    chained = [c async for c in (RunnableLambda(lambda x: x) | chat).astream("go")]
    assert merged(iter(chained)).content == merged(iter(direct)).content
    assert chained[-1].response_metadata["finish_reason"] != "cancelled"
    text = "".join([p async for p in (chat | StrOutputParser()).astream("go")])
    assert text == merged(iter(direct)).content


def test_json_that_is_not_a_call_stays_in_place(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path)
    assert chat.llm is not None
    engine = chat.llm.engine
    answer = 'Example: {"name": "Alice", "age": 30} is JSON. Done.'
    ids = list(engine.tokenizer.encode("Show JSON.", add_special_tokens=False))
    request = Request(
        ids,
        GenerationSettings(max_tokens=100),
        [script(engine.tokenizer, answer)],
        text=TextRules(bare_json_calls=True),
    )
    assembler = ChunkAssembler("tiny", tool_names=frozenset({"add"}))
    chunks = [c for e in engine.submit(request) if (c := assembler.chunk(e))]
    assert merged(iter(chunks)).content == answer


@pytest.mark.parametrize(
    "answer",
    [
        'Sure.\n```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```',
        '{"name": "add", "arguments": {"a": 1, "b": 2',  # cut by max_tokens
    ],
)
def test_invoke_and_a_merged_stream_agree(tiny_model_path: str, answer: str) -> None:
    chat = ChatMLX(model=tiny_model_path)
    assert chat.llm is not None
    engine = chat.llm.engine
    ids = list(engine.tokenizer.encode("Add.", add_special_tokens=False))
    n = len(engine.tokenizer.encode(answer, add_special_tokens=False))
    request = Request(
        ids,
        GenerationSettings(max_tokens=n),
        [script(engine.tokenizer, answer)],
        text=TextRules(bare_json_calls=True),
    )
    assembler = ChunkAssembler("tiny", tool_names=frozenset({"add"}))
    streamed = merged(
        iter([c for e in engine.submit(request) if (c := assembler.chunk(e))])
    )
    from langchain_core.messages import AIMessage

    invoked = AIMessage(
        content=streamed.content, response_metadata=streamed.response_metadata
    )
    assembler.finish(invoked)
    assert streamed.content == invoked.content
    assert [c["name"] for c in streamed.tool_calls] == [
        c["name"] for c in invoked.tool_calls
    ]
    assert len(streamed.invalid_tool_calls) == len(invoked.invalid_tool_calls)
    if invoked.tool_calls:
        assert (
            streamed.content == "Sure."
        )  # the fence (and its newline) went with the call
    else:
        assert invoked.invalid_tool_calls[0]["name"] == "add"
        assert "max_tokens" in str(invoked.invalid_tool_calls[0]["error"])


def test_close_frees_the_model_held_by_every_object(model_copy: str) -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    a = ChatMLX(model=model_copy, max_tokens=2)
    b = ChatMLX(model=model_copy, max_tokens=2)  # the same engine, its own pipeline
    loaded = mx.get_active_memory()
    a.close()
    gc.collect()
    assert mx.get_active_memory() - baseline < (loaded - baseline) / 4
    with pytest.raises(EngineStoppedError):
        b.invoke("hi")


def test_spellings_of_one_folder_share_one_engine(model_copy: str) -> None:
    import os

    here = os.getcwd()
    os.chdir(Path(model_copy).parent)
    try:
        a = MLXPipeline.from_model_id(model_copy)
        b = MLXPipeline.from_model_id(Path(model_copy).name)
        c = MLXPipeline.from_model_id(model_copy + "/")
    finally:
        os.chdir(here)
    assert a.engine is b.engine is c.engine
    a.close()


# -- LangChain 1.x agents read the profile ------------------------------------------


class City(BaseModel):
    """A city."""

    name: str = Field(max_length=12)
    country: Literal["France", "Italy", "Spain"]


def test_profile_is_worked_out_from_the_model(tiny_model_path: str) -> None:
    chat = ChatMLX(model=tiny_model_path)
    assert chat.profile is not None
    assert chat.profile["max_input_tokens"] == 8192  # the config's context
    assert chat.profile["structured_output"] is True
    assert chat.profile["tool_calling"] is True
    assert chat.profile["image_inputs"] is False
    assert chat.profile["reasoning_output"] is False


def test_create_agent_uses_native_structured_output(tiny_model_path: str) -> None:
    from langchain.agents import create_agent
    from langchain_core.messages import ToolMessage

    chat = ChatMLX(model=tiny_model_path, max_tokens=64)
    agent = create_agent(chat, tools=[], response_format=City)
    state = agent.invoke({"messages": [("user", "A city?")]})
    assert isinstance(state["structured_response"], City)
    assert not any(isinstance(m, ToolMessage) for m in state["messages"])

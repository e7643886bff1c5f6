"""Grammar fast-forward and speculative decoding give the output decoding gives.

On the tiny random-weight model (SmolLM2's tokenizer): its greedy output
repeats itself, so prompt lookup drafts from the output and most drafts are
accepted; grammars force JSON syntax and tool names. Every test compares with
the same request decoded one token per step (`OFF`) and checks the counters
show the technique actually ran.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from langchain_mlx import ChatMLX
from langchain_mlx._settings import GenerationSettings
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.types import EngineOptions, Final, Request, Segment
from tests.costs import fixed_costs

OFF: dict[str, Any] = {
    "fast_forward": False,
    "prompt_lookup": False,
    "num_draft_tokens": 0,
}


@pytest.fixture(scope="module")
def chat(tiny_model_path: str) -> ChatMLX:
    return ChatMLX(model=tiny_model_path, temperature=0.0, max_tokens=48)


def counters(message: Any) -> tuple[int, int, int]:
    md = message.response_metadata
    return md["forced_tokens"], md["drafted_tokens"], md["accepted_tokens"]


def test_prompt_lookup_greedy_output_is_unchanged(chat: ChatMLX) -> None:
    prompt = "Repeat: the cat sat on the mat, the cat sat on the mat, the cat sat."
    plain = chat.invoke(prompt, **OFF)
    with fixed_costs(chat.llm.engine):  # drafts decided the same whatever the load
        fast = chat.invoke(prompt)
    assert fast.content == plain.content
    assert counters(plain) == (0, 0, 0)
    forced, drafted, accepted = counters(fast)
    assert forced == 0 and drafted > 0 and 0 < accepted <= drafted
    assert fast.usage_metadata is not None and plain.usage_metadata is not None
    assert fast.usage_metadata["output_tokens"] == plain.usage_metadata["output_tokens"]


def test_seeded_sampling_is_unchanged_by_speculation(chat: ChatMLX) -> None:
    # sample, then compare with the draft: the same draws in the same order
    kwargs: dict[str, Any] = {"temperature": 0.7, "seed": 5}
    plain = chat.invoke("Write something.", **kwargs, **OFF)
    fast = chat.invoke("Write something.", **kwargs)
    assert fast.content == plain.content


def test_streamed_speculative_output_equals_invoke(chat: ChatMLX) -> None:
    prompt = "Say it again and again."
    chunks = list(chat.stream(prompt))
    assert "".join(str(c.content) for c in chunks) == chat.invoke(prompt).content
    assert len([c for c in chunks if c.content]) > 1  # still streamed in pieces


class Person(BaseModel):
    name: str
    age: int
    city: str


def test_structured_output_fast_forward_is_unchanged(chat: ChatMLX) -> None:
    plain = ChatMLX(llm=chat.llm, temperature=0.0, max_tokens=48, **OFF)
    slow = plain.with_structured_output(Person, include_raw=True).invoke("Someone.")
    fast = chat.with_structured_output(Person, include_raw=True).invoke("Someone.")
    assert fast["raw"].content == slow["raw"].content
    forced, _, _ = counters(fast["raw"])
    assert forced >= 3  # at least `{"name": "`
    assert counters(slow["raw"])[0] == 0
    # forced passes computed logits at their last position only
    assert chat.llm.engine._scheduler._head is not None  # type: ignore[union-attr]


def test_output_head_splits_off_only_when_logits_are_exactly_its_output(
    tiny_model_path: str,
) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from langchain_mlx.engine.model_facts import output_head

    model, _ = load(tiny_model_path)
    head = output_head(model)
    assert head is not None  # a llama: logits = lm_head(model.model(x))
    x = mx.array([[5, 17, 230, 4, 99]])
    full = model(x, cache=make_prompt_cache(model))[:, 3:]
    hidden = model.model(x, cache=make_prompt_cache(model))
    assert mx.allclose(head(hidden[:, 3:]), full, atol=1e-5).item()

    class SoftCapped:  # a family whose last step does more (as Gemma 2's)
        def __init__(self, inner: Any) -> None:
            self.model, self.args, self._inner = inner.model, inner.args, inner
            self.lm_head = getattr(inner, "lm_head", None)

        def __call__(self, x: Any, cache: Any = None) -> Any:
            return mx.tanh(self._inner(x, cache=cache) / 30.0) * 30.0

    assert output_head(SoftCapped(model)) is None
    assert output_head(object()) is None


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


def test_forced_tool_call_fast_forward_is_unchanged(chat: ChatMLX) -> None:
    plain = ChatMLX(llm=chat.llm, temperature=0.0, max_tokens=48, **OFF)
    slow = plain.bind_tools([get_weather], tool_choice="get_weather").invoke("Hi")
    fast = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Hi")
    assert fast.tool_calls == slow.tool_calls or (
        [c["args"] for c in fast.tool_calls] == [c["args"] for c in slow.tool_calls]
    )
    assert fast.content == slow.content
    # the name is forced once `{"name": "` is: one tool
    assert counters(fast)[0] >= 5


def test_draft_model_greedy_output_is_unchanged(tiny_model_path: str) -> None:
    # The tiny model drafting for itself. Whether its drafts pay is decided
    # from measured step times (noise on a loaded machine), so only what holds
    # either way is asserted here; the decision itself is driven with recorded
    # costs in test_a_draft_model_that_does_not_pay_is_never_called and
    # test_draft_model_drafts_where_they_pay_and_output_is_unchanged.
    chat = ChatMLX(
        model=tiny_model_path,
        temperature=0.0,
        max_tokens=32,
        prompt_lookup=False,
        draft_model=tiny_model_path,
    )
    fast = chat.invoke("Tell me a story.")
    plain = chat.invoke("Tell me a story.", num_draft_tokens=0)
    assert fast.content == plain.content
    forced, drafted, accepted = counters(fast)
    assert forced == 0 and accepted <= drafted
    scheduler = chat.llm.engine._scheduler  # type: ignore[union-attr]
    assert scheduler._draft is not None and scheduler._draft.size == 1.0


def test_another_draft_model_for_a_running_engine_is_refused(
    tiny_model_path: str, other_tiny_model_path: str
) -> None:
    ChatMLX(model=tiny_model_path, draft_model=tiny_model_path)
    with pytest.raises(ValueError, match="already drafts with"):
        ChatMLX(model=tiny_model_path, draft_model=other_tiny_model_path)


@pytest.fixture(scope="module")
def engine(tiny_model_path: str) -> Iterator[Engine]:
    from mlx_lm import load

    model, tokenizer = load(tiny_model_path)
    with Engine(model, tokenizer, name="tiny-solo", options=EngineOptions()) as e:
        yield e


def run(engine: Engine, prompt: list[int], **overrides: Any) -> tuple[str, Final]:
    settings = GenerationSettings(**{"max_tokens": 40, **overrides})
    return collect(engine, Request(prompt, settings))


def collect(engine: Engine, request: Request) -> tuple[str, Final]:
    """A request's text and its final event."""
    text, final = "", None
    for event in engine.submit(request):
        if isinstance(event, Segment):
            text += event.text
        else:
            final = event
    assert final is not None
    return text, final


def pausing(at: int, reached: threading.Event, go: threading.Event) -> Callable:  # type: ignore[type-arg]
    """A logits processor that holds the worker at its `at`-th call."""
    calls = [0]

    def processor(tokens: Any, logits: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            reached.set()
            go.wait(30)
        return logits

    return processor


def test_a_lone_request_joins_the_batch_when_another_arrives(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    a = tokenizer.encode("First prompt, repeated: one two one two one two")
    b = tokenizer.encode("Second, different prompt")
    alone_a, _ = run(engine, a)
    alone_b, _ = run(engine, b)
    reached, go = threading.Event(), threading.Event()
    hold = pausing(5, reached, go)
    settings = GenerationSettings(max_tokens=40)
    first = engine.submit(Request(a, settings, logits_processors=[hold]))
    assert reached.wait(30)  # A decodes alone (speculating) and is held mid-way
    second = engine.submit(Request(b, settings))
    go.set()  # B is queued: the worker moves A into the batch, then admits B
    texts = []
    finals = []
    for handle in (first, second):
        text = ""
        for event in handle:
            if isinstance(event, Segment):
                text += event.text
            else:
                finals.append(event)
        texts.append(text)
    assert texts == [alone_a, alone_b]
    assert engine.largest_batch >= 2
    assert finals[0].generation_tokens == 40


def test_finish_reason_and_budget_hold_with_drafts(engine: Engine) -> None:
    prompt = engine.tokenizer.encode("one two one two one two one two")
    for n in (1, 2, 3, 7):
        text, final = run(engine, prompt, max_tokens=n)
        plain, _ = run(engine, prompt, max_tokens=n, **OFF)
        assert final.generation_tokens == n
        assert text == plain
        assert final.finish_reason == "length"


# -- auto-mode tool calls: free text, but a started call is a valid call -------


def get_time(timezone: str) -> str:
    """The time in a timezone."""
    return "noon"


def auto_constraint(tokenizer: Any) -> Any:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from langchain_mlx._constraints import (
        ConstraintCompiler,
        ToolCallFormat,
        auto_call_grammar,
    )

    tools = [convert_to_openai_tool(get_weather), convert_to_openai_tool(get_time)]
    grammar = auto_call_grammar(tools, ToolCallFormat())
    compiler = ConstraintCompiler.for_tokenizer(tokenizer)
    return compiler.processor(grammar, "auto calls", lazy=True)


def test_auto_grammar_accepts_text_and_valid_calls_only(engine: Engine) -> None:
    from llguidance import LLMatcher

    tokenizer = engine.tokenizer
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from langchain_mlx._constraints import (
        ConstraintCompiler,
        ToolCallFormat,
        auto_call_grammar,
    )

    tools = [convert_to_openai_tool(get_weather), convert_to_openai_tool(get_time)]
    text = auto_call_grammar(tools, ToolCallFormat())
    compiler = ConstraintCompiler.for_tokenizer(tokenizer)

    def accepts(output: str) -> bool:
        matcher = LLMatcher(compiler.lltokenizer, text)
        ids = tokenizer.encode(output, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()

    assert accepts('Just text, even {braces} and JSON {"a": 1}.')
    assert accepts('Sure. {"name": "get_time", "arguments": {"timezone": "UTC"}}')
    assert accepts('{"name": "get_weather", "arguments": {"city": "Paris"}} then text')
    # a function no tool has keeps its name (parsed as an invalid call, not run)
    assert accepts('{"name": "get_stock", "arguments": {}}')

    def rejects(output: str) -> bool:  # stops before the end, not just incomplete
        matcher = LLMatcher(compiler.lltokenizer, text)
        ids = tokenizer.encode(output, add_special_tokens=False)
        return matcher.try_consume_tokens(ids) < len(ids)

    assert not rejects('{\n  "name": "get_stock",\n  "arguments": {}\n}')  # spaced
    assert rejects('```json\n{ "name" : "get_ti", ')  # the start of a bound name
    assert rejects('{"name": "get_stock", "arguments": [1]}')  # arguments: an object
    assert not rejects('{\n  "name": "get_time", "arguments": {"timezone": "UTC"}}')
    assert not accepts('{"name": "get_time", "arguments": {"tz": "UTC"}}')  # key
    assert not accepts('{"name": "get_time", "arguments": {"timezone": 3}}')  # type
    assert not accepts('{"name": "get_time", "arguments": {"timezone": "UTC"')  # cut


def test_auto_calls_are_valid_whatever_the_model_writes(engine: Engine) -> None:
    """A random-weight model pushed into starting a call always finishes it validly.

    Pushed through a bound tool's name, its arguments follow that tool's
    schema; left to pick the name, random text makes one up, and the call is
    still complete JSON, parsed as an "unknown tool" call (never run).
    """
    import json

    import mlx.core as mx

    from langchain_mlx._output import parse_tool_calls

    tokenizer = engine.tokenizer
    (quote,) = tokenizer.encode('"', add_special_tokens=False)
    prompt = tokenizer.encode("Use a tool.")
    fields = {"get_weather": {"city", "unit"}, "get_time": {"timezone"}}

    for seed, opening in enumerate(['{"name": "get_time"', '{"name": "'] * 2):
        forced = tokenizer.encode(opening, add_special_tokens=False)

        def start_a_call(tokens: Any, logits: Any, forced: list[int] = forced) -> Any:
            at = int(tokens.shape[-1]) - len(prompt)
            ids = mx.arange(logits.shape[-1])
            if at < len(forced):  # the model "chooses" to start a call
                return logits + 100.0 * (ids == forced[at])
            if at > len(forced) + 6:  # and to end its strings (random text does not)
                return logits + 30.0 * (ids == quote)
            return logits

        constraint = auto_constraint(tokenizer)
        settings = GenerationSettings(max_tokens=120, temperature=1.0, seed=seed)
        request = Request(
            prompt, settings, logits_processors=[start_a_call], constraint=constraint
        )
        text = "".join(e.text for e in engine.submit(request) if isinstance(e, Segment))
        call, end = json.JSONDecoder().raw_decode(text)
        assert end <= len(text)
        assert isinstance(call["arguments"], dict), text
        parsed = parse_tool_calls(text[:end], tool_names=set(fields))
        if opening.endswith('get_time"'):
            assert call["name"] == "get_time", text
            assert set(call["arguments"]) <= fields["get_time"], text
            assert all(isinstance(v, str) for v in call["arguments"].values())
            assert [c["name"] for c in parsed.tool_calls] == ["get_time"]
        elif call["name"] in fields:
            assert set(call["arguments"]) <= fields[call["name"]], text
            assert [c["name"] for c in parsed.tool_calls] == [call["name"]]
        else:
            assert not any(n.startswith(call["name"]) for n in fields), text
            assert parsed.tool_calls == []
            (invalid,) = parsed.invalid_tool_calls
            assert str(invalid["error"]).startswith("unknown tool"), text


def test_bind_tools_auto_is_constrained_unless_not_strict(chat: ChatMLX) -> None:
    from langchain_mlx._tools import format_tools, plan_call

    tools = format_tools([get_weather])
    assert plan_call(chat.tokenizer, tools, None, None, None).grammar_lazy
    assert plan_call(chat.tokenizer, tools, None, None, None, False).grammar is None
    bound = chat.bind_tools([get_weather], strict=False)
    assert bound.invoke("Hi").response_metadata["forced_tokens"] == 0  # type: ignore[union-attr]


def test_batched_structured_output_ends_at_its_grammar(chat: ChatMLX) -> None:
    """A batch feeds its processors the EOS sampled after a complete grammar."""
    from typing import Literal

    class Choice(BaseModel):
        answer: Literal["yes", "no"]

    plain = ChatMLX(llm=chat.llm, temperature=1.0, max_tokens=24, **OFF)
    results = plain.with_structured_output(Choice).batch(["A?", "B?", "C?"])
    assert all(isinstance(r, Choice) for r in results)


def test_a_grammar_that_ends_ends_the_answer_without_another_pass(
    engine: Engine,
) -> None:
    """After the closing brace only EOS is allowed: it is forced, not computed."""
    import json

    from langchain_mlx._constraints import ConstraintCompiler, json_schema_grammar

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
    }
    compiler = ConstraintCompiler.for_tokenizer(engine.tokenizer)
    prompt = engine.tokenizer.encode("Answer in JSON.")
    sampled = [0]

    def counting(tokens: Any, logits: Any) -> Any:  # runs once per sampled token
        sampled[0] += 1
        return logits

    def ask(**overrides: Any) -> tuple[str, Final]:
        constraint = compiler.processor(json_schema_grammar(schema), "the schema")
        settings = GenerationSettings(max_tokens=20, **overrides)
        request = Request(
            prompt, settings, constraint=constraint, logits_processors=[counting]
        )
        return collect(engine, request)

    text, final = ask()
    assert json.loads(text) in ({"ok": True}, {"ok": False})
    assert final.finish_reason == "stop"
    assert final.forced_tokens >= 4  # `{"`, `ok`, `":`, ... and the EOS
    # every token that was not forced was sampled, and nothing after the EOS
    assert sampled[0] == final.generation_tokens - final.forced_tokens
    sampled[0] = 0
    plain, plain_final = ask(**OFF)
    assert plain == text and plain_final.finish_reason == "stop"
    assert plain_final.generation_tokens == final.generation_tokens


# -- a plain step launched on the previous step's lazy token --------------------


def decode_alone(
    model: Any,
    prompt: list[int],
    *,
    stop: int | None,
    lookup: bool,
    draft_model: Any = None,
    costs: Any = None,
) -> tuple[list[int], Any, Any]:
    """Drive a `Solo` to its end: its tokens, its last record, the Solo."""
    from mlx_lm.generate import StopSequences
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    from langchain_mlx.engine.drafts import StepCosts
    from langchain_mlx.engine.speculative import Solo

    solo = Solo(
        model, uid=-1, prompt=prompt, cache=make_prompt_cache(model), cached=0,
        max_tokens=24, sampler=greedy_sampler, processors=[],
        stop_sequences=StopSequences([] if stop is None else [(stop,)]),
        constraint=None, checkpoints=[], fast_forward=True, lookup=lookup,
        num_draft_tokens=4, draft_model=draft_model, logprobs=False,
        # decisions that no clock changes
        costs=StepCosts(measured=False) if costs is None else costs,
    )  # fmt: skip
    tokens: list[int] = []
    while True:
        _, records = solo.next(64)
        for r in records:
            tokens.append(r.token)
            if r.finish_reason is not None:
                return tokens, r, solo


def test_chained_steps_decode_as_plain_decoding(tiny_model_path: str) -> None:
    """A step launched before the previous token is read gives the same tokens,
    and one whose token ends the answer is taken back out of the cache."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(tiny_model_path)
    prompt = tokenizer.encode("Plain words, nothing to copy from here")
    steps = generate_step(mx.array(prompt), model, max_tokens=24)
    reference = [int(t) for t, _ in steps]
    tokens, last, solo = decode_alone(model, prompt, stop=None, lookup=True)
    assert tokens == reference and last.finish_reason == "length"
    assert solo.chained_steps > 0  # (no draft could be worth it: launched early)
    # a stop token the model emits after a few chained steps ends the answer there
    at = next(i for i, t in enumerate(reference) if i >= 6 and t not in reference[:i])
    tokens, last, solo = decode_alone(model, prompt, stop=reference[at], lookup=False)
    assert tokens == reference[: at + 1] and last.finish_reason == "stop"
    assert solo.chained_steps >= at - 2
    # the cache handed on holds exactly the tokens said (the stop token unfed)
    assert last.prompt_cache[0].offset == len(last.all_tokens) == len(prompt) + at


# -- a draft model is called only where its drafts pay --------------------------


class Spy:
    """A draft model that counts the tokens it reads."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.layers = inner, inner.layers
        self.read = 0

    def __call__(self, x: Any, cache: Any = None) -> Any:
        self.read += x.shape[1]
        return self._inner(x, cache=cache)


def recorded(seconds: dict[tuple[str, int], float]) -> Any:
    """Measured step costs, then no more measuring (the test's clock decides nothing)."""
    from langchain_mlx.engine.drafts import StepCosts

    costs = StepCosts()
    for (source, n), s in seconds.items():
        costs.record(source, n, s)
    costs.record = lambda source, n, seconds: None  # type: ignore[method-assign]
    return costs


# a CPU: a pass costs a third more per token it feeds (a prefill chunk of 16
# measured it); a GPU: 16 tokens cost about what one does
CPU = {("", 1): 1.2, ("", 16): 1.2 * (1 + 15 / 3)}
GPU = {("", 1): 0.010, ("", 16): 0.012}
SIZE = 0.32  # 0.5B drafting for 1.5B: its bytes over the target's


def test_draft_model_decides_from_costs_before_it_runs(tiny_model_path: str) -> None:
    from mlx_lm import load

    from langchain_mlx.engine.drafts import PAYBACK, DraftModel

    model, _ = load(tiny_model_path)
    history = list(range(100, 140))
    p = 2 / 3  # the prior acceptance
    cpu = DraftModel(Spy(model), recorded(CPU), size=SIZE)
    assert cpu.length(history, 0, 6, p, 100) == 0
    gpu = DraftModel(Spy(model), recorded(GPU), size=SIZE)
    assert gpu.length(history, 0, 6, p, 100) > 0  # reading 40 tokens first pays
    assert gpu.length(history, 0, 6, 0.05, 100) == 0  # drafts that miss do not
    # a long conversation it has not read: its catch-up must pay within the
    # tokens left (at most PAYBACK)
    long = list(range(100, 5100))
    assert gpu.length(long, 0, 6, p, 8) == 0
    assert gpu.length(long, 0, 6, p, 10**6) == gpu.length(long, 0, 6, p, PAYBACK)
    # measured: a draft model that takes most of a target step per token
    slow = DraftModel(Spy(model), recorded({**GPU, ("drafter", 1): 0.008}), size=SIZE)
    assert slow.length(history[:2], 0, 6, 0.9, 100) == 0


def test_a_draft_model_that_does_not_pay_is_never_called(tiny_model_path: str) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from langchain_mlx.engine.drafts import DraftModel

    model, tokenizer = load(tiny_model_path)
    prompt = tokenizer.encode("Plain words, nothing to copy from here")
    steps = generate_step(mx.array(prompt), model, max_tokens=24)
    reference = [int(t) for t, _ in steps]
    spy = Spy(model)
    costs = recorded(CPU)
    drafter = DraftModel(spy, costs, size=SIZE)
    tokens, _, solo = decode_alone(
        model, prompt, stop=None, lookup=False, draft_model=drafter, costs=costs
    )
    assert tokens == reference
    assert spy.read == 0  # no draft, and no catch-up on the prompt either
    assert solo.stats.drafted == 0
    assert solo.chained_steps > 0  # plain steps launched early, as with no draft


def test_draft_model_drafts_where_they_pay_and_output_is_unchanged(
    tiny_model_path: str,
) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from langchain_mlx.engine.drafts import DraftModel, StepCosts

    model, tokenizer = load(tiny_model_path)
    prompt = tokenizer.encode("Tell me a story.")
    steps = generate_step(mx.array(prompt), model, max_tokens=24)
    reference = [int(t) for t, _ in steps]
    costs = StepCosts(measured=False, extra=0.0)  # a GPU's, fixed
    spy = Spy(model)  # drafting for itself: every draft is accepted
    drafter = DraftModel(spy, costs, size=0.05)
    tokens, _, solo = decode_alone(
        model, prompt, stop=None, lookup=False, draft_model=drafter, costs=costs
    )
    assert tokens == reference
    assert spy.read > 0 and solo.stats.accepted > 0

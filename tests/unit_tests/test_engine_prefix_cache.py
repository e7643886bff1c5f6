"""Prefix KV-cache reuse across requests, on the tiny random-weight model.

What a user notices: a prompt that starts like an earlier one reports the shared
tokens as `cached_tokens` (`cache_read` in token usage), its output is exactly
what a cold run gives, the cache stays within its limits, and a saved prefix
works in a fresh engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_mlx import ChatMLX
from langchain_mlx._settings import GenerationSettings
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.prefix_cache import PrefixCacheFileError
from langchain_mlx.engine.types import Final, Request, Segment

SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": 12}


@pytest.fixture(scope="module")
def loaded(tiny_model_path: str) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(tiny_model_path)


@pytest.fixture
def engine(loaded: tuple[Any, Any]) -> Iterator[Engine]:
    eng = Engine(*loaded, name="tiny-prefix")
    yield eng
    eng.close()


@pytest.fixture
def cold(loaded: tuple[Any, Any]) -> Iterator[Engine]:
    eng = Engine(*loaded, name="tiny-cold")
    eng.configure(prefix_cache_entries=0)
    yield eng
    eng.close()


def run(engine: Engine, ids: list[int], **settings: Any) -> tuple[str, Final]:
    events = list(engine.submit(Request(ids, GenerationSettings(**settings))))
    final = events[-1]
    assert isinstance(final, Final)
    return "".join(e.text for e in events if isinstance(e, Segment)), final


def ids_of(loaded: tuple[Any, Any], text: str) -> list[int]:
    return list(loaded[1].encode(text, add_special_tokens=False))


def test_next_turn_reuses_the_conversation_and_matches_a_cold_run(
    engine: Engine, cold: Engine, loaded: tuple[Any, Any]
) -> None:
    turn1 = ids_of(loaded, "System: you are a helpful agent with tools. User: hi")
    text1, final1 = run(engine, turn1, **SAMPLED)
    assert final1.cached_tokens == 0
    turn2 = [*turn1, *ids_of(loaded, text1 + " User: and then?")]
    for settings in (SAMPLED, {"max_tokens": 12}):  # seeded and greedy
        warm_text, warm = run(engine, turn2, **settings)
        cold_text, cold_final = run(cold, turn2, **settings)
        assert warm.cached_tokens >= len(turn1)
        assert cold_final.cached_tokens == 0
        assert warm_text == cold_text
        assert warm.prompt_tokens == cold_final.prompt_tokens == len(turn2)
    assert engine.prefix_cache.hits >= 2
    assert cold.prefix_cache.entries == 0


def test_a_diverging_prompt_reuses_the_common_prefix(
    engine: Engine, cold: Engine, loaded: tuple[Any, Any]
) -> None:
    shared = ids_of(loaded, "A long shared preamble that both prompts start with.")
    run(engine, [*shared, *ids_of(loaded, " First question?")], **SAMPLED)
    second = [*shared, *ids_of(loaded, " Another one entirely!")]
    text, final = run(engine, second, **SAMPLED)
    assert final.cached_tokens == len(shared)
    assert text == run(cold, second, **SAMPLED)[0]


def test_untrimmable_caches_reuse_only_exact_prefixes(
    engine: Engine,
    cold: Engine,
    loaded: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Recurrent state cannot be cut back to a shorter prefix: emulate it.
    from mlx_lm.models import cache

    monkeypatch.setattr(cache.KVCache, "is_trimmable", lambda self: False)
    shared = ids_of(loaded, "Shared start of two prompts.")
    first = [*shared, *ids_of(loaded, " One.")]
    seen: list[int] = []

    def record(tokens: Any, logits: Any) -> Any:  # the protocol: tokens so far
        seen[:] = tokens.tolist()
        return logits

    settings = GenerationSettings(**SAMPLED)
    list(engine.submit(Request(first, settings, logits_processors=[record])))
    assert seen[: len(first)] == first
    # called before each sampled token (as generate_step): the last sees 11 new
    assert len(seen) == len(first) + SAMPLED["max_tokens"] - 1
    diverging = [*shared, *ids_of(loaded, " Two!")]
    text, final = run(engine, diverging, **SAMPLED)
    assert final.cached_tokens == 0  # would need trimming the stored cache
    assert text == run(cold, diverging, **SAMPLED)[0]
    # The first request's cache holds its prompt and every token it generated.
    extending = [*seen, *ids_of(loaded, " More.")]
    text, final = run(engine, extending, **SAMPLED)
    assert final.cached_tokens == len(seen)
    assert text == run(cold, extending, **SAMPLED)[0]


def test_limits_bound_entries_and_bytes(
    engine: Engine, loaded: tuple[Any, Any]
) -> None:
    engine.configure(prefix_cache_entries=2)
    for i in range(4):
        run(engine, ids_of(loaded, f"Distinct prompt number {i} here"), max_tokens=4)
    assert engine.prefix_cache.entries == 2
    one_entry = engine.prefix_cache.nbytes // 2
    engine.configure(prefix_cache_bytes=one_entry + 1)
    run(engine, ids_of(loaded, "Yet another prompt, number 5"), max_tokens=4)
    assert engine.prefix_cache.entries == 1
    assert engine.prefix_cache.nbytes <= one_entry + 1
    engine.configure(prefix_cache_entries=0)
    prompt = ids_of(loaded, "Yet another prompt, number 5")
    assert run(engine, prompt, max_tokens=4)[1].cached_tokens == 0
    assert engine.prefix_cache.entries == 0
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        engine.configure(max_batch_size=0)
    with pytest.raises(ValueError, match="unknown engine option"):
        engine.configure(prefix_cache_size=3)


def test_saved_prefix_loads_into_a_fresh_engine(
    engine: Engine, cold: Engine, loaded: tuple[Any, Any], tmp_path: Path
) -> None:
    system = ids_of(loaded, "You are an agent. Tools: search(query), add(a, b). " * 3)
    path = tmp_path / "system"
    assert engine.save_prefix(path, system) == len(system)
    assert (tmp_path / "system.safetensors").is_file()

    fresh = Engine(*loaded, name="tiny-fresh")
    try:
        assert fresh.load_prefix(path) == len(system)
        prompt = [*system, *ids_of(loaded, " User: what is 2+2?")]
        text, final = run(fresh, prompt, **SAMPLED)
        assert final.cached_tokens == len(system)
        assert text == run(cold, prompt, **SAMPLED)[0]
    finally:
        fresh.close()


def test_load_rejects_other_models_and_missing_files(
    engine: Engine,
    loaded: tuple[Any, Any],
    other_tiny_model_path: str,
    tmp_path: Path,
) -> None:
    from mlx_lm import load

    engine.save_prefix(tmp_path / "p.safetensors", ids_of(loaded, "Some prefix"))
    other = Engine(*load(other_tiny_model_path), name="other")
    try:
        with pytest.raises(
            PrefixCacheFileError, match="saved from model 'tiny-prefix'"
        ):
            other.load_prefix(tmp_path / "p.safetensors")
        with pytest.raises(FileNotFoundError, match="no saved prompt cache"):
            other.load_prefix(tmp_path / "missing")
        assert other.alive  # errors go to the caller; the worker lives on
    finally:
        other.close()


@pytest.fixture
def chat(tiny_model_path: str) -> Iterator[ChatMLX]:
    chat = ChatMLX(model=tiny_model_path, max_tokens=8, temperature=1.0, seed=3)
    yield chat
    chat.llm.engine.configure(prefix_cache_entries=10)  # the engine is shared


def test_chat_second_turn_reports_cache_read_and_same_answer(chat: ChatMLX) -> None:
    engine = chat.llm.engine
    engine.clear_prefix_cache()
    first = [HumanMessage("What is the capital of France? Answer briefly.")]
    reply = chat.invoke(first)
    assert "input_token_details" not in (reply.usage_metadata or {})
    second = [*first, reply, HumanMessage("And of Spain?")]
    warm = chat.invoke(second)
    usage = warm.usage_metadata
    assert usage is not None
    cache_read = usage["input_token_details"]["cache_read"]
    assert cache_read >= chat.get_num_tokens_from_messages(first)
    assert usage["input_tokens"] == chat.get_num_tokens_from_messages(second)
    engine.configure(prefix_cache_entries=0)
    cold = chat.invoke(second)
    assert "input_token_details" not in (cold.usage_metadata or {})
    assert cold.content == warm.content


def test_chat_save_and_load_prompt_cache(chat: ChatMLX, tmp_path: Path) -> None:
    system = SystemMessage("You are a careful assistant. " * 4)
    n = chat.save_prompt_cache(tmp_path / "sys", [system])
    chat.llm.engine.clear_prefix_cache()
    assert chat.load_prompt_cache(tmp_path / "sys") == n
    msg = chat.invoke([system, HumanMessage("Hello")])
    assert msg.usage_metadata["input_token_details"]["cache_read"] == n
    # The saved part is what every continuation shares, up to the user turn.
    assert n < chat.get_num_tokens_from_messages([system, HumanMessage("Hello")])


def test_shared_prefixes_groups_prompts_that_start_alike() -> None:
    from langchain_mlx.engine.prefix_cache import common_length, shared_prefixes

    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [7, 7, 7], [1, 2, 3, 4, 6]]
    assert shared_prefixes(prompts, 2) == [(3, [0, 3, 1])]
    # A prompt's last token is never shared: its own request must prefill it.
    assert shared_prefixes([[1, 2, 3], [1, 2, 3]], 2) == [(2, [0, 1])]
    assert shared_prefixes([[1, 2], [3, 4], [5]], 1) == []
    assert common_length([1, 2, 3], [1, 2, 4], 5) == 2
    assert common_length([1, 2, 3], [1, 2, 3], 1) == 1


def test_requests_sent_together_prefill_their_common_start_once(
    engine: Engine, cold: Engine, loaded: tuple[Any, Any]
) -> None:
    shared = ids_of(loaded, "You are an agent with tools: search, add, read. " * 4)
    prompts = [[*shared, *ids_of(loaded, f" Branch {i} asks {i}?")] for i in range(4)]
    alone = [run(cold, p, **SAMPLED)[0] for p in prompts]
    # submitted together (no timing involved): they enter the batch in one step
    handles = engine.submit_many(
        [Request(p, GenerationSettings(**SAMPLED)) for p in prompts]
    )
    together = []
    for handle in handles:
        events = list(handle)
        final = events[-1]
        assert isinstance(final, Final)
        text = "".join(e.text for e in events if isinstance(e, Segment))
        together.append((text, final))
    assert [text for text, _ in together] == alone
    # Each branch read the shared start from the cache: it was prefilled once.
    assert all(final.cached_tokens >= len(shared) for _, final in together)


@pytest.mark.parametrize("alone", [True, False], ids=["solo", "batch-generator"])
def test_untrimmable_caches_restart_from_the_last_message_boundary(
    tiny_model_path: str, monkeypatch: pytest.MonkeyPatch, alone: bool
) -> None:
    """A retried last step reuses the history, though the cache cannot be cut.

    Both prefill paths keep the checkpoint: a lone request decoded with
    speculation on (`Solo`), and mlx-lm's batch generator (speculation off).
    """
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from mlx_lm import load
    from mlx_lm.models import cache

    from langchain_mlx import ChatMLX, MLXPipeline

    monkeypatch.setattr(cache.KVCache, "is_trimmable", lambda self: False)
    model, tokenizer = load(tiny_model_path)  # its own engine
    chat = ChatMLX(
        llm=MLXPipeline(model=model, tokenizer=tokenizer, model_id="tiny-untrimmable"),
        max_tokens=4,
        temperature=0.0,
        prompt_lookup=alone,
        num_draft_tokens=6 if alone else 0,
    )
    assert chat.llm.engine.wants_checkpoints  # type: ignore[union-attr]
    history = [
        SystemMessage("You are terse. " * 10),
        HumanMessage("First question, with some words in it."),
        AIMessage("First answer."),
    ]
    shared = chat.get_num_tokens_from_messages(history)
    chat.invoke([*history, HumanMessage("Second question?")])
    retried = chat.invoke([*history, HumanMessage("Second question, reworded?")])
    usage = retried.usage_metadata
    assert usage is not None
    cached = usage.get("input_token_details", {}).get("cache_read", 0)
    assert shared - 8 <= cached <= shared + 8  # the history (template markers aside)
    chat.llm.engine.clear_prefix_cache()  # type: ignore[union-attr]
    cold = chat.invoke([*history, HumanMessage("Second question, reworded?")])
    assert retried.content == cold.content

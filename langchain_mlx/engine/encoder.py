"""A BERT sentence encoder on MLX, with its own thread: what `MLXEmbeddings` runs.

Flow::

    TextEncoder.for_config(config, dtype)       one encoder per folder and dtype
    TextEncoder.embed / aembed(texts, ...)      caller: tokenize, sort by length,
        _plan -> batches of similar length      cut into batches
        worker thread: _forward(batch)          BertEncoder -> _pool (normalize)
        _assemble                               vectors in the caller's order

`BertEncoder` is BERT written as a function of its weights (embeddings, N
post-norm layers; `mx.fast` attention and layer norm) under the Hugging Face
names, so a checkpoint loads as it is. Pooling (mean, cls, max, mean_sqrt_len)
and normalization follow the sentence-transformers config that
`models.embedding.read_embedding_folder` reads into `EmbeddingModelConfig`.

Why not mlx-embeddings: it imports mlx-vlm (which pulls opencv, datasets,
mlx-audio, fastapi) and transformers, and it always mean-pools and normalizes
whatever the model's config says. The encoder here is ~100 lines of MLX.

Why a worker thread: as in `worker.py`, all MLX work of one model runs on one
thread, so callers from any thread or event loop meet in one queue (one batch
at a time, callers interleaved batch by batch) and MLX's per-thread streams
never see a second thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from langchain_mlx.engine.types import EngineStoppedError, ModelLoadError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
Pooling = Literal["mean", "cls", "max", "mean_sqrt_len"]
_DROPPED = ("embeddings.position_ids", "pooler.", "cls.")  # not in the encoder


# ------------------------------------------------------------------ the model


@dataclass(frozen=True)
class EmbeddingModelConfig:
    """What is needed to build, feed and pool a BERT encoder (from its folder)."""

    folder: Path
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    pooling: Pooling
    normalize: bool
    max_seq_length: int
    tokenizer_file: Path
    lowercase: bool
    weights: Path

    @property
    def dimensions(self) -> int:
        """The length of one embedding."""
        return self.hidden_size


def bert_weight_shapes(config: EmbeddingModelConfig) -> dict[str, tuple[int, ...]]:
    """The encoder's tensors (Hugging Face names, no ``bert.`` prefix) and shapes."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, hidden),
        "embeddings.position_embeddings.weight": (
            config.max_position_embeddings,
            hidden,
        ),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, hidden),
    }
    norms = ["embeddings.LayerNorm"]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        linear = {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (inner, hidden),
            "output.dense": (hidden, inner),
        }
        for name, shape in linear.items():
            shapes[f"{p}{name}.weight"] = shape
            shapes[f"{p}{name}.bias"] = shape[:1]
        norms += [f"{p}attention.output.LayerNorm", f"{p}output.LayerNorm"]
    for norm in norms:
        shapes[f"{norm}.weight"] = (hidden,)
        shapes[f"{norm}.bias"] = (hidden,)
    return shapes


def _read_weights(file: Path) -> dict[str, Any]:
    """The checkpoint's encoder weights under the names of `bert_weight_shapes`."""
    import mlx.core as mx

    try:
        raw = mx.load(str(file))
    except Exception as e:
        msg = (
            f"cannot read the weights {str(file)!r} ({e}); the file is corrupt "
            "or truncated: copy or download it again"
        )
        raise ModelLoadError(msg) from e
    if not isinstance(raw, dict):
        msg = f"{str(file)!r} is not a safetensors weight file"
        raise ModelLoadError(msg)
    weights: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.removeprefix("bert.").removeprefix("model.")
        if name.startswith(_DROPPED):
            continue
        if name.endswith(".gamma"):  # checkpoints converted from TensorFlow
            name = name.removesuffix(".gamma") + ".weight"
        elif name.endswith(".beta"):
            name = name.removesuffix(".beta") + ".bias"
        weights[name] = value
    return weights


class BertEncoder:
    """A BERT encoder (post-norm layers) as a function of its weights.

    The weights keep their Hugging Face names, so a checkpoint loads as it is;
    :meth:`load` checks every name and shape against ``config.json`` first.
    """

    def __init__(self, config: EmbeddingModelConfig, weights: dict[str, Any]) -> None:
        import mlx.nn as nn

        self.config = config
        self.weights = weights
        self._act: Callable[[Any], Any] = {"gelu": nn.gelu, "relu": nn.relu}.get(
            config.hidden_act,
            nn.gelu_approx,  # the tanh variants of GELU
        )

    @classmethod
    def load(cls, config: EmbeddingModelConfig, dtype: DType) -> BertEncoder:
        """Read, check and cast the weights of ``config.weights``."""
        import mlx.core as mx

        weights = _read_weights(config.weights)
        expected = bert_weight_shapes(config)
        problems = [f"{name} is missing" for name in expected if name not in weights]
        problems += [
            f"{name} is not a BERT weight" for name in weights.keys() - expected
        ]
        problems += [
            f"{name} has shape {tuple(weights[name].shape)}, config.json says {shape}"
            for name, shape in expected.items()
            if name in weights and tuple(weights[name].shape) != shape
        ]
        if problems:
            shown = "; ".join(sorted(problems)[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            msg = (
                f"the weights in {str(config.weights)!r} do not match its "
                f"config.json: {shown}{more}. Copy config.json and model.safetensors "
                "again from the same original BERT model"
            )
            raise ModelLoadError(msg)
        cast = {
            name: value.astype(getattr(mx, dtype)) for name, value in weights.items()
        }
        mx.eval(cast)
        return cls(config, cast)

    def __call__(self, ids: Any, mask: Any) -> Any:
        """Hidden states ``(batch, tokens, hidden)``; ``mask`` is True on text."""
        import mlx.core as mx

        w, c = self.weights, self.config
        batch, tokens = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:tokens]
            + w["embeddings.token_type_embeddings.weight"][0]  # one segment
        )
        x = self._norm(x, "embeddings.LayerNorm")
        keys = mask[:, None, None, :]
        size = c.hidden_size // c.num_heads

        def heads(y: Any) -> Any:
            return y.reshape(batch, tokens, c.num_heads, size).transpose(0, 2, 1, 3)

        for i in range(c.num_layers):
            p = f"encoder.layer.{i}."
            context = mx.fast.scaled_dot_product_attention(
                heads(self._linear(x, p + "attention.self.query")),
                heads(self._linear(x, p + "attention.self.key")),
                heads(self._linear(x, p + "attention.self.value")),
                scale=1.0 / math.sqrt(size),
                mask=keys,
            )
            context = context.transpose(0, 2, 1, 3).reshape(batch, tokens, -1)
            attended = self._linear(context, p + "attention.output.dense")
            x = self._norm(attended + x, p + "attention.output.LayerNorm")
            inner = self._act(self._linear(x, p + "intermediate.dense"))
            x = self._norm(
                self._linear(inner, p + "output.dense") + x, p + "output.LayerNorm"
            )
        return x

    def _linear(self, x: Any, name: str) -> Any:
        import mlx.core as mx

        w = self.weights
        return mx.addmm(w[name + ".bias"], x, w[name + ".weight"].T)

    def _norm(self, x: Any, name: str) -> Any:
        import mlx.core as mx

        w = self.weights
        return mx.fast.layer_norm(
            x, w[name + ".weight"], w[name + ".bias"], self.config.layer_norm_eps
        )


def _pool(hidden: Any, mask: Any, mode: Pooling, normalize: bool) -> Any:
    """Sentence vectors from hidden states, as sentence-transformers pools them."""
    import mlx.core as mx

    hidden = hidden.astype(mx.float32)
    keep = mask[..., None]
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = mx.where(keep, hidden, -1e9).max(axis=1)
    else:
        total = (hidden * keep).sum(axis=1)
        count = mx.maximum(keep.sum(axis=1).astype(mx.float32), 1e-9)
        pooled = total / (mx.sqrt(count) if mode == "mean_sqrt_len" else count)
    if normalize:
        norm = mx.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / mx.maximum(norm, 1e-12)
    return pooled


# ------------------------------------------------------------------ the runtime


T = TypeVar("T")
_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class _Worker:
    """A daemon thread that runs submitted functions in order, then parks.

    It never exits: when a thread that ran MLX exits at interpreter exit, MLX's
    thread-local state is destroyed and the process aborts ("terminate called
    without an active exception"; the engine's worker parks for the same reason).
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = True
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(
        self, fn: Callable[[], T], *, stopped: str
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn``; raise EngineStoppedError(``stopped``) after :meth:`stop`."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if not self._open:
                raise EngineStoppedError(stopped)
            self._queue.put((fn, future))
        return future

    def stop(self, last: Callable[[], object]) -> None:
        """Run what is queued, then ``last``; return when the thread has parked."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._queue.put((last, concurrent.futures.Future()))
            self._queue.put(None)
        self._stopped.wait()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as e:  # delivered to the caller; the thread lives on
                future.set_exception(e)
        self._stopped.set()
        threading.Event().wait()  # park (see the class docstring)


@dataclass(frozen=True)
class _Batch:
    indices: list[int]  # positions in the caller's list
    ids: list[list[int]]


class TextEncoder:
    """One loaded encoder and tokenizer, and the thread that runs the encoder."""

    _registry: dict[tuple[str, str], TextEncoder] = {}  # noqa: RUF012
    _registry_lock = threading.Lock()

    def __init__(self, config: EmbeddingModelConfig, dtype: DType) -> None:
        self.config = config
        self.dtype: DType = dtype
        self.tokenizer = _load_tokenizer(config)
        self._key = (str(config.folder.resolve()), dtype)
        self._worker = _Worker(f"langchain-mlx-embeddings[{config.folder.name}]")
        self._model: Any = None
        try:
            self._model = self._worker.submit(
                functools.partial(BertEncoder.load, config, dtype), stopped=""
            ).result()
        except BaseException:
            self._worker.stop(_clear_cache)
            raise

    @classmethod
    def for_config(cls, config: EmbeddingModelConfig, dtype: DType) -> TextEncoder:
        """The one encoder of this folder and dtype, loaded on first use."""
        key = (str(config.folder.resolve()), dtype)
        with cls._registry_lock:  # loading is rare: one lock for all models
            encoder = cls._registry.get(key)
            if encoder is None or not encoder.alive:
                logger.info("loading embedding model %s (%s)", config.folder, dtype)
                encoder = cls(config, dtype)
                cls._registry[key] = encoder
            return encoder

    @property
    def alive(self) -> bool:
        """False once :meth:`close` ran."""
        return self._model is not None

    def close(self) -> None:
        """Drop the model and return its memory; waits for the running batch."""
        with self._registry_lock:
            if self._registry.get(self._key) is self:
                del self._registry[self._key]
        if self._model is None:
            return
        self._model = None  # batches still queued raise EngineStoppedError
        self._worker.stop(_clear_cache)

    # -- one loop for sync and async: plan, run each batch on the worker, assemble

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        max_length: int,
        normalize: bool,
    ) -> list[list[float]]:
        """Embed ``texts`` (in their order); blocks the calling thread."""
        parts = [
            (batch, self._submit(batch, normalize).result())
            for batch in self._plan(texts, batch_size, max_length)
        ]
        return _assemble(len(texts), parts)

    async def aembed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int,
        max_length: int,
        normalize: bool,
    ) -> list[list[float]]:
        """Embed ``texts`` (in their order) without blocking the event loop."""
        parts = [
            (batch, await asyncio.wrap_future(self._submit(batch, normalize)))
            for batch in self._plan(texts, batch_size, max_length)
        ]
        return _assemble(len(texts), parts)

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids with ``[CLS]``/``[SEP]``, at most ``max_length`` per text.

        A longer text keeps its first tokens and its closing ``[SEP]``, as
        sentence-transformers truncates.
        """
        encoded = self.tokenizer.encode_batch(list(texts))
        return [
            e.ids if len(e.ids) <= max_length else [*e.ids[: max_length - 1], e.ids[-1]]
            for e in encoded
        ]

    def _plan(
        self, texts: Sequence[str], batch_size: int, max_length: int
    ) -> list[_Batch]:
        ids = self.tokenize(texts, max_length)
        # Longest first, so texts of similar length share a batch and the
        # costliest batch runs first (a memory problem shows at once). A batch
        # also ends where lengths halve: padding at most doubles a batch's work.
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        chunks: list[list[int]] = []
        for i in order:
            if (
                not chunks
                or len(chunks[-1]) == batch_size
                or 2 * len(ids[i]) < len(ids[chunks[-1][0]])
            ):
                chunks.append([])
            chunks[-1].append(i)
        return [_Batch(chunk, [ids[i] for i in chunk]) for chunk in chunks]

    def _submit(
        self, batch: _Batch, normalize: bool
    ) -> concurrent.futures.Future[np.ndarray]:
        return self._worker.submit(
            functools.partial(self._forward, batch.ids, normalize),
            stopped=self._closed_message(),
        )

    def _closed_message(self) -> str:
        return (
            f"the embedding model {self.config.folder.name!r} was closed while "
            "this call was running; call again to load it again"
        )

    def _forward(self, ids: list[list[int]], normalize: bool) -> np.ndarray:
        """Runs on the worker thread: one padded batch -> float32 vectors."""
        import mlx.core as mx
        import numpy as np

        model = self._model
        if model is None:
            raise EngineStoppedError(self._closed_message())
        width = max(len(row) for row in ids)
        pad = self.config.pad_token_id
        padded = np.full((len(ids), width), pad, dtype=np.int32)
        mask = np.zeros((len(ids), width), dtype=bool)
        for row, tokens in enumerate(ids):
            padded[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        tokens_mx, mask_mx = mx.array(padded), mx.array(mask)
        hidden = model(tokens_mx, mask_mx)
        vectors = _pool(hidden, mask_mx, self.config.pooling, normalize)
        mx.eval(vectors)
        return np.array(vectors, dtype=np.float32)


def _assemble(count: int, parts: list[tuple[_Batch, np.ndarray]]) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in range(count)]
    for batch, vectors in parts:
        for index, vector in zip(batch.indices, vectors.tolist(), strict=True):
            out[index] = vector
    return out


def _clear_cache() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def _load_tokenizer(config: EmbeddingModelConfig) -> Any:
    """A `tokenizers.Tokenizer` that adds ``[CLS]``/``[SEP]`` and never pads."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    file = config.tokenizer_file
    try:
        if file.name == "vocab.txt":
            tokenizer: Any = BertWordPieceTokenizer(
                str(file), lowercase=config.lowercase
            )
        else:
            tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:
        msg = (
            f"cannot load the tokenizer {str(file)!r} ({e}); copy the tokenizer "
            "files again from the original model"
        )
        raise ModelLoadError(msg) from e
    # Some ship fixed-length padding and truncation (all-MiniLM-L6-v2: 128); we
    # pad per batch and cut per call (the tokenizer is shared: never changed).
    tokenizer.no_padding()
    tokenizer.enable_truncation(config.max_position_embeddings)
    return tokenizer

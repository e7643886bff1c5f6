"""BERT on MLX: the sentence encoder `MLXEmbeddings` runs, as model code.

`BertEncoder` is BERT written as a function of its weights (embeddings, N
post-norm layers; `mx.fast` attention and layer norm) under the Hugging Face
names, so a checkpoint loads as it is. :func:`pool` pools (mean, cls, max,
mean_sqrt_len) and normalizes as the sentence-transformers config that
`models.embedding.read_embedding_folder` reads into `EmbeddingModelConfig`
says; :func:`load_tokenizer` loads its WordPiece tokenizer.

Why not mlx-embeddings: it imports mlx-vlm (which pulls opencv, datasets,
mlx-audio, fastapi) and transformers, and it always mean-pools and normalizes
whatever the model's config says. The encoder here is ~100 lines of MLX.

Who runs it: `engine/encoder.py` (`TextEncoder`), on its own thread. This module
imports neither mlx nor numpy at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from langchain_mlx.engine.types import ModelLoadError

__all__ = [
    "BertEncoder",
    "DType",
    "EmbeddingModelConfig",
    "Pooling",
    "bert_weight_shapes",
    "load_tokenizer",
    "pool",
]

DType = Literal["float32", "bfloat16", "float16"]
Pooling = Literal["mean", "cls", "max", "mean_sqrt_len"]
_DROPPED = ("embeddings.position_ids", "pooler.", "cls.")  # not in the encoder


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
    # prepended to each text (sentence-transformers' prompts; "" for none)
    query_prompt: str = ""
    document_prompt: str = ""

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


def pool(hidden: Any, mask: Any, mode: Pooling, normalize: bool) -> Any:
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


def load_tokenizer(config: EmbeddingModelConfig) -> Any:
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

"""GGUF → Hugging Face → MLX conversion, without torch.

The GGUF files we ship models from (see :mod:`langchain_mlx.models.prepare`) hold
quantized llama / qwen2 / gemma3 weights plus a tokenizer in their metadata: a
byte-level BPE (llama, qwen2) or a SentencePiece BPE (gemma3: tokens, scores and
token types, no merges). This module turns one into

* the Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) built with the ``tokenizers`` library, and
* a float32 Hugging Face checkpoint (``config.json`` + ``model.safetensors``) that
  ``mlx_lm.convert`` turns into an MLX folder.

Weights are dequantized with ``gguf.quants.dequantize`` (numpy). llama.cpp's
converter permutes the rows of llama's ``attn_q``/``attn_k`` for its rotary layout;
we undo that here. Qwen2 is stored unpermuted. For Gemma it stores every RMSNorm
weight plus one (Gemma's norm scales by ``1 + weight``); we subtract it again.

This module imports numpy and gguf at import time: import it lazily.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from langchain_mlx.models.errors import ModelPreparationError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# Hugging Face's model_type where it differs from the GGUF architecture.
_MODEL_TYPES = {"gemma3": "gemma3_text"}

# Pre-tokenizers, keyed by ``tokenizer.ggml.pre``; they match the tokenizer.json
# files Hugging Face ships for those models (and llama.cpp's llama-vocab.cpp).
# GPT-2's split, used by SmolLM2 / StarCoder after splitting every digit apart.
_GPT2_STYLE = ("gpt2", "gpt-2", "default", "smollm", "starcoder", "refact", "codeshell")
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell")
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX = {
    "qwen2": _QWEN2_REGEX,
    "stablelm2": _QWEN2_REGEX,
    "llama-bpe": _LLAMA3_REGEX,
}
# Tokens that end a chat turn, besides the GGUF's eos token.
_EXTRA_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")

_SPECIAL_TOKEN_KEYS = {
    "bos_token": "bos",
    "eos_token": "eos",
    "pad_token": "padding",
    "unk_token": "unknown",
}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
_SPIECE_SPACE = "\u2581"  # SentencePiece's visible space

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma has four norms per block: around attention and around the MLP.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _fail(message: str) -> ModelPreparationError:
    return ModelPreparationError(message)


class GGUFFile:
    """Read access to the parts of a GGUF file that the conversion needs."""

    def __init__(self, path: Path) -> None:
        """Open (memory-map) ``path``."""
        self.path = path
        self.reader = gguf.GGUFReader(str(path))
        self.architecture = str(self.get("general.architecture"))
        if self.architecture not in _ARCHITECTURES:
            msg = (
                f"{path.name}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
            )
            raise _fail(msg)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the metadata value ``key`` (``default`` when absent)."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def arch(self, key: str, default: Any = None) -> Any:
        """Return the architecture-prefixed metadata value ``{arch}.{key}``."""
        return self.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        """Return ``{arch}.{key}``; raise when the file lacks it."""
        value = self.arch(key)
        if value is None:
            msg = f"{self.path.name}: metadata {self.architecture}.{key} is missing"
            raise _fail(msg)
        return value


def _f32(value: float) -> float:
    """Shortest decimal of a float32 value: 9.999999747378752e-06 → 1e-05."""
    return float(str(np.float32(value)))


def stop_token_ids(eos_id: int, token_to_id: Callable[[str], int | None]) -> list[int]:
    """Return the eos id plus the ids of the usual end-of-turn tokens present."""
    ids = [eos_id]
    for token in _EXTRA_STOP_TOKENS:
        token_id = token_to_id(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


# --------------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str) -> tuple[Any, Any]:
    """Return (normalizer, pre_tokenizer) for ``tokenizer.ggml.pre``."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre in _SPLIT_REGEX:
        split = pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        normalizer = normalizers.NFC() if pre != "llama-bpe" else None
        return normalizer, pre_tokenizers.Sequence([split, byte_level])
    if pre in _GPT2_STYLE:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGITS_FIRST:
            digits = pre_tokenizers.Digits(individual_digits=True)
            return None, pre_tokenizers.Sequence([digits, byte_level])
        return None, byte_level
    known = sorted({*_SPLIT_REGEX, *_GPT2_STYLE})
    msg = f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(known)})"
    raise _fail(msg)


def _byte_level_bpe(src: GGUFFile, tokens: list[str], types: list[int]) -> Any:
    """GPT-2-style byte-level BPE from the file's tokens and merges."""
    from tokenizers import Tokenizer, decoders, processors
    from tokenizers.models import BPE

    merges: list[str] = src.get("tokenizer.ggml.merges") or []
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        pairs.append((left, right))
    # Padding rows of the embedding ([PAD151665]…) are not part of the vocabulary.
    kinds = list(zip(tokens, types, strict=True))
    vocab = {t: i for i, (t, ty) in enumerate(kinds) if ty != _TOKEN_UNUSED}
    bpe = BPE(
        vocab=vocab,
        merges=pairs,
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    normalizer, pre_tokenizer = _pre_tokenizer(str(src.get("tokenizer.ggml.pre", "")))
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _sentencepiece_merges(
    tokens: list[str], types: list[int], scores: list[float]
) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies, best first.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent
    pair whose joined piece scores highest; every split of a normal token into
    two normal tokens is such a pair, ranked by the joined token's score.
    """
    index = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != _TOKEN_NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            li, ri = index.get(left), index.get(right)
            if li is None or ri is None:
                continue
            if types[li] == _TOKEN_NORMAL and types[ri] == _TOKEN_NORMAL:
                ranked.append((-scores[i], i, li, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(src: GGUFFile, tokens: list[str], types: list[int]) -> Any:
    """SentencePiece BPE (``tokenizer.ggml.model`` "llama") with byte fallback.

    Spaces are SentencePiece's visible space (no dummy prefix, as the file says
    with ``add_space_prefix``); unknown characters fall back to ``<0xNN>`` bytes.
    User-defined pieces (runs of spaces or newlines, HTML tags) are matched
    whole in the raw text, as llama.cpp does.
    """
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    scores: list[float] = src.get("tokenizer.ggml.scores") or []
    if len(scores) != len(tokens):
        msg = f"{src.path.name}: {len(tokens)} tokens but {len(scores)} scores"
        raise _fail(msg)
    # llama.cpp adds a space prefix unless the file says not to (Gemma does)
    if src.get("tokenizer.ggml.add_space_prefix", True):
        msg = f"{src.path.name}: SentencePiece with a space prefix is not supported"
        raise _fail(msg)
    unk_id = int(src.get("tokenizer.ggml.unknown_token_id", 0))
    bpe = BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=_sentencepiece_merges(tokens, types, scores),
        unk_token=tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    bos_id = src.get("tokenizer.ggml.bos_token_id")
    if src.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, int(bos_id))],
        )
    return tokenizer


_TOKENIZER_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


def write_tokenizer(src: GGUFFile, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    from tokenizers import AddedToken

    model = src.get("tokenizer.ggml.model")
    if model not in _TOKENIZER_BUILDERS:
        msg = (
            f"{src.path.name}: tokenizer model {model!r} is not supported "
            f"(supported: {', '.join(sorted(_TOKENIZER_BUILDERS))})"
        )
        raise _fail(msg)
    tokens: list[str] = src.get("tokenizer.ggml.tokens")
    types: list[int] = src.get("tokenizer.ggml.token_type") or []
    types = types or [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        msg = f"{src.path.name}: {len(tokens)} tokens but {len(types)} token types"
        raise _fail(msg)
    tokenizer = _TOKENIZER_BUILDERS[model](src, tokens, types)
    kinds = list(zip(tokens, types, strict=True))
    added = [
        AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
        for t, ty in kinds
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    special: dict[str, str] = {}
    for key, gguf_key in _SPECIAL_TOKEN_KEYS.items():
        if (token_id := src.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
            special[key] = tokens[int(token_id)]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(src.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(src.arch("context_length", 2048)),
    }
    template = src.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = str(template)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


# --------------------------------------------------------------------- weights


def _hf_config(src: GGUFFile, tied: bool, has_bias: bool) -> dict[str, Any]:
    arch = src.architecture
    hidden = int(src.require("embedding_length"))
    heads = int(src.require("attention.head_count"))
    tokens = src.get("tokenizer.ggml.tokens") or []
    lookup = {t: i for i, t in enumerate(tokens)}
    eos = int(src.get("tokenizer.ggml.eos_token_id", 0))
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_size": hidden,
        "num_hidden_layers": int(src.require("block_count")),
        "intermediate_size": int(src.require("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(src.arch("attention.head_count_kv", heads)),
        "rms_norm_eps": _f32(src.require("attention.layer_norm_rms_epsilon")),
        # mlx-lm reads rope_theta at the top level (not under rope_parameters).
        "rope_theta": _f32(src.arch("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(src.arch("context_length", 2048)),
        "vocab_size": int(src.arch("vocab_size", 0)) or len(tokens),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": int(src.get("tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": stop_token_ids(eos, lookup.get),
    }
    if (pad := src.get("tokenizer.ggml.padding_token_id")) is not None:
        config["pad_token_id"] = int(pad)
    if (head_dim := src.arch("attention.key_length")) is not None:
        config["head_dim"] = int(head_dim)
    if arch == "llama":
        config.update(attention_bias=has_bias, mlp_bias=False, rope_traditional=False)
    if arch == "gemma3":
        del config["hidden_act"]  # Gemma names it hidden_activation
        config.update(_gemma3_config(src, int(config["num_hidden_layers"])))
    scaling = src.arch("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            msg = f"{src.path.name}: rope scaling {scaling!r} is not supported"
            raise _fail(msg)
        factor = _f32(src.require("rope.scaling.factor"))
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    return config


def _gemma3_config(src: GGUFFile, layers: int) -> dict[str, Any]:
    """What Gemma 3 adds; llama.cpp fixes what the GGUF does not state.

    Five sliding-window layers (local rope base 10,000) then one global layer;
    queries scaled by ``head_dim ** -0.5``; gelu (tanh) MLP.
    """
    pattern = 6
    head_dim = int(src.arch("attention.key_length", 256))
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(src.require("attention.sliding_window")),
        "sliding_window_pattern": pattern,
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ],
        "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of q/k rows (rotary layout)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_name(name: str, arch: str = "llama") -> tuple[str, str | None]:
    """Map a GGUF tensor name to (HF name, GGUF layer kind or None)."""
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if m := _BLOCK_RE.match(name):
        layer, kind, suffix = m.groups()
        if kind in layer_names:
            return f"model.layers.{layer}.{layer_names[kind]}.{suffix}", kind
    else:
        stem, _, suffix = name.rpartition(".")
        if stem in _GLOBAL_NAMES and suffix == "weight":
            return f"{_GLOBAL_NAMES[stem]}.weight", None
    msg = f"unexpected GGUF tensor {name!r}; cannot map it to a Hugging Face name"
    raise _fail(msg)


def dequantized_tensors(
    src: GGUFFile, progress: Callable[[str], None] | None = None
) -> dict[str, np.ndarray]:
    """Return every tensor as float32 under its Hugging Face name and shape."""
    heads = int(src.require("attention.head_count"))
    kv_heads = int(src.arch("attention.head_count_kv", heads))
    out: dict[str, np.ndarray] = {}
    total = len(src.reader.tensors)
    for index, tensor in enumerate(src.reader.tensors):
        hf_name, kind = _hf_name(tensor.name, src.architecture)
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        if src.architecture == "llama" and kind in ("attn_q", "attn_k"):
            array = _unpermute(array, heads if kind == "attn_q" else kv_heads)
        if src.architecture == "gemma3" and hf_name.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stored 1 + weight
        out[hf_name] = np.ascontiguousarray(array)
        if progress is not None and (index + 1) % 50 == 0:
            progress(f"Dequantized {index + 1}/{total} tensors")
    return out


def write_hf_checkpoint(
    src: GGUFFile, out_dir: Path, progress: Callable[[str], None] | None = None
) -> None:
    """Write a float32 Hugging Face checkpoint plus tokenizer into ``out_dir``."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = dequantized_tensors(src, progress)
    tied = "lm_head.weight" not in tensors
    has_bias = any(name.endswith("q_proj.bias") for name in tensors)
    config = _hf_config(src, tied=tied, has_bias=has_bias)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _write_json(out_dir / "config.json", config)
    write_tokenizer(src, out_dir)


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    work_dir: Path,
    *,
    dtype: str = "bfloat16",
    progress: Callable[[str], None] | None = None,
) -> None:
    """Convert ``gguf_path`` into the MLX model folder ``out_dir`` (must not exist).

    ``work_dir`` (an existing, empty directory) holds the float32 intermediate
    checkpoint; the caller removes it.
    """
    from mlx_lm.convert import convert

    src = GGUFFile(gguf_path)
    hf_dir = work_dir / "hf"
    write_hf_checkpoint(src, hf_dir, progress)
    if progress is not None:
        progress(f"Converting to MLX ({dtype})")
    captured = io.StringIO()
    # mlx_lm.convert reports with print(); keep it out of the caller's stdout.
    with contextlib.redirect_stdout(captured):
        convert(hf_path=str(hf_dir), mlx_path=str(out_dir), dtype=dtype)
    for line in captured.getvalue().splitlines():
        logger.debug("mlx_lm.convert: %s", line)
    # Use our tokenizer files (the chat template lives in tokenizer_config.json),
    # not the ones transformers re-serialized.
    for stale in ("chat_template.jinja", "chat_template.json", *TOKENIZER_FILES):
        (out_dir / stale).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(hf_dir / name, out_dir / name)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")

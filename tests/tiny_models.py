"""Tiny random-weight models for fast tests (not part of the shipped package).

- `write_tiny_model`: a llama with a real tokenizer (and so a real chat template,
  SmolLM2's by default); loads in well under a second and generates hundreds of
  tokens per second on any CPU.
- `write_tiny_bert`: a BERT sentence-transformers folder with a small WordPiece
  tokenizer, for `MLXEmbeddings`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from langchain_mlx.models.bert import Pooling, bert_weight_shapes
from langchain_mlx.models.embedding import POOLING_KEYS, read_embedding_folder
from langchain_mlx.models.prepare import DEFAULT_MODEL, prepare_tokenizer


def write_tiny_model(
    folder: Path,
    tokenizer_name: str = DEFAULT_MODEL,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """Write a random-weight llama model with a real tokenizer into ``folder``.

    The tokenizer files are those of the known model ``tokenizer_name``
    (`prepare_tokenizer`: built once from its GGUF); the weights are
    bfloat16 (or ``dtype``, e.g. "float32": sharded sums then round alike),
    embeddings tied, head size 16 (``hidden_size`` must be a multiple of 32).
    ``mlx_lm.load(folder)`` loads it in well under a second: the fixture for
    fast tests of plumbing, stop strings, batching and caching. Returns ``folder``.
    """
    import mlx.core as mx
    import numpy as np
    from tokenizers import Tokenizer

    from langchain_mlx.models.gguf import TOKENIZER_FILES, stop_token_ids

    if hidden_size <= 0 or hidden_size % 32:
        msg = f"hidden_size must be a positive multiple of 32, got {hidden_size}"
        raise ValueError(msg)
    source = prepare_tokenizer(tokenizer_name)
    folder.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, folder / file)
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    settings = json.loads((source / "tokenizer_config.json").read_text("utf-8"))
    eos = tokenizer.token_to_id(settings["eos_token"])
    bos = tokenizer.token_to_id(settings.get("bos_token") or settings["eos_token"])
    if eos is None or bos is None:
        msg = f"{source}: bos/eos tokens are not in the vocabulary"
        raise ValueError(msg)
    heads = hidden_size // 16
    kv_heads = heads // 2
    intermediate = 2 * hidden_size
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": int(settings.get("model_max_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        "bos_token_id": bos,
        "eos_token_id": stop_token_ids(eos, tokenizer.token_to_id),
    }
    rng = np.random.default_rng(seed)
    kv_dim = kv_heads * 16
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden_size, hidden_size),
            p + "self_attn.k_proj.weight": (kv_dim, hidden_size),
            p + "self_attn.v_proj.weight": (kv_dim, hidden_size),
            p + "self_attn.o_proj.weight": (hidden_size, hidden_size),
            p + "mlp.gate_proj.weight": (intermediate, hidden_size),
            p + "mlp.up_proj.weight": (intermediate, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate),
        }
    mx_dtype = getattr(mx, dtype)
    weights = {
        key: mx.array(rng.normal(0.0, 0.02, shape).astype(np.float32)).astype(mx_dtype)
        for key, shape in shapes.items()
    }
    norms = [f"model.layers.{i}.{n}" for i in range(num_layers) for n in _NORMS]
    for key in [*norms, "model.norm.weight"]:
        weights[key] = mx.ones((hidden_size,), dtype=mx_dtype)
    mx.save_safetensors(
        str(folder / "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


# -- a tiny BERT sentence encoder (for MLXEmbeddings tests) -------------------

_TINY_WORDS = (
    "the a an of to and in is it that for on with as was at by be this are from "
    "or have not but what all were when we there can your which their if do will "
    "each about how up out them then she many some so these would other into has "
    "more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very "
    "after words called just where most know cat dog sun moon paris france capital "
    "city river python code model text vector search apple banana car road rain "
    "snow music song book read write fast slow hot cold"
)


def write_tiny_bert(
    folder: Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    pooling: Pooling = "mean",
    normalize: bool = True,
    max_seq_length: int = 64,
    seed: int = 0,
) -> Path:
    """Write a random-weight BERT sentence-transformers folder into ``folder``.

    Its WordPiece tokenizer (lowercasing, ``[CLS] … [SEP]``) knows ASCII
    letters, digits, punctuation and a few hundred common words, so any text
    tokenizes; ``pooling`` and ``normalize`` go into ``1_Pooling/config.json``
    and ``modules.json``. Loads in well under a second: the fixture for fast
    tests. Needs no mlx. Returns ``folder``.
    """
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab_list = [*specials, *chars, *(f"##{c}" for c in chars), *_TINY_WORDS.split()]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))

    positions = max(max_seq_length, 16)
    inner = 4 * hidden_size
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": len(vocab),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "intermediate_size": inner,
        "hidden_act": "gelu",
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": positions})
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden_size,
                **{key: mode == pooling for key, mode in POOLING_KEYS.items()},
            },
            indent=2,
        )
    )
    rng = np.random.default_rng(seed)
    (folder / "model.safetensors").write_bytes(b"")  # read_embedding_folder wants it
    shapes = bert_weight_shapes(read_embedding_folder(folder))
    tensors = {
        key: (1.0 if key.endswith("LayerNorm.weight") else 0.0)
        + rng.normal(0.0, 0.1 if "LayerNorm" in key else 0.2, shape).astype(np.float32)
        for key, shape in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    kinds = ["Transformer", "Pooling", *(["Normalize"] if normalize else [])]
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    modules = [
        {"idx": i, "name": str(i), "path": paths[kind],
         "type": f"sentence_transformers.models.{kind}"}
        for i, kind in enumerate(kinds)
    ]  # fmt: skip
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    return folder

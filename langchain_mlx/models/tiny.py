"""A tiny random-weight llama with a real tokenizer: the fixture for fast tests.

Loads in well under a second and generates hundreds of tokens per second on any
CPU; the tokenizer (and so the chat template) is a real model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_tiny_model(
    folder: Path,
    source: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-weight llama model with a real tokenizer into ``folder``.

    The tokenizer files are copied from ``source``; the weights are
    bfloat16, embeddings tied, head size 16 (``hidden_size`` must be a multiple of
    32). ``mlx_lm.load(folder)`` loads it in well under a second: the fixture for
    fast tests of plumbing, stop strings, batching and caching. Returns ``folder``.
    """
    import mlx.core as mx
    import numpy as np
    from tokenizers import Tokenizer

    from langchain_mlx.models.gguf import TOKENIZER_FILES, stop_token_ids

    if hidden_size <= 0 or hidden_size % 32:
        msg = f"hidden_size must be a positive multiple of 32, got {hidden_size}"
        raise ValueError(msg)
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
        "torch_dtype": "bfloat16",
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
    weights = {
        key: mx.array(rng.normal(0.0, 0.02, shape).astype(np.float32)).astype(
            mx.bfloat16
        )
        for key, shape in shapes.items()
    }
    norms = [f"model.layers.{i}.{n}" for i in range(num_layers) for n in _NORMS]
    for key in [*norms, "model.norm.weight"]:
        weights[key] = mx.ones((hidden_size,), dtype=mx.bfloat16)
    mx.save_safetensors(
        str(folder / "model.safetensors"), weights, metadata={"format": "mlx"}
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")

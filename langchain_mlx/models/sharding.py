"""Load this rank's shard of a model (mlx-lm's `sharded_load`); clear errors first.

mlx-lm shards a model two ways: by tensor (`Model.shard`: every layer's
attention heads and MLP split across the ranks, partial sums added with
`all_sum`) and by pipeline (`PipelineMixin`: each rank holds a run of whole
layers and hands the hidden state on). Which architectures support which,
and whether the group size fits the model's shape, is checked from the
config before any weight is read, so every rank fails the same way at once.

Memory: pipeline ranks read only the weight files holding their layers (and
the embeddings / head); tensor ranks map every file and keep their slice.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from pathlib import Path
from typing import Any

from langchain_mlx.engine.types import ModelLoadError
from langchain_mlx.models.loading import check_model_folder


def sharding_modes(model_type: str) -> tuple[str, ...]:
    """The ways mlx-lm can shard a model type: "tensor", "pipeline" (maybe none)."""
    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import MODEL_REMAPPING

    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        module = importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        return ()
    modes: list[str] = []
    model = getattr(module, "Model", None)
    if model is not None and hasattr(model, "shard"):
        modes.append("tensor")
    if any(
        inspect.isclass(c) and issubclass(c, PipelineMixin) and c is not PipelineMixin
        for c in vars(module).values()
    ):
        modes.append("pipeline")
    return tuple(modes)


def check_shardable(config: dict[str, Any], mode: str, size: int, name: str) -> None:
    """Raise ValueError if this model cannot be sharded `mode`-wise over `size`.

    mlx-lm's tensor split needs heads and key-value heads divisible by the
    group size; llama models that miss that are split by head groups instead
    (`shard_by_head_groups`), which needs one key-value head per rank.
    """
    model_type = str(config.get("model_type", "?"))
    modes = sharding_modes(model_type)
    if mode not in modes:
        can = (
            f"it can shard it by {' or '.join(repr(m) for m in modes)}"
            if modes
            else "it cannot shard this architecture at all"
        )
        msg = (
            f"mlx-lm cannot shard {name!r} (model type {model_type!r}) with "
            f"distributed={mode!r}; {can}. Pick a supported mode, or run the "
            "model on one machine (distributed=None)."
        )
        raise ValueError(msg)
    if mode == "tensor":
        heads = config.get("num_attention_heads")
        kv_heads = config.get("num_key_value_heads", heads)
        sizes = [h for h in (heads, kv_heads) if isinstance(h, int)]

        def fits(n: int) -> bool:
            return all(h % n == 0 for h in sizes) or uneven_split(config, n)

        if sizes and not fits(size):
            possible = [n for n in range(1, max(sizes) + 1) if fits(n)]
            how = (
                "every rank gets at least one key-value head with its query heads"
                if config.get("model_type") == "llama"
                else "every rank gets the same number of each"
            )
            msg = (
                f"{name!r} has {heads} attention heads and {kv_heads} key-value "
                f"heads; tensor parallelism needs a group size where {how} "
                f"(possible: {', '.join(map(str, possible))}), but this group has "
                f"{size} ranks. Launch a fitting number of ranks"
                + (", or use distributed='pipeline'." if "pipeline" in modes else ".")
            )
            raise ValueError(msg)
    if mode == "pipeline":
        layers = config.get("num_hidden_layers")
        if isinstance(layers, int) and layers < size:
            msg = (
                f"{name!r} has {layers} layers: a pipeline over {size} ranks needs "
                "at least one layer per rank; launch fewer ranks"
            )
            raise ValueError(msg)


def uneven_split(config: dict[str, Any], size: int) -> bool:
    """Whether a llama model's heads need the uneven split (mlx-lm's would fail).

    mlx-lm gives every rank `heads / size` heads, so SmolLM2 (9 heads, 3
    key-value heads) cannot run on 2 ranks. A llama model with at least one
    key-value head per rank can still be split by whole head groups.
    """
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", heads)
    if config.get("model_type") != "llama" or config.get("quantization"):
        return False
    if not (isinstance(heads, int) and isinstance(kv_heads, int)) or size < 2:
        return False
    even = heads % size == 0 and kv_heads % size == 0
    return not even and kv_heads >= size and heads % kv_heads == 0


def _parts(total: int, size: int) -> list[tuple[int, int]]:
    """`total` split into `size` runs as even as possible (the first ones longer)."""
    base, extra = divmod(total, size)
    bounds = [0]
    for r in range(size):
        bounds.append(bounds[-1] + base + (r < extra))
    return list(itertools.pairwise(bounds))


def shard_by_head_groups(model: Any, group: Any) -> None:
    """Tensor-parallel llama with whole key-value head groups per rank.

    Rank r keeps its run of key-value heads with the query heads that read
    them (SmolLM2 on 2 ranks: 6 + 2 heads on rank 0, 3 + 1 on rank 1) and a
    run of the MLP's hidden units; the attention output and MLP down
    projections add the ranks' parts in float32 (a bf16 partial sum per rank,
    rounded twice per layer, visibly changes a 30-layer model's answers).
    """
    import mlx.core as mx
    import mlx.nn as nn

    rank, size = int(group.rank()), int(group.size())

    class SumOverRanks(nn.Module):  # type: ignore[misc]
        """`x @ W_r.T` added over the ranks (float32), then the bias."""

        def __init__(self, weight: Any, bias: Any) -> None:
            super().__init__()
            self.weight = weight
            if bias is not None:
                self.bias = bias

        def __call__(self, x: Any) -> Any:
            # in float32 up to the sum, rounded once: as one rank's matmul would
            f32 = mx.float32
            y = x.astype(f32) @ self["weight"].astype(f32).T
            y = mx.distributed.all_sum(y, group=group).astype(x.dtype)
            return y + self["bias"] if "bias" in self else y

    def rows(linear: Any, a: int, b: int) -> Any:
        out = nn.Linear(linear.weight.shape[1], b - a, bias="bias" in linear)
        out.weight = linear.weight[a:b]
        if "bias" in linear:
            out.bias = linear.bias[a:b]
        return out

    def columns(linear: Any, a: int, b: int) -> Any:
        return SumOverRanks(
            linear.weight[:, a:b], linear.bias if "bias" in linear else None
        )

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        ratio = attn.n_heads // attn.n_kv_heads
        dim = attn.head_dim
        kv_a, kv_b = _parts(attn.n_kv_heads, size)[rank]
        q_a, q_b = kv_a * ratio, kv_b * ratio
        attn.q_proj = rows(attn.q_proj, q_a * dim, q_b * dim)
        attn.k_proj = rows(attn.k_proj, kv_a * dim, kv_b * dim)
        attn.v_proj = rows(attn.v_proj, kv_a * dim, kv_b * dim)
        attn.o_proj = columns(attn.o_proj, q_a * dim, q_b * dim)
        attn.n_heads, attn.n_kv_heads = q_b - q_a, kv_b - kv_a
        h_a, h_b = _parts(mlp.gate_proj.weight.shape[0], size)[rank]
        mlp.gate_proj = rows(mlp.gate_proj, h_a, h_b)
        mlp.up_proj = rows(mlp.up_proj, h_a, h_b)
        mlp.down_proj = columns(mlp.down_proj, h_a, h_b)


def _load_by_head_groups(
    folder: Path, group: Any, tokenizer_config: dict[str, Any] | None
) -> tuple[Any, Any]:
    """`sharded_load`'s steps, with `shard_by_head_groups` instead of `shard`."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(folder, lazy=True, strict=False)
    tokenizer = load_tokenizer(
        folder, tokenizer_config or {}, eos_token_ids=config.get("eos_token_id")
    )
    shard_by_head_groups(model, group)
    mx.eval(model.parameters())  # only this rank's slices are read
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer


def load_sharded(
    path: str,
    *,
    mode: str,
    group: Any,
    tokenizer_config: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """The rank's shard of the model at `path` (a folder or hub id) and its tokenizer.

    Raises:
        ValueError: mlx-lm cannot shard this model this way over this group.
        ModelLoadError: the folder or its weights cannot be loaded.

    """
    folder = Path(path).expanduser()
    local = folder.exists()
    if local:
        config = check_model_folder(folder)
        check_shardable(config, mode, int(group.size()), path)
        index = folder / "model.safetensors.index.json"
        if mode == "pipeline" and not index.is_file():
            msg = (
                f"{path!r} has no model.safetensors.index.json, which mlx-lm's "
                "pipeline loading reads to find each rank's layers; convert the "
                "model with mlx_lm.convert (or langchain-mlx models prepare)"
            )
            raise ModelLoadError(msg)
    from mlx_lm.utils import sharded_load

    try:
        if local and mode == "tensor" and uneven_split(config, int(group.size())):
            return _load_by_head_groups(folder, group, tokenizer_config)
        model, tokenizer = sharded_load(
            str(folder) if local else path,
            pipeline_group=group if mode == "pipeline" else None,
            tensor_group=group if mode == "tensor" else None,
            tokenizer_config=tokenizer_config or {},
        )
    except ValueError as e:  # mlx-lm: "The model does not support ..."
        msg = f"mlx-lm could not shard {path!r} with distributed={mode!r}: {e}"
        raise ValueError(msg) from e
    except (ImportError, MemoryError):
        raise
    except Exception as e:
        msg = f"could not load this rank's shard of {path!r}: {e}"
        raise ModelLoadError(msg) from e
    return model, tokenizer

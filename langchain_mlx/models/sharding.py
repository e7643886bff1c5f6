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
    """Raise ValueError if mlx-lm cannot shard this model `mode`-wise over `size`."""
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
        if sizes and any(h % size for h in sizes):
            fits = [
                n for n in range(1, max(sizes) + 1) if all(h % n == 0 for h in sizes)
            ]
            msg = (
                f"{name!r} has {heads} attention heads and {kv_heads} key-value "
                f"heads; tensor parallelism gives every rank the same number of "
                f"each, so the group size must divide both (possible: "
                f"{', '.join(map(str, fits))}), but this group has {size} ranks. "
                "Launch a fitting number of ranks"
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

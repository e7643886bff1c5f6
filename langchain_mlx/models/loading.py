"""Load a model folder or Hugging Face id with mlx-lm; errors say what to fix.

:func:`load_model` first checks a local folder cheaply (``config.json``, the weight
files and their headers, the tokenizer files, the architecture), then calls
``mlx_lm.load``, and turns what still fails into
:class:`~langchain_mlx.engine.types.ModelLoadError` naming the path, what is
wrong and what to do, with the original error chained. Which step of
``mlx_lm.load`` failed (download, model, adapters, tokenizer) is read from the
traceback, so the message does not guess from the error text alone.

This module imports mlx only inside :func:`load_model`.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import traceback
from pathlib import Path
from typing import Any

from langchain_mlx.engine.types import ModelLoadError

__all__ = ["check_adapter_folder", "check_model_folder", "load_model"]

WEIGHTS_PATTERN = "model*.safetensors"
"""The only weight files ``mlx_lm.load`` reads."""
_INDEX = "model.safetensors.index.json"
_VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tiktoken.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_FOREIGN_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.gguf", "*.npz", "*.h5", "*.ckpt")
PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
"""How a model argument that is meant as a local path starts."""
_MAX_HEADER = 100 << 20  # the safetensors format's own limit
_CONVERT = (
    "pass a folder made by mlx_lm.convert (or `langchain-mlx models prepare`), "
    "or a Hugging Face repo id"
)


# ------------------------------------------------------------------ the entry point


def load_model(
    path: str,
    *,
    adapter_path: str | None = None,
    lazy: bool = False,
    tokenizer_config: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Return ``mlx_lm.load(path, ...)``'s ``(model, tokenizer)``.

    ``path`` is a local MLX model folder or a Hugging Face repo id;
    ``adapter_path`` an ``mlx_lm.lora`` output folder applied after loading.

    Raises:
        ModelLoadError: the folder, its weights, tokenizer or adapters cannot be
            loaded, or a hub id cannot be downloaded; the message says what is
            wrong and what to do, the cause is chained.
        ImportError: mlx or mlx-lm is not installed.

    """
    folder = Path(path).expanduser()
    local = folder.exists()
    if local:
        config = check_model_folder(folder)
    elif path.startswith(PATH_PREFIXES) or os.path.isabs(path):
        msg = f"model path {path!r} does not exist; {_CONVERT}"
        raise ModelLoadError(msg)
    if adapter_path is not None:
        check_adapter_folder(adapter_path)
    try:
        from mlx_lm import load
    except ImportError as e:
        msg = (
            f"cannot import mlx-lm to load {path!r} ({e}); install the MLX backend: "
            'pip install "langchain-mlx[cpu]" on Linux ([cuda] for NVIDIA), '
            "or mlx-lm on Apple silicon"
        )
        raise ImportError(msg) from e
    if local:
        _check_architecture(folder, config)
    try:
        model, tokenizer = load(
            str(folder) if local else path,
            tokenizer_config=tokenizer_config or {},
            adapter_path=adapter_path,
            lazy=lazy,
        )
    except (ImportError, MemoryError):
        raise  # not the folder's fault; their messages say what to install
    except Exception as e:
        raise _explain(path, folder if local else None, adapter_path, e) from e
    return model, tokenizer


# ------------------------------------------------------------------ cheap checks


def check_model_folder(folder: str | Path) -> dict[str, Any]:
    """Check a local model folder without loading it; return its ``config.json``.

    Checks that ``config.json`` is a JSON object with a ``model_type``, that
    ``model*.safetensors`` weights exist (all shards of an index) and are not
    truncated, and that tokenizer files are there. Does not import mlx.

    Raises:
        ModelLoadError: what is wrong and what to do.

    """
    folder = Path(folder).expanduser()
    where = f"model folder {str(folder)!r}"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        msg = f"{where} {what}; {_CONVERT}"
        raise ModelLoadError(msg)
    config = _read_config(folder, where)
    _check_weights(folder, where)
    _check_tokenizer_files(folder, where)
    return config


def check_adapter_folder(adapter_path: str | Path) -> None:
    """Check an ``mlx_lm.lora`` adapter folder without loading it.

    Raises:
        ModelLoadError: what is wrong and what to do.

    """
    folder = Path(adapter_path).expanduser()
    where = f"adapter folder {str(folder)!r}"
    fix = "pass the folder written by mlx_lm.lora (adapter_path / adapter_file)"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        msg = f"{where} {what}; {fix}"
        raise ModelLoadError(msg)
    config = folder / "adapter_config.json"
    if not config.is_file():
        msg = f"{where} has no adapter_config.json; {fix}"
        raise ModelLoadError(msg)
    _read_json_object(config, f"{where}: adapter_config.json", fix)
    weights = folder / "adapters.safetensors"
    if not weights.is_file():
        msg = f"{where} has no adapters.safetensors; {fix}"
        raise ModelLoadError(msg)
    _check_safetensors(weights, where, fix)


def _read_config(folder: Path, where: str) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        hint = _foreign_weights_hint(folder)
        msg = f"{where} has no config.json; {_CONVERT}{hint}"
        raise ModelLoadError(msg)
    fix = (
        "copy config.json again from the original model, or convert the model "
        "again with mlx_lm.convert"
    )
    config = _read_json_object(file, f"{where}: config.json", fix)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        got = "has no" if model_type is None else f"has an invalid ({model_type!r})"
        msg = (
            f"{where}: config.json {got} 'model_type' (a string such as \"llama\" "
            'or "qwen2"); mlx-lm picks the architecture from it. Add it, or '
            "convert the model again with mlx_lm.convert"
        )
        raise ModelLoadError(msg)
    return config


def _read_json_object(file: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{what} cannot be read ({e}); {fix}"
        raise ModelLoadError(msg) from e
    if not text.strip():
        msg = f"{what} is empty (an interrupted download or copy?); {fix}"
        raise ModelLoadError(msg)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        msg = (
            f"{what} is not valid JSON ({e.msg} at line {e.lineno} column "
            f"{e.colno}); {fix}"
        )
        raise ModelLoadError(msg) from e
    if not isinstance(value, dict):
        msg = f"{what} must hold a JSON object, got {_json_kind(value)}; {fix}"
        raise ModelLoadError(msg)
    return value


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _foreign_weights_hint(folder: Path) -> str:
    found = sorted(
        {p.name for pattern in _FOREIGN_WEIGHTS for p in folder.glob(pattern)}
    )
    if not found:
        return ""
    if any(name.endswith(".gguf") for name in found):
        return (
            f" (it holds {', '.join(found[:3])}: GGUF files are converted only for "
            "the models `langchain-mlx models list` names)"
        )
    return (
        f" (it holds {', '.join(found[:3])}, which mlx-lm does not read: convert "
        "the original model with mlx_lm.convert)"
    )


def _check_weights(folder: Path, where: str) -> None:
    fix = "download or convert the model again (mlx_lm.convert)"
    files = sorted(folder.glob(WEIGHTS_PATTERN))
    if not files:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if others:
            msg = (
                f"{where} has weights named {', '.join(others[:3])}, but mlx-lm "
                f"reads only files named {WEIGHTS_PATTERN}; rename them (e.g. "
                "model.safetensors) or convert the model with mlx_lm.convert"
            )
        else:
            hint = _foreign_weights_hint(folder)
            msg = f"{where} has no weights ({WEIGHTS_PATTERN} files); {fix}{hint}"
        raise ModelLoadError(msg)
    _check_shards(folder, where, {p.name for p in files}, fix)
    for file in files:
        _check_safetensors(file, where, fix)


def _check_shards(folder: Path, where: str, present: set[str], fix: str) -> None:
    try:
        index = json.loads((folder / _INDEX).read_text(encoding="utf-8"))
        listed = set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # mlx-lm does not read the index; nothing to compare against
    missing = sorted(str(name) for name in listed - present)
    if missing:
        msg = (
            f"{where} is missing weight file(s) {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} that {_INDEX} lists (an "
            f"incomplete download?); {fix}"
        )
        raise ModelLoadError(msg)


def _check_safetensors(file: Path, where: str, fix: str) -> None:
    """Check the header of a safetensors file against its size (no tensor read)."""
    bad = f"{where}: {file.name} is not a valid safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            raw = f.read(length) if 0 < length <= min(_MAX_HEADER, size - 8) else b""
    except OSError as e:
        msg = f"{bad}: it cannot be read ({e}); {fix}"
        raise ModelLoadError(msg) from e
    if not raw:
        what = "is empty" if size == 0 else "has no valid header"
        msg = f"{bad}: it {what} ({size} bytes; truncated or corrupt); {fix}"
        raise ModelLoadError(msg)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        msg = f"{bad}: its header is not JSON (corrupt file); {fix}"
        raise ModelLoadError(msg) from e
    try:
        end = max(
            (
                int(spec["data_offsets"][1])
                for name, spec in header.items()
                if name != "__metadata__"
            ),
            default=0,
        )
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
        msg = f"{bad}: its header does not describe tensors (corrupt file); {fix}"
        raise ModelLoadError(msg) from e
    needed = 8 + length + end
    if size < needed:
        msg = (
            f"{where}: {file.name} is truncated: it holds {size} bytes but its "
            f"header describes {needed} (an interrupted download or copy); {fix}"
        )
        raise ModelLoadError(msg)


def _check_tokenizer_files(folder: Path, where: str) -> None:
    if any((folder / name).is_file() for name in _VOCAB_FILES):
        return
    if (folder / "tokenizer_config.json").is_file() or any(folder.glob("*.tiktoken")):
        return  # some tokenizers need no vocabulary file; transformers decides
    msg = (
        f"{where} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
        "...); copy them from the original model (mlx_lm.convert copies them), "
        "or convert the model again"
    )
    raise ModelLoadError(msg)


def _check_architecture(folder: Path, config: dict[str, Any]) -> None:
    """Raise unless the installed mlx-lm has a module for the config's model type."""
    from mlx_lm import utils

    remap = getattr(utils, "MODEL_REMAPPING", None)
    by_arch = getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", None)
    if not isinstance(remap, dict) or not isinstance(by_arch, dict):
        return  # mlx-lm changed how it resolves types: let mlx_lm.load decide
    if (model_file := config.get("model_file")) is not None:
        msg = (
            f"model {str(folder)!r} needs its own Python code to build the model "
            f"(config.json names model_file {model_file!r}); langchain-mlx does not "
            "run code from model folders. Use a model of an architecture mlx-lm "
            "supports, or load it yourself with mlx_lm.load(..., "
            "trust_remote_code=True) and pass MLXPipeline(model=..., tokenizer=...)"
        )
        raise ModelLoadError(msg)
    model_type: str = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    candidates = {model_type, remap.get(model_type, model_type)}
    if isinstance(architectures, (list, tuple)):
        candidates |= {
            by_arch[(model_type, a)]
            for a in architectures
            if isinstance(a, str) and (model_type, a) in by_arch
        }
    if not any(_has_module(f"mlx_lm.models.{name}") for name in candidates):
        raise ModelLoadError(_unsupported(folder, model_type))


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _unsupported(path: Path | str, model_type: str) -> str:
    return (
        f"model {str(path)!r} has model_type {model_type!r}, which mlx-lm "
        f"{_mlx_lm_version()} does not support (it has no module "
        f"mlx_lm.models.{model_type}); upgrade mlx-lm if a newer release supports "
        "it, or use a model of a supported architecture (llama, qwen2, mistral, "
        "...; converted with mlx_lm.convert)"
    )


def _mlx_lm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlx-lm")
    except PackageNotFoundError:
        return "(version unknown)"


# ------------------------------------------------------------------ after a failure

_MISSING = re.compile(r"Missing (\d+) parameters")
_EXTRA = re.compile(r"Received (\d+) parameters not in model")
_SHAPE = re.compile(
    r"Expected shape (\(.*?\)) but received shape (\(.*?\)) for parameter (\S+)"
)


def _explain(
    path: str, folder: Path | None, adapter_path: str | None, error: Exception
) -> ModelLoadError:
    """A ModelLoadError for what ``mlx_lm.load`` raised, by the step that failed."""
    step = _failed_step(error)
    cause = _one_line(error)
    name = repr(str(folder) if folder is not None else path)
    if step == "_download" or (folder is None and _from_hub(error)):
        if type(error).__name__ == "HFValidationError":
            return ModelLoadError(
                f"model {path!r} is neither an existing folder nor a valid Hugging "
                f"Face repo id ('org/name'); {_CONVERT}"
            )
        return ModelLoadError(
            f"could not download model {path!r} from the Hugging Face Hub: "
            f"{cause.rstrip('.')}. "
            "Check the repo id and the network (HF_TOKEN for gated models); "
            "offline, pass a local folder made by mlx_lm.convert, a model already "
            "in the Hugging Face cache (with HF_HUB_OFFLINE=1), or a model from "
            "`langchain-mlx models list`"
        )
    if step == "load_adapters":
        return ModelLoadError(
            f"could not apply the adapters in {adapter_path!r} to model {name}: "
            f"{cause}; pass adapters trained with mlx_lm.lora for this model"
        )
    if step == "load_tokenizer":
        problem = _tokenizer_problem(folder) if folder is not None else None
        return ModelLoadError(
            f"could not load the tokenizer of model {name}: {problem or cause}; "
            "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) "
            "from the original model, or convert it again with mlx_lm.convert"
        )
    text = str(error)
    if isinstance(error, ValueError) and re.match(r"Model type .* not supported", text):
        model_type = text.removeprefix("Model type ").removesuffix(" not supported.")
        return ModelLoadError(_unsupported(folder or path, model_type))
    if mismatch := _mismatch(text):
        return ModelLoadError(
            f"the weights of model {name} do not match its config.json: {mismatch}. "
            "The config and the weights come from different models or "
            "conversions: restore the config.json that came with these weights, "
            "or convert the model again with mlx_lm.convert"
        )
    if isinstance(error, RuntimeError) and (
        "safetensor" in text or text.startswith("[read]")
    ):
        return ModelLoadError(
            f"the weights of model {name} are corrupt or truncated: {cause}; "
            "download or convert the model again"
        )
    if step == "load_model" and isinstance(error, (TypeError, KeyError, ValueError)):
        return ModelLoadError(
            f"mlx-lm {_mlx_lm_version()} cannot build model {name} from its "
            f"config.json: {cause}; the config is incomplete or was written by "
            "another tool: convert the model again with mlx_lm.convert"
        )
    return ModelLoadError(
        f"could not load model {name} with mlx-lm {_mlx_lm_version()}: {cause}; "
        f"{_CONVERT}"
    )


def _failed_step(error: BaseException) -> str:
    """The function ``mlx_lm.load`` called when ``error`` was raised ('' if unknown)."""
    frames = [f.f_code for f, _ in traceback.walk_tb(error.__traceback__)]
    for outer, inner in itertools.pairwise(frames):
        if outer.co_name == "load" and Path(outer.co_filename).parent.name == "mlx_lm":
            return inner.co_name
    return ""


def _from_hub(error: BaseException) -> bool:
    return any(
        type(e).__module__.startswith("huggingface_hub")
        for e in (error, error.__cause__, error.__context__)
        if e is not None
    )


def _mismatch(text: str) -> str | None:
    lines = [line.strip(" ,.") for line in text.splitlines()]
    names = [line for line in lines[1:] if line]
    shown = ", ".join(names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else ""
    )
    if m := _MISSING.match(text):
        return (
            f"{m[1]} parameter(s) the config describes are not in the weights ({shown})"
        )
    if m := _EXTRA.match(text):
        return (
            f"the weights hold {m[1]} parameter(s) the config does not describe "
            f"({shown})"
        )
    if m := _SHAPE.search(text):
        return (
            f"parameter {m[3].rstrip('.')} has shape {m[2]} in the weights, the "
            f"config expects {m[1]}"
        )
    return None


def _tokenizer_problem(folder: Path) -> str | None:
    for name in _TOKENIZER_JSON:
        file = folder / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{name} is not valid JSON ({_one_line(e)})"
    if not any((folder / name).is_file() for name in _VOCAB_FILES):
        return "it has no tokenizer.json (nor tokenizer.model, vocab.json, ...)"
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."

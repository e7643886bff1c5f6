"""Prefix KV cache: the KV state of recent requests, reused by later prompts.

An agent loop resends its whole conversation at every step (system prompt,
tools, history); re-reading it dominates the time on a local model. The engine
keeps the KV caches of finished requests keyed by their token sequence and
starts each new request from the longest cached prefix, prefilling only the rest.

Storage, lookup and eviction are mlx-lm's `LRUPromptCache` (a token trie, least
recently used first out, bounded by an entry count and a byte budget). This
module adds what the engine needs on top of it:

- At least one prompt token is always left to prefill, because the model must
  produce the logits of the first new token: the lookup is made on
  ``prompt[:-1]``.
- Caches that cannot be trimmed (recurrent state, a rotating window that has
  wrapped) are reused only when a stored sequence is an exact prefix of the
  prompt; `LRUPromptCache` checks `can_trim_prompt_cache` before trimming.
- Limits can change at run time; a limit of 0 turns reuse off.
- `shared_prefixes` finds prompts waiting together that start the same way
  (parallel branches of one agent, a batch under one system prompt), so the
  scheduler can prefill their common start once and serve all from the cache.
- Every entry owns evaluated copies of exactly the tokens it holds. A cache
  taken from a running batch is a lazy slice of the batch's KV buffer (and a
  `KVCache` has room for up to 255 more tokens): kept as is, each entry would
  keep a whole batch buffer alive while the byte budget counted only its slice.
- One prefix (e.g. a long system prompt and tool definitions) can be saved to a
  file and loaded in a later process, with its token ids and a fingerprint of
  the model in the file's metadata. Every way that fails (missing, damaged or
  foreign file, another model, a destination that cannot be written) raises
  `PromptCacheError` naming the file, what is wrong and what to do.

Everything here runs on the engine's worker thread (the class is not locked).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from langchain_mlx.engine.types import PromptCacheError

logger = logging.getLogger(__name__)

DEFAULT_ENTRIES = 10
DEFAULT_BYTES = 2 << 30  # 2 GiB

_KEY = "model"  # LRUPromptCache can hold several models; an engine has one
_FORMAT = "langchain-mlx-prefix/1"
_PREFILL_STEP = 512


PrefixCacheFileError = PromptCacheError  # its earlier name, for code that catches it


class PromptCacheNotFoundError(PromptCacheError, FileNotFoundError):
    """No saved prompt cache at the given path (also a `FileNotFoundError`)."""


class DiskTier(Protocol):
    """KV states kept on disk (disk_cache.py's `DiskPrefixCache`)."""

    def put(self, tokens: Sequence[int], held: list[Any]) -> None:
        """Write an evaluated state (in the background)."""

    def nearest(self, prompt: Sequence[int], trimmable: bool) -> tuple[str | None, int]:
        """The entry to start `prompt` from and how many of its tokens."""

    def load(self, key: str, model: Any) -> tuple[list[Any], list[int]] | None:
        """An entry's checked state and tokens (None: unusable, removed)."""

    def close(self) -> None:
        """Finish pending writes."""


class PrefixCache:
    """Recent KV caches keyed by token sequence; longest-prefix lookup, LRU out."""

    def __init__(
        self, entries: int = DEFAULT_ENTRIES, nbytes: int = DEFAULT_BYTES
    ) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self._lru = LRUPromptCache(max_size=max(entries, 0), max_bytes=max(nbytes, 0))
        self._budget = max(nbytes, 0)
        # set: the budget counts tokens held x this many bytes (`count_tokens`)
        self._token_bytes: int | None = None
        self.hits = 0
        """Lookups that reused at least one token."""
        self.misses = 0
        """Lookups that found nothing to reuse."""
        self.reused_tokens = 0
        """Prompt tokens not prefilled thanks to the cache, in total."""
        self.last_source: str | None = None
        """Where the last `fetch` found its tokens: "memory", "disk" or None."""
        self.disk: DiskTier | None = None
        self._model: Any = None  # to check states read from disk
        self._trimmable = True

    @property
    def enabled(self) -> bool:
        """Whether caches are kept at all (both limits above zero)."""
        return bool(self._lru.max_size > 0 and self._budget > 0)

    @property
    def entries(self) -> int:
        """How many caches are held now."""
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached KV states now."""
        return int(self._lru.nbytes)

    def set_limits(self, entries: int, nbytes: int) -> None:
        """Change the bounds, evicting least recently used caches to meet them."""
        self._budget = max(nbytes, 0)
        self._lru.max_size = max(entries, 0)
        self._lru.max_bytes = self._budget if self._token_bytes is None else 1 << 62
        self._lru.trim_to(n_sequences=self._lru.max_size, n_bytes=self._lru.max_bytes)
        self._evict_to_budget()

    def shrink_to(self, nbytes: int) -> None:
        """Drop least recently used entries until they hold at most `nbytes`.

        Memory pressure (the engine's KV budget), not a change of the limits.
        """
        while len(self._lru) and self.nbytes > nbytes:
            self._evict_one()

    def count_tokens(self, token_bytes: int) -> None:
        """Bound the cache by tokens held x `token_bytes`, not by measured bytes.

        For a sharded model: each rank holds a different share of the KV
        bytes, so byte budgets would evict (and then reuse) differently per
        rank; tokens held are the same on every rank.
        """
        self._token_bytes = max(int(token_bytes), 1)
        self.set_limits(self._lru.max_size, self._budget)

    @property
    def held_tokens(self) -> int:
        """Tokens held by all entries together."""
        return sum(
            len(tokens) for lru in self._lru._lru._lrus.values() for _, tokens in lru
        )

    def _evict_to_budget(self) -> None:
        """Counting tokens: drop least recently used entries until within budget."""
        if self._token_bytes is None:
            return
        while len(self._lru) and self.held_tokens * self._token_bytes > self._budget:
            self._evict_one()

    def _evict_one(self) -> None:
        """Drop the entry `LRUPromptCache` would evict next (mlx-lm 0.32's order)."""
        lru = self._lru
        model, tokens = lru._lru.pop()
        entry = lru._trie.pop(model, tokens)
        lru._n_bytes -= entry.nbytes
        lru._n_bytes_by_type[entry.cache_type] -= entry.nbytes

    def clear(self) -> None:
        """Drop every cached prefix."""
        self._lru.trim_to(n_sequences=0)

    def fetch(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the longest usable cached prefix of `prompt`.

        Returns the cache (`None` when nothing is reusable) and how many of the
        prompt's leading tokens it holds; that count is below ``len(prompt)``.
        """
        from mlx_lm.models.cache import trim_prompt_cache

        stored, cached = self._nearest(prompt)
        source = "memory"
        if self.disk is not None and self.enabled:
            key, on_disk = self.disk.nearest(prompt, self._trimmable)
            if key is not None and on_disk > cached and self._from_disk(key):
                stored, cached = self._nearest(prompt)
                source = "disk"
        self.last_source = None
        if stored is None or cached <= 0:
            self.misses += 1
            return None, 0
        self.last_source = source
        cache = copy.deepcopy(self._lru._trie.get(_KEY, stored).prompt_cache)
        self._touch(stored)
        if len(stored) > cached:
            trim_prompt_cache(cache, len(stored) - cached)
        if not _holds(cache, cached):
            self.misses += 1
            return None, 0
        self.hits += 1
        self.reused_tokens += cached
        return cache, cached

    def attach_disk(self, disk: DiskTier | None, model: Any) -> None:
        """Use `disk` as the tier below this one (None: none); closes the old one."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        if self.disk is not None and self.disk is not disk:
            self.disk.close()
        self.disk = disk
        self._model = model if disk is not None else None  # it holds the weights
        if disk is not None:
            self._trimmable = bool(can_trim_prompt_cache(make_prompt_cache(model)))

    def _from_disk(self, key: str) -> bool:
        """Read a disk entry into memory; False when it could not be used."""
        assert self.disk is not None
        loaded = self.disk.load(key, self._model)
        if loaded is None:
            return False
        cache, tokens = loaded
        if not self._fits(tokens, sum(int(c.nbytes) for c in cache)):
            return False
        self._lru.insert_cache(_KEY, tokens, cache, cache_type="user")
        self._evict_to_budget()
        return self._lru._trie.search(_KEY, tokens).exact is not None

    def _touch(self, tokens: list[int]) -> None:
        """A hit makes an entry the most recently used of its kind.

        `LRUPromptCache` orders entries by insertion only; its eviction takes
        the least recently *stored* entry, however often it is read.
        """
        order = self._lru._lru  # LRUPromptCache.CacheOrder (mlx-lm 0.32)
        for lru in order._lrus.values():
            if (_KEY, tokens) in lru:
                lru.remove((_KEY, tokens))
                lru.append((_KEY, tokens))
                return

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` `fetch` would reuse (no copy made)."""
        return self._nearest(prompt)[1]

    def _nearest(self, prompt: Sequence[int]) -> tuple[list[int] | None, int]:
        """The stored sequence to start `prompt` from, and how many tokens of it.

        As `LRUPromptCache.fetch_nearest_cache`, but one prompt token is always
        left to prefill: a stored copy of the whole prompt is trimmed by one, or
        (when it cannot be trimmed) a shorter stored prefix is used.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache

        if not self.enabled or len(prompt) < 2:
            return None, 0
        trie = self._lru._trie  # LRUPromptCache's own index (mlx-lm 0.32)
        tokens = list(prompt)

        def trimmable(stored: list[int]) -> bool:
            return bool(can_trim_prompt_cache(trie.get(_KEY, stored).prompt_cache))

        found = trie.search(_KEY, tokens)
        if found.exact is not None:
            if trimmable(tokens):
                return tokens, len(tokens) - 1
            found = trie.search(_KEY, tokens[:-1])
            if found.exact is not None:
                return tokens[:-1], len(tokens) - 1
        shorter = found.shorter or []
        if (
            found.longer is not None
            and found.common_prefix > len(shorter)
            and trimmable(found.longer)
        ):
            return found.longer, min(len(tokens) - 1, int(found.common_prefix))
        return (shorter, len(shorter)) if shorter else (None, 0)

    def store(
        self, tokens: Sequence[int], cache: Sequence[Any], *, kind: str = "assistant"
    ) -> None:
        """Keep a copy of `cache` (which holds exactly `tokens`) for later prompts.

        The copy is evaluated and owns exactly the tokens' KV state, whatever
        `cache` shares (a batch buffer, a file being read); `cache` itself is
        not kept. `kind` is `LRUPromptCache`'s cache type: "system" entries
        (saved prefixes) are evicted after "assistant" ones.
        """
        if self.enabled and tokens and cache and self._fits(tokens, used_bytes(cache)):
            self._insert(tokens, owned_copy(cache), kind)

    def _fits(self, tokens: Sequence[int], size: int) -> bool:
        """Whether an entry of `size` bytes can be kept at all.

        `LRUPromptCache` would first evict every other entry to make room, then
        the new one too. Checked before copying: a copy is as large as it.
        """
        if self._token_bytes is not None:
            size = len(tokens) * self._token_bytes
        if size > self._budget:
            logger.debug(
                "not caching %d tokens: %d bytes exceed the budget of %d",
                len(tokens),
                size,
                self._budget,
            )
            return False
        return True

    def _insert(self, tokens: Sequence[int], held: list[Any], kind: str) -> None:
        """Keep `held` (an `owned_copy`), keeping the priority of what it covers.

        A trimmable entry replaces the stored prefixes it extends; a saved
        ("system") prefix among them would lose its place (system entries go
        last) the first time a request that starts with it finishes. It stays
        an entry of its own instead.
        """
        if not self._fits(tokens, sum(int(c.nbytes) for c in held)):
            return
        tokens = list(tokens)
        kept = self._system_prefixes(tokens) if kind != "system" else []
        self._lru.insert_cache(_KEY, tokens, held, cache_type=kind)
        if self.disk is not None:
            try:
                self.disk.put(tokens, held)
            except Exception:  # costs the disk copy only
                logger.warning("could not queue a KV state for disk", exc_info=True)
        for prefix, entry in kept:
            if self._lru._trie.search(_KEY, prefix).exact is None:
                self._lru.insert_cache(
                    _KEY, prefix, entry.prompt_cache, cache_type="system"
                )
        self._evict_to_budget()

    def _system_prefixes(self, tokens: list[int]) -> list[tuple[list[int], Any]]:
        """The saved ("system") entries that are proper prefixes of `tokens`."""
        out = []
        for kind, lru in self._lru._lru._lrus.items():
            if kind != "system":
                continue
            for _, stored in lru:
                if len(stored) < len(tokens) and tokens[: len(stored)] == stored:
                    out.append((list(stored), self._lru._trie.get(_KEY, stored)))
        return out

    # -- persistence ----------------------------------------------------------

    def save(
        self, path: str | Path, model: Any, tokens: Sequence[int], *, name: str
    ) -> int:
        """Prefill `tokens` (reusing a cached prefix) and write the KV state to `path`.

        Returns how many tokens the file holds. The state is also kept in memory.
        The file is written next to its destination and then renamed over it,
        so a failed or interrupted save never leaves a damaged file behind.

        Raises:
            PromptCacheError: `path` is a folder, its folder does not exist or
                is not writable, or the file cannot be written.

        """
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

        tokens = list(tokens)
        if not tokens:
            msg = "nothing to save: the prefix has no tokens"
            raise ValueError(msg)
        file = _destination(path)  # before the prefill, which can take minutes
        cache, cached = self.fetch([*tokens, 0])  # reuse up to all of `tokens`
        if cache is None:
            cache = make_prompt_cache(model)
        with mx.stream(generation_stream):
            for start in range(cached, len(tokens), _PREFILL_STEP):
                chunk = mx.array(tokens[start : start + _PREFILL_STEP])
                model(chunk[None], cache=cache)
                mx.eval([c.state for c in cache])
        held = owned_copy(cache)  # also what is written: no room for more tokens
        metadata = {
            "format": _FORMAT,
            "model": name,
            "fingerprint": model_fingerprint(model),
            "tokens": json.dumps(tokens),
        }
        # Unique per thread; ends in the suffix mx.save_safetensors would append.
        writer = f"{os.getpid()}-{threading.get_ident()}"
        partial = file.with_name(f".{file.stem}.{writer}.partial.safetensors")
        try:
            save_prompt_cache(str(partial), held, metadata)
            partial.replace(file)
        except (OSError, RuntimeError) as e:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            msg = (
                f"cannot write the prompt cache to {str(file)!r} ({e}); check that "
                "the folder is writable and the disk has room, or pass another path"
            )
            raise PromptCacheError(msg) from e
        if self.enabled:
            self._insert(tokens, held, "system")
        return len(tokens)

    def load(self, path: str | Path, model: Any) -> list[int]:
        """Read a prefix written by `save` into this cache; return its token ids.

        The file is read at once: changing or deleting it later does not
        affect the cache.

        Raises:
            PromptCacheNotFoundError: there is no file at `path` (a
                `PromptCacheError` and a `FileNotFoundError`).
            PromptCacheError: `path` is a folder; the file is damaged, not a
                prompt cache saved by langchain-mlx, or was saved from a
                different model.

        """
        file = _safetensors_path(path)
        if _is_dir(Path(path)) or _is_dir(file):
            msg = (
                f"{str(path)!r} is a folder; pass the .safetensors file that "
                "save_prompt_cache wrote"
            )
            raise PromptCacheError(msg)
        if not os.path.lexists(file):
            msg = (
                f"no saved prompt cache at {str(file)!r}; save one first with "
                "save_prompt_cache, or check the path"
            )
            raise PromptCacheNotFoundError(msg)
        metadata = _read_metadata(file)
        tokens = _check_metadata(file, metadata, model)
        cache = _read_cache(file, model, len(tokens))
        if self.enabled:
            self._insert(tokens, cache, "system")
        return tokens

    def digest(self) -> tuple[int, int]:
        """What it holds, as every rank of a sharded model must agree on it."""
        return len(self._lru), self.held_tokens


def shared_prefixes(
    prompts: Sequence[Sequence[int]], min_tokens: int
) -> list[tuple[int, list[int]]]:
    """Groups of two or more prompts that share at least `min_tokens` leading tokens.

    Returns `(length, indices)` per group: the group's common prefix length
    (short of every member's last token, which its own request must prefill)
    and the members' positions in `prompts`. Groups are runs of the prompts in
    sorted order, so each prompt is in at most one group.
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = order[:1]
    length = 0
    for a, b in itertools.pairwise(order):
        n = common_length(
            prompts[a], prompts[b], min(len(prompts[a]), len(prompts[b])) - 1
        )
        if n >= min_tokens:
            length = min(length, n) if len(members) > 1 else n
            members.append(b)
            continue
        if len(members) > 1:
            groups.append((length, members))
        members = [b]
    if len(members) > 1:
        groups.append((length, members))
    return groups


def common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    limit = min(limit, len(a), len(b))
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def model_fingerprint(model: Any) -> str:
    """A short digest of a model's configuration and a sample of its weights."""
    from mlx.utils import tree_flatten

    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    digest = hashlib.sha256()
    digest.update(type(model).__module__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = tree_flatten(model.parameters())
    for _, array in (params[0], params[-1]) if params else ():
        digest.update(str(array.shape).encode())
        digest.update(json.dumps(array.reshape(-1)[:32].tolist()).encode())
    return digest.hexdigest()[:20]


def _holds(cache: list[Any], n_tokens: int) -> bool:
    """False when a KV cache's length visibly disagrees with its token count."""
    offset = getattr(cache[0], "offset", None) if cache else None
    if isinstance(offset, int) and offset != n_tokens:
        logger.warning(
            "discarding a cached prefix: it holds %d tokens, expected %d",
            offset,
            n_tokens,
        )
        return False
    return True


# -- owned copies ---------------------------------------------------------------


def owned_copy(cache: Sequence[Any]) -> list[Any]:
    """Evaluated copies of `cache`'s layers that own exactly the tokens they hold.

    What the caches handed to `store` are: `BatchGenerator.extract_cache`, a
    finished response's `prompt_cache` and `remove(..., return_prompt_caches=
    True)` give `KVCache`s whose arrays are lazy `mx.contiguous` slices of the
    batch's buffer, which keep that whole buffer alive until evaluated (and
    `mx.contiguous` keeps sharing a parent buffer up to 16 KB larger than the
    slice); a prefilled `KVCache` has room for up to 255 more tokens; arrays
    from `mx.load` are read from their file only when evaluated. Each copy is
    cut to the tokens held and written to a fresh buffer, so the layer's
    `nbytes` (what the byte budget adds up) is what it holds, but for the
    allocator's rounding (it may recycle a freed buffer up to two pages larger).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    held = [_owned_layer(layer) for layer in cache]
    states = tree_flatten([c.state for c in held])
    mx.eval([a for _, a in states if isinstance(a, mx.array)])
    return held


def used_bytes(cache: Sequence[Any]) -> int:
    """Bytes an `owned_copy` of `cache` would hold (no copy is made)."""
    from mlx.utils import tree_flatten

    total = 0
    for layer in cache:
        inner = getattr(layer, "caches", None)  # CacheList
        state = used_bytes(inner) if inner is not None else _used_state(layer)
        if isinstance(state, int):
            total += state
            continue
        total += sum(int(getattr(a, "nbytes", 0)) for _, a in tree_flatten(state))
    return total


def _owned_layer(layer: Any) -> Any:
    from mlx.utils import tree_map
    from mlx_lm.models.cache import CacheList

    if isinstance(layer, CacheList):
        return CacheList(*(_owned_layer(c) for c in layer.caches))
    held = copy.copy(layer)
    held.state = tree_map(_fresh, _used_state(layer))
    return held


def _used_state(layer: Any) -> Any:
    """`layer.state` with KV buffers cut to the positions in use.

    Only for the cache types whose layout is known; others are kept whole.
    """
    from mlx.utils import tree_map
    from mlx_lm.models.cache import (
        ChunkedKVCache,
        KVCache,
        QuantizedKVCache,
        RotatingKVCache,
    )

    state = layer.state
    kind = type(layer)
    if getattr(layer, "keys", None) is None:
        return state
    if kind in (KVCache, QuantizedKVCache):
        used = layer.offset
    elif kind is ChunkedKVCache:
        used = layer.offset - layer.start_position
    elif kind is RotatingKVCache and layer.offset == layer._idx:  # not wrapped
        used = layer._idx
    else:
        return state

    def cut(a: Any) -> Any:  # (batch, heads, positions, dims), quantized or not
        return a[..., :used, :] if a.shape[-2] > used else a

    keys, values, *rest = state
    return (tree_map(cut, keys), tree_map(cut, values), *rest)


def _fresh(x: Any) -> Any:
    """A new buffer of exactly `x`'s size (anything else passes through).

    Slicing shares the parent's buffer, and `mx.contiguous`, `astype` and
    `copy.deepcopy` may too; an elementwise op on an array that something else
    still holds (the caller's cache does) writes a buffer of its own.
    """
    import mlx.core as mx

    return x * mx.array(1, dtype=x.dtype) if isinstance(x, mx.array) else x


# -- files ----------------------------------------------------------------------


def _safetensors_path(path: str | Path) -> Path:
    # mx.save_safetensors appends the suffix when it is missing; load must agree.
    path = Path(path)
    return (
        path
        if path.suffix == ".safetensors"
        else path.with_name(path.name + ".safetensors")
    )


def _destination(path: str | Path) -> Path:
    """The file `save` writes for `path`, or why it cannot be written there."""
    file = _safetensors_path(path)
    if _is_dir(Path(path)) or _is_dir(file):
        msg = (
            f"{str(path)!r} is a folder; pass a file path in it, such as "
            f"{str(Path(path) / 'prefix.safetensors')!r}"
        )
        raise PromptCacheError(msg)
    folder = file.parent
    if not os.path.lexists(folder):
        msg = (
            f"cannot save the prompt cache to {str(file)!r}: the folder "
            f"{str(folder)!r} does not exist; create it first or pass another path"
        )
        raise PromptCacheError(msg)
    if not _is_dir(folder):
        msg = (
            f"cannot save the prompt cache to {str(file)!r}: {str(folder)!r} is a "
            "file, not a folder; pass a path in a folder"
        )
        raise PromptCacheError(msg)
    if not os.access(folder, os.W_OK | os.X_OK):
        msg = (
            f"cannot save the prompt cache to {str(file)!r}: the folder "
            f"{str(folder)!r} is not writable; pass a path in a folder you can "
            "write to"
        )
        raise PromptCacheError(msg)
    return file


def _is_dir(path: Path) -> bool:
    # Path.is_dir raises for some errors (a name too long); the write or read
    # that follows reports them with the path.
    try:
        return path.is_dir()
    except OSError:
        return False


def _read_metadata(file: Path) -> dict[str, str]:
    """The safetensors metadata of `file` (its arrays are not read yet)."""
    import mlx.core as mx

    try:
        loaded: Any = mx.load(str(file), return_metadata=True)
    except (OSError, RuntimeError, ValueError) as e:
        msg = (
            f"{str(file)!r} cannot be read as a prompt cache: it is not a complete "
            f"safetensors file ({e}); it may be truncated, damaged or another kind "
            "of file; save the prefix again with save_prompt_cache"
        )
        raise PromptCacheError(msg) from e
    return dict(loaded[1])


def _check_metadata(file: Path, metadata: dict[str, str], model: Any) -> list[int]:
    """The token ids a file saved by `save` holds, after checking its metadata.

    `save_prompt_cache` stores our metadata dict flattened under "0." (then the
    cache classes under "1.", the scalar types under "2.").
    """
    found = metadata.get("0.format")
    if found != _FORMAT:
        if found is not None and found.startswith(_FORMAT.rsplit("/", 1)[0]):
            what = f"it was saved by another version of langchain-mlx ({found!r})"
        else:
            what = (
                "it is a safetensors file that langchain-mlx's save_prompt_cache "
                f"did not write (format {found!r}, expected {_FORMAT!r})"
            )
        msg = (
            f"{str(file)!r} is not a prompt cache this version can load: {what}; "
            "save the prefix again with save_prompt_cache"
        )
        raise PromptCacheError(msg)
    if metadata.get("0.fingerprint") != model_fingerprint(model):
        msg = (
            f"{str(file)!r} was saved from model {metadata.get('0.model')!r}, "
            "whose weights or shape differ from this one; load it with that "
            "model, or save the prefix again with this one"
        )
        raise PromptCacheError(msg)
    try:
        tokens = json.loads(metadata["0.tokens"])
    except (KeyError, ValueError) as e:
        tokens = e
    if not (
        isinstance(tokens, list)
        and tokens
        and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    ):
        msg = (
            f"{str(file)!r} is damaged: its token ids (metadata 'tokens') are "
            "missing or not a list of integers; save the prefix again"
        )
        raise PromptCacheError(msg)
    return tokens


def read_cache_file(file: Path, model: Any, n_tokens: int) -> list[Any]:
    """A KV state file's contents, read now and checked (`PromptCacheError`)."""
    return _read_cache(file, model, n_tokens)


def _read_cache(file: Path, model: Any, n_tokens: int) -> list[Any]:
    """The KV state in `file`, read now and checked against the model and tokens."""
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

    malformed = (AttributeError, IndexError, KeyError, TypeError, ValueError)
    try:
        cache = owned_copy(load_prompt_cache(str(file)))
    except (*malformed, RuntimeError) as e:  # RuntimeError: MLX reading arrays
        msg = (
            f"{str(file)!r} is damaged: its arrays do not form a KV cache ({e!r}); "
            "save the prefix again"
        )
        raise PromptCacheError(msg) from e
    expected = [type(c).__name__ for c in make_prompt_cache(model)]
    layers = [type(c).__name__ for c in cache]
    if layers != expected:
        problem: str | None = (
            f"it has {len(layers)} cache layers ({', '.join(sorted(set(layers)))}), "
            f"the model {len(expected)} ({', '.join(sorted(set(expected)))})"
        )
    else:
        problem = next(filter(None, (_layer_problem(c, n_tokens) for c in cache)), None)
    if problem is not None:
        msg = f"{str(file)!r} is damaged: {problem}; save the prefix again"
        raise PromptCacheError(msg)
    return cache


def _layer_problem(layer: Any, n_tokens: int) -> str | None:
    """Why a loaded cache layer cannot hold `n_tokens` tokens (None: it can)."""
    import mlx.core as mx
    from mlx_lm.models.cache import CacheList

    if isinstance(layer, CacheList):
        problems = (_layer_problem(c, n_tokens) for c in layer.caches)
        return next(filter(None, problems), None)
    offset = getattr(layer, "offset", None)
    if isinstance(offset, int) and offset != n_tokens:
        return f"its KV state holds {offset} tokens, its metadata lists {n_tokens}"
    keys = getattr(layer, "keys", None)
    first = keys[0] if isinstance(keys, (list, tuple)) else keys
    if isinstance(first, mx.array) and first.shape[-2] < layer.size():
        return f"its key arrays hold {first.shape[-2]} positions of {layer.size()}"
    return None

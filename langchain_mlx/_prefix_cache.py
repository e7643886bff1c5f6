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
- One prefix (e.g. a long system prompt and tool definitions) can be saved to a
  file and loaded in a later process, with its token ids and a fingerprint of
  the model in the file's metadata.

Everything here runs on the engine's worker thread (the class is not locked).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_ENTRIES = 10
DEFAULT_BYTES = 2 << 30  # 2 GiB

_KEY = "model"  # LRUPromptCache can hold several models; an engine has one
_FORMAT = "langchain-mlx-prefix/1"
_PREFILL_STEP = 512


class PrefixCacheFileError(ValueError):
    """A saved prompt cache cannot be used with this model."""


class PrefixCache:
    """Recent KV caches keyed by token sequence; longest-prefix lookup, LRU out."""

    def __init__(
        self, entries: int = DEFAULT_ENTRIES, nbytes: int = DEFAULT_BYTES
    ) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self._lru = LRUPromptCache(max_size=max(entries, 0), max_bytes=max(nbytes, 0))
        self.hits = 0
        """Lookups that reused at least one token."""
        self.misses = 0
        """Lookups that found nothing to reuse."""
        self.reused_tokens = 0
        """Prompt tokens not prefilled thanks to the cache, in total."""

    @property
    def enabled(self) -> bool:
        """Whether caches are kept at all (both limits above zero)."""
        return bool(self._lru.max_size > 0 and self._lru.max_bytes > 0)

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
        self._lru.max_size = max(entries, 0)
        self._lru.max_bytes = max(nbytes, 0)
        self._lru.trim_to(n_sequences=self._lru.max_size, n_bytes=self._lru.max_bytes)

    def clear(self) -> None:
        """Drop every cached prefix."""
        self._lru.trim_to(n_sequences=0)

    def fetch(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the longest usable cached prefix of `prompt`.

        Returns the cache (`None` when nothing is reusable) and how many of the
        prompt's leading tokens it holds; that count is below ``len(prompt)``.
        """
        import copy

        from mlx_lm.models.cache import trim_prompt_cache

        stored, cached = self._nearest(prompt)
        if stored is None or cached <= 0:
            self.misses += 1
            return None, 0
        cache = copy.deepcopy(self._lru._trie.get(_KEY, stored).prompt_cache)
        if len(stored) > cached:
            trim_prompt_cache(cache, len(stored) - cached)
        if not _holds(cache, cached):
            self.misses += 1
            return None, 0
        self.hits += 1
        self.reused_tokens += cached
        return cache, cached

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
        self, tokens: Sequence[int], cache: list[Any], *, kind: str = "assistant"
    ) -> None:
        """Keep `cache` (which holds exactly `tokens`) for later prompts.

        `kind` is `LRUPromptCache`'s cache type: "system" entries (saved
        prefixes) are evicted after "assistant" ones.
        """
        if self.enabled and tokens and cache:
            self._lru.insert_cache(_KEY, list(tokens), cache, cache_type=kind)

    # -- persistence ----------------------------------------------------------

    def save(
        self, path: str | Path, model: Any, tokens: Sequence[int], *, name: str
    ) -> int:
        """Prefill `tokens` (reusing a cached prefix) and write the KV state to `path`.

        Returns how many tokens the file holds. The state is also kept in memory.
        """
        import mlx.core as mx
        from mlx_lm.generate import generation_stream
        from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

        tokens = list(tokens)
        if not tokens:
            msg = "nothing to save: the prefix has no tokens"
            raise ValueError(msg)
        cache, cached = self.fetch([*tokens, 0])  # reuse up to all of `tokens`
        if cache is None:
            cache = make_prompt_cache(model)
        with mx.stream(generation_stream):
            for start in range(cached, len(tokens), _PREFILL_STEP):
                chunk = mx.array(tokens[start : start + _PREFILL_STEP])
                model(chunk[None], cache=cache)
                mx.eval([c.state for c in cache])
        metadata = {
            "format": _FORMAT,
            "model": name,
            "fingerprint": model_fingerprint(model),
            "tokens": json.dumps(tokens),
        }
        save_prompt_cache(str(_safetensors_path(path)), cache, metadata)
        self.store(tokens, cache, kind="system")
        return len(tokens)

    def load(self, path: str | Path, model: Any) -> list[int]:
        """Read a prefix written by `save` into this cache; return its token ids.

        Raises:
            PrefixCacheFileError: the file is not a saved prefix, or was saved
                from a different model.

        """
        from mlx_lm.models.cache import load_prompt_cache

        file = _safetensors_path(path)
        if not file.is_file():
            msg = f"no saved prompt cache at {str(file)!r}; save one first"
            raise FileNotFoundError(msg)
        cache, metadata = load_prompt_cache(str(file), return_metadata=True)
        if metadata.get("format") != _FORMAT:
            msg = (
                f"{str(file)!r} is not a prompt cache saved by langchain-mlx "
                "(save_prompt_cache); save the prefix again with this version"
            )
            raise PrefixCacheFileError(msg)
        if metadata.get("fingerprint") != model_fingerprint(model):
            msg = (
                f"{str(file)!r} was saved from model {metadata.get('model')!r}, "
                "whose weights or shape differ from this one; save the prefix "
                "again with this model"
            )
            raise PrefixCacheFileError(msg)
        tokens = [int(t) for t in json.loads(metadata["tokens"])]
        if not _holds(cache, len(tokens)):
            msg = f"{str(file)!r} is damaged: its KV state does not match its tokens"
            raise PrefixCacheFileError(msg)
        self.store(tokens, cache, kind="system")
        return tokens


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


def _safetensors_path(path: str | Path) -> Path:
    # mx.save_safetensors appends the suffix when it is missing; load must agree.
    path = Path(path)
    return (
        path
        if path.suffix == ".safetensors"
        else path.with_name(path.name + ".safetensors")
    )

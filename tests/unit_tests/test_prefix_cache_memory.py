"""Prefix-cache memory and saved prompt caches, on the tiny random-weight model.

What a user notices: the prefix cache's byte budget is what it really holds
(entries taken from a running batch do not keep the batch's KV buffer alive), a
reused entry continues exactly as a fresh prefill would, and a saved prompt cache
that cannot be used raises `PromptCacheError` naming the file, what is wrong and
what to do. Everything runs mlx-lm's `BatchGenerator` and `PrefixCache` directly,
without the engine's worker thread.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from langchain_mlx.engine.prefix_cache import PrefixCache, PrefixCacheFileError
from langchain_mlx.engine.types import PromptCacheError

mx = pytest.importorskip("mlx.core")

LENGTHS = (40, 75, 110, 150, 190, 230, 270, 310)  # prompts of the batch
FINISHING = (5, 8, 11, 14)  # max_tokens of the first four; the rest keep running


@pytest.fixture(scope="module")
def loaded(tiny_model_path: str) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tokenizer = load(tiny_model_path)
    return model, tokenizer


@pytest.fixture(scope="module")
def model(loaded: tuple[Any, Any]) -> Any:
    return loaded[0]


@pytest.fixture(scope="module")
def model32(tiny_model_path: str) -> Any:
    """The tiny model in float32: a wrong KV state moves its logprobs by ~1e-3.

    (Its greedy tokens hardly depend on the prefix, and in bfloat16 one step of
    the format is 0.06: neither would tell a wrong cache from a right one.)
    """
    from mlx_lm import load

    model = load(tiny_model_path)[0]
    model.set_dtype(mx.float32)
    return model


def active_memory() -> int:
    """Bytes held by live MLX arrays (after freeing unreachable ones)."""
    gc.collect()
    mx.clear_cache()
    return int(mx.get_active_memory())


def prompt(i: int, n: int) -> list[int]:
    return [1000 + 13 * i + (7 * j) % 3000 for j in range(n)]


def fill_from_a_running_batch(model: Any, cache: PrefixCache) -> list[list[int]]:
    """Store 8 entries taken from a running batch; return their token sequences.

    Two are copied out of the batch while they keep running (`extract_cache`),
    two are removed from it with their caches, four finish and bring their
    cache in the response. Locals (and the generator) are gone on return.
    """
    from mlx_lm.generate import BatchGenerator

    stored: list[list[int]] = []

    def store(tokens: list[int], kv: list[Any]) -> None:
        # Drop the allocator's free buffers first: a copy may otherwise reuse
        # one up to two pages larger, which active memory would count.
        mx.clear_cache()
        cache.store(tokens, kv)
        stored.append(list(tokens))

    gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    uids = gen.insert(
        [prompt(i, n) for i, n in enumerate(LENGTHS)],
        max_tokens=[*FINISHING, 1000, 1000, 1000, 1000],
    )
    running = uids[len(FINISHING) :]
    for step in range(1, max(FINISHING) + 1):
        for r in gen.next_generated():
            if r.finish_reason is not None:
                store(r.all_tokens, r.prompt_cache)
        if step == 3:
            for kv, tokens in gen.extract_cache(running[:2]).values():
                store(tokens, kv)
        if step == 6:
            removed = gen.remove(running[2:], return_prompt_caches=True)
            for kv, tokens in removed.values():
                store(tokens, kv)
    gen.next_generated()  # the batch goes on after the last store
    return stored


def kv_bytes_per_token(model: Any) -> int:
    args = model.args
    head_dim = args.hidden_size // args.num_attention_heads
    itemsize = model.layers[0].self_attn.k_proj.weight.dtype.size
    return int(
        2 * args.num_hidden_layers * args.num_key_value_heads * head_dim * itemsize
    )


def continuation(
    model: Any, tokens: list[int], cache: list[Any] | None
) -> tuple[list[int], Any]:
    """Six greedy tokens after `tokens` (read on from `cache`), and their logprobs."""
    from mlx_lm.generate import generate_step

    steps = list(
        generate_step(mx.array(tokens), model, prompt_cache=cache, max_tokens=6)
    )
    return [int(token) for token, _ in steps], mx.stack([lp for _, lp in steps])


def assert_continues_like_a_fresh_prefill(
    model: Any, full: list[int], cache: list[Any] | None, cached: int
) -> None:
    tokens, logprobs = continuation(model, full[cached:], cache)
    fresh_tokens, fresh_logprobs = continuation(model, full, None)
    assert tokens == fresh_tokens
    assert mx.allclose(logprobs, fresh_logprobs, atol=1e-4).item()
    _, alone = continuation(model, full[cached:], None)  # the prefix matters
    assert not mx.allclose(alone, fresh_logprobs, atol=1e-4).item()


def test_entries_from_a_running_batch_hold_only_their_tokens(model: Any) -> None:
    cache = PrefixCache(entries=100, nbytes=1 << 40)
    before = active_memory()  # the model's weights and whatever else lives
    stored = fill_from_a_running_batch(model, cache)
    held = active_memory() - before

    assert cache.entries == len(stored) == len(LENGTHS)
    # Exactly the tokens held: no batch padding, no room for more tokens ...
    total_tokens = sum(len(tokens) for tokens in stored)
    assert cache.nbytes == total_tokens * kv_bytes_per_token(model)
    arrays = 0
    for tokens in stored:
        kv, cached = cache.fetch([*tokens, 0])  # shares the stored arrays
        assert kv is not None
        assert cached == len(tokens)
        for layer in kv:
            assert layer.keys.shape[2] == layer.values.shape[2] == len(tokens)
            arrays += layer.keys.nbytes + layer.values.nbytes
    assert arrays == cache.nbytes
    del kv, layer
    # ... and nothing else: before, 8 entries of 366 KB held 4.3 MB.
    assert cache.nbytes <= held <= cache.nbytes + 4096

    cache.clear()
    assert cache.nbytes == 0
    assert active_memory() - before <= 4096


def test_a_reused_entry_continues_like_a_fresh_prefill(model32: Any) -> None:
    cache = PrefixCache(entries=100, nbytes=1 << 40)
    stored = fill_from_a_running_batch(model32, cache)
    for i, tokens in enumerate(stored):
        full = [*tokens, *prompt(100 + i, 3)]
        kv, cached = cache.fetch(full)
        assert cached == len(tokens)
        assert_continues_like_a_fresh_prefill(model32, full, kv, cached)
    assert cache.hits == len(stored)


def test_an_oversized_entry_leaves_the_others_in_place(model: Any) -> None:
    cache = PrefixCache(entries=100, nbytes=1 << 40)
    stored = fill_from_a_running_batch(model, cache)
    kv, _ = cache.fetch([*stored[-1], 0])
    assert kv is not None
    nbytes = cache.nbytes
    cache.set_limits(100, nbytes)  # full
    over = kv * (nbytes // sum(layer.nbytes for layer in kv) + 1)
    cache.store(prompt(200, 5), over)  # LRUPromptCache would evict all, then it
    assert (cache.entries, cache.nbytes) == (len(stored), nbytes)


# -- saved prompt caches ----------------------------------------------------------


SYSTEM = prompt(7, 60)


@pytest.fixture
def saved(model: Any, tmp_path: Path) -> Path:
    path = tmp_path / "prefix.safetensors"
    assert PrefixCache().save(path, model, SYSTEM, name="tiny") == len(SYSTEM)
    return path


def test_a_saved_file_holds_the_tokens_and_is_read_at_load(
    model32: Any, tmp_path: Path
) -> None:
    saved = tmp_path / "prefix.safetensors"
    assert PrefixCache().save(saved, model32, SYSTEM, name="tiny") == len(SYSTEM)
    arrays = mx.load(str(saved))
    assert {a.shape[2] for a in arrays.values() if a.ndim == 4} == {len(SYSTEM)}
    assert list(tmp_path.iterdir()) == [saved]  # no partial file left

    cache = PrefixCache()
    assert cache.load(saved, model32) == SYSTEM
    assert cache.nbytes == len(SYSTEM) * kv_bytes_per_token(model32)
    with saved.open("r+b") as f:  # changing the file later changes nothing
        f.seek(saved.stat().st_size // 2)
        f.write(os.urandom(4096))
    full = [*SYSTEM, *prompt(9, 4)]
    kv, cached = cache.fetch(full)
    assert cached == len(SYSTEM)
    assert_continues_like_a_fresh_prefill(model32, full, kv, cached)


def test_missing_file(model: Any, tmp_path: Path) -> None:
    with pytest.raises(PromptCacheError, match=r"no saved prompt cache at .*missing"):
        PrefixCache().load(tmp_path / "missing", model)
    with pytest.raises(FileNotFoundError, match="save_prompt_cache"):
        PrefixCache().load(tmp_path / "missing.safetensors", model)


def test_a_folder_instead_of_a_file(model: Any, tmp_path: Path) -> None:
    (tmp_path / "d.safetensors").mkdir()
    for path in (tmp_path, tmp_path / "d", tmp_path / "d.safetensors"):
        with pytest.raises(PromptCacheError, match=r"is a folder; pass"):
            PrefixCache().load(path, model)
        with pytest.raises(PromptCacheError, match=r"is a folder; pass a file path"):
            PrefixCache().save(path, model, SYSTEM, name="tiny")
    assert not (tmp_path.parent / f"{tmp_path.name}.safetensors").exists()


def _truncated(saved: Path) -> bytes:
    return saved.read_bytes()[: saved.stat().st_size // 2]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda saved: b"", id="empty"),
        pytest.param(lambda saved: os.urandom(5000), id="random-bytes"),
        pytest.param(lambda saved: b"name,value\n" * 100, id="text"),
        pytest.param(_truncated, id="truncated"),
        pytest.param(lambda saved: saved.read_bytes()[:20], id="truncated-header"),
    ],
)
def test_not_a_safetensors_file(
    model: Any, saved: Path, content: Callable[[Path], bytes]
) -> None:
    bad = saved.with_name("bad.safetensors")
    bad.write_bytes(content(saved))
    with pytest.raises(PromptCacheError, match="not a complete safetensors file") as e:
        PrefixCache().load(bad, model)
    assert str(bad) in str(e.value)
    assert "save the prefix again" in str(e.value)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "did not write"),
        ({"format": "mlx"}, "did not write"),
        ({"0.model": "mlx-community/x", "1.0": "KVCache"}, "did not write"),
        ({"0.format": "langchain-mlx-prefix/0"}, "another version of langchain-mlx"),
    ],
)
def test_a_safetensors_file_we_did_not_write(
    model: Any, tmp_path: Path, metadata: dict[str, str], message: str
) -> None:
    path = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(path), {"x": mx.zeros((2, 3))}, metadata)
    with pytest.raises(PromptCacheError, match=message) as e:
        PrefixCache().load(path, model)
    assert str(path) in str(e.value)
    assert "save the prefix again with save_prompt_cache" in str(e.value)


def test_a_file_saved_from_another_model(
    saved: Path, other_tiny_model_path: str
) -> None:
    from mlx_lm import load

    other = load(other_tiny_model_path)[0]
    cache = PrefixCache()
    with pytest.raises(PrefixCacheFileError, match="saved from model 'tiny'") as e:
        cache.load(saved, other)
    assert isinstance(e.value, PromptCacheError)  # the old name is the same class
    assert "load it with that model" in str(e.value)
    assert cache.entries == 0


def _rewrite(
    path: Path, edit: Callable[[dict[str, Any], dict[str, str]], None]
) -> None:
    arrays, metadata = mx.load(str(path), return_metadata=True)
    mx.eval(list(arrays.values()))  # read before the file is rewritten
    edit(arrays, metadata)
    mx.save_safetensors(str(path), arrays, metadata)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(
            lambda a, m: m.update({"0.tokens": json.dumps([*SYSTEM, 5])}),
            "its KV state holds 60 tokens, its metadata lists 61",
            id="one-token-more",
        ),
        pytest.param(
            lambda a, m: m.update({"0.tokens": "[1, 2"}),
            "token ids .* missing or not a list of integers",
            id="not-json",
        ),
        pytest.param(
            lambda a, m: m.update({"0.tokens": '["a"]'}),
            "not a list of integers",
            id="not-integers",
        ),
        pytest.param(
            lambda a, m: m.pop("0.tokens"), "token ids .* missing", id="no-tokens"
        ),
        pytest.param(
            lambda a, m: a.update({"0.0": a["0.0"][:, :, :10]}),
            "its key arrays hold 10 positions of 60",
            id="short-arrays",
        ),
        pytest.param(
            lambda a, m: [a.pop(k) for k in [k for k in a if k.startswith("1.")]],
            "its arrays do not form a KV cache",
            id="missing-layer",
        ),
        pytest.param(
            lambda a, m: m.update({"1.1": "RotatingKVCache"}),
            "its arrays do not form a KV cache",
            id="other-layer-type",
        ),
    ],
)
def test_metadata_that_does_not_match_the_arrays(
    model: Any, saved: Path, edit: Callable[..., Any], message: str
) -> None:
    _rewrite(saved, edit)
    cache = PrefixCache()
    with pytest.raises(PromptCacheError, match=message) as e:
        cache.load(saved, model)
    assert f"{str(saved)!r} is damaged" in str(e.value)
    assert cache.entries == 0


def test_a_destination_that_cannot_be_written(model: Any, tmp_path: Path) -> None:
    cache = PrefixCache()
    with pytest.raises(PromptCacheError, match=r"folder '.*nowhere' does not exist"):
        cache.save(tmp_path / "nowhere" / "p.safetensors", model, SYSTEM, name="t")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PromptCacheError, match=r"'.*file' is a file, not a folder"):
        cache.save(tmp_path / "file" / "p.safetensors", model, SYSTEM, name="t")
    assert cache.hits == cache.misses == 0  # checked before the prefill
    with pytest.raises(PromptCacheError, match="cannot write the prompt cache to"):
        cache.save(tmp_path / ("x" * 300), model, SYSTEM, name="t")  # name too long
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # no partial file left


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere"
)
def test_a_read_only_folder(model: Any, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PromptCacheError, match="is not writable"):
            PrefixCache().save(folder / "p", model, SYSTEM, name="t")
    finally:
        folder.chmod(0o700)

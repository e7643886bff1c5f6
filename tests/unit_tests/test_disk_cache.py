"""The prefix cache's disk tier: KV states that survive the process.

On the tiny random-weight model (float32, so a wrong KV state would change the
greedy answer): a restarted process starts from disk with the same answer as
a cold run; damaged, foreign or unwritable folders cost reuse only, never an
answer or an exception; the folder stays inside its byte budget.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from langchain_mlx import ChatMLX
from tests.tiny_models import write_tiny_model

SYSTEM = "You are a careful assistant for a shipping company. " * 12
QUESTION = "Where is parcel 1234?"


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("disk") / "tiny-f32"
    return str(write_tiny_model(folder, dtype="float32"))


def ask(model: str, folder: Path | None, **kwargs: Any) -> Any:
    """One chat turn in a fresh engine (the process 'restarts' each time)."""
    chat = ChatMLX(
        model=model,
        max_tokens=12,
        prefix_cache_dir=str(folder) if folder else None,
        **kwargs,
    )
    engine = chat.llm.engine
    try:
        return chat.invoke([("system", SYSTEM), ("human", QUESTION)])
    finally:
        chat.close()
        engine.wait_closed()  # the disk writes have landed


def read_from(message: Any) -> tuple[int, str | None]:
    details = (message.usage_metadata or {}).get("input_token_details") or {}
    return details.get("cache_read", 0), message.response_metadata["cache_read_from"]


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.json"))


def test_a_restart_starts_from_disk_with_the_cold_answer(
    tiny32: str, tmp_path: Path
) -> None:
    cold = ask(tiny32, None)
    first = ask(tiny32, tmp_path)
    assert read_from(first) == (0, None)
    assert entries(tmp_path)  # written when the first process closed
    again = ask(tiny32, tmp_path)
    cached, source = read_from(again)
    prompt = again.usage_metadata["input_tokens"]
    assert source == "disk" and prompt - 1 <= cached < prompt
    assert again.content == cold.content == first.content


def test_a_new_process_reads_the_folder(tiny32: str, tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import json
        from langchain_mlx import ChatMLX
        chat = ChatMLX(model={tiny32!r}, max_tokens=12)
        reply = chat.invoke([("system", {SYSTEM!r}), ("human", {QUESTION!r})])
        details = reply.usage_metadata.get("input_token_details") or {{}}
        print(json.dumps([reply.content, details.get("cache_read", 0),
                          reply.response_metadata["cache_read_from"]]))
        engine = chat.llm.engine
        chat.close()
        engine.wait_closed()  # the disk writes land before the process exits
        """
    )
    env = {**os.environ, "LANGCHAIN_MLX_PREFIX_CACHE_DIR": str(tmp_path)}

    def run() -> list[Any]:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True,
            env=env, check=True, timeout=300,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    first, second = run(), run()  # the environment variable sets the folder
    assert first[1:] == [0, None]
    assert second[0] == first[0] and second[2] == "disk" and second[1] > 0


def test_damaged_entries_are_skipped_removed_and_warned_once(
    tiny32: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cold = ask(tiny32, tmp_path)
    for sidecar in entries(tmp_path):  # every kind of damage, one per entry
        state = sidecar.with_name(sidecar.name[: -len(".json")] + ".kv.safetensors")
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    caplog.set_level(logging.WARNING, logger="langchain_mlx.engine.disk_cache")
    again = ask(tiny32, tmp_path)
    assert again.content == cold.content
    assert read_from(again)[1] != "disk"
    warned = [r for r in caplog.records if "ignoring and removing" in r.message]
    assert len(warned) == 1  # the damaged entry, once
    # the damaged one is gone; the new run wrote a good one in its place
    third = ask(tiny32, tmp_path)
    assert read_from(third)[1] == "disk" and third.content == cold.content


def test_a_sidecar_that_is_not_json_or_another_format_is_ignored(
    tiny32: str, tmp_path: Path
) -> None:
    cold = ask(tiny32, tmp_path)
    (sidecar,) = entries(tmp_path)
    body = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**body, "format": "langchain-mlx-kv/0"}))
    assert ask(tiny32, tmp_path).content == cold.content
    assert not sidecar.with_name(sidecar.name[:-5] + ".kv.safetensors").exists() or (
        json.loads(sidecar.read_text())["format"] != "langchain-mlx-kv/0"
    )


def test_another_model_reads_nothing_from_the_folder(
    tiny32: str, tmp_path: Path
) -> None:
    ask(tiny32, tmp_path)
    # a fresh folder of its own: its engine is new, whatever ran before
    other_model = write_tiny_model(tmp_path / "m" / "other", hidden_size=32, seed=1)
    other = ask(str(other_model), tmp_path)
    assert read_from(other) == (0, None)
    assert len({p.parent for p in entries(tmp_path)}) == 2  # one folder per model


def test_the_folder_stays_inside_its_budget(tiny32: str, tmp_path: Path) -> None:
    ask(tiny32, tmp_path)
    (one,) = entries(tmp_path)
    size = json.loads(one.read_text())["bytes"]
    budget = int(2.5 * size)
    for i in range(5):  # five different conversations
        chat = ChatMLX(
            model=tiny32, max_tokens=4, prefix_cache_dir=str(tmp_path),
            prefix_cache_disk_bytes=budget,
        )  # fmt: skip
        chat.invoke([("system", SYSTEM), ("human", f"Question {i}: {QUESTION}")])
        engine = chat.llm.engine
        chat.close()
        engine.wait_closed()  # written and evicted
        held = sum(json.loads(p.read_text())["bytes"] for p in entries(tmp_path))
        assert held <= budget


def test_a_folder_that_cannot_be_written_turns_the_tier_off(
    tiny32: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    caplog.set_level(logging.WARNING, logger="langchain_mlx.engine.disk_cache")
    cold = ask(tiny32, None)
    reply = ask(tiny32, blocked)
    assert reply.content == cold.content
    assert [r for r in caplog.records if "turned off" in r.message]


def test_two_processes_share_one_folder(tiny32: str, tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from langchain_mlx import ChatMLX
        chat = ChatMLX(model={tiny32!r}, max_tokens=12,
                       prefix_cache_dir={str(tmp_path)!r})
        for i in range(4):
            reply = chat.invoke([("system", {SYSTEM!r}), ("human", f"Q{{i}}")])
            print(repr(reply.content), flush=True)
        engine = chat.llm.engine
        chat.close()
        engine.wait_closed()
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1]  # the same answers, whoever read what

"""A sharded model under a small prefix-cache budget keeps every rank in step.

The tiny model (float32, 6 heads in 3 key-value groups) is split by head groups
over 2 ranks: rank 0 holds two groups, rank 1 one, so their KV bytes differ.
Byte budgets would evict different entries on each rank, which would then
reuse different prefixes and run different passes; the engine bounds a
sharded model's prefix cache in tokens (the same on every rank). Two
conversations take turns under a budget of about two turns, and the replies
and cache reuse equal a single process's.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration_tests.test_distributed import (
    WAIT,
    assert_all_ranks_exited_cleanly,
    launch,
)
from tests.tiny_models import write_tiny_model

APP = Path(__file__).with_name("distributed_conversation.py")
BUDGET = 200_000  # bytes: about two turns of the tiny model's KV state


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("dist") / "tiny-f32-3-groups"
    return str(write_tiny_model(folder, hidden_size=96, dtype="float32"))


def test_a_small_prefix_cache_keeps_uneven_ranks_in_step(
    uneven: str, tmp_path: Path
) -> None:
    import json

    single_out = tmp_path / "single.json"
    subprocess.run(
        [sys.executable, str(APP), uneven, "none", str(single_out), str(BUDGET)],
        check=True,
        timeout=WAIT,
    )
    single: dict[str, Any] = json.loads(single_out.read_text())
    out = tmp_path / "sharded.json"
    sharded, log = launch(uneven, "tensor", out, str(BUDGET), app=APP)
    assert_all_ranks_exited_cleanly(log)
    assert sharded is not None, log[-3000:]
    assert sharded["sharded"] == [0, 2]
    cached = [t["cached"] for t in single["turns"]]
    second = cached[1::2]  # a conversation's reuse falls back: its turn was evicted
    assert any(later < earlier for earlier, later in itertools.pairwise(second))
    assert sharded["turns"] == single["turns"]

"""ChatMLX on a model sharded over 2 ranks (MLX ring backend on loopback).

The same app script (`distributed_app.py`) runs plainly and under
`mlx.launch --backend ring -n 2`; rank 0 writes what it got and the results
are compared. Float32 weights (the tiny model) and pipeline parallelism
(whole layers per rank) give the same sums as one process, so greedy text is
identical; tensor parallelism on bf16 weights adds partial sums in another
order, which can flip a near-tie (checked on the forced tool call and the
answer's start).

Failures are driven by events, not timing: rank 0 answers once, prints
READY and waits on stdin; the test kills a rank and then lets rank 0 go on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from langchain_mlx.models.prepare import prepare_model
from tests.tiny_models import write_tiny_model

APP = Path(__file__).with_name("distributed_app.py")
BIN = Path(sys.executable).parent
WAIT = 600  # safety bound for a whole run on a loaded 2-core machine


def _free_ports(n: int) -> int:
    """A starting port with `n` free ports after it (the ring uses consecutive ones)."""
    for _ in range(100):
        start = random.randint(20000, 40000)
        try:
            for p in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return start
    raise RuntimeError("no free ports")


def run_plain(model: str, out: Path, *flags: str) -> dict[str, Any]:
    subprocess.run(
        [sys.executable, str(APP), model, "none", str(out), *flags],
        check=True,
        timeout=WAIT,
    )
    return json.loads(out.read_text())


def launch(
    model: str, mode: str, out: Path, *flags: str, n: int = 2, app: Path = APP
) -> tuple[dict[str, Any] | None, str]:
    """Run the app under mlx.launch; (rank 0's results or None, launcher output)."""
    proc = subprocess.run(
        [
            str(BIN / "mlx.launch"),
            "--verbose",
            "--backend",
            "ring",
            "-n",
            str(n),
            "--starting-port",
            str(_free_ports(n)),
            "--python",
            sys.executable,
            str(app),
            model,
            mode,
            str(out),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    log = proc.stdout + proc.stderr
    return (json.loads(out.read_text()) if out.exists() else None), log


def assert_all_ranks_exited_cleanly(log: str, n: int = 2) -> None:
    # mlx.launch exits 0 even when a rank fails: read what it says of each rank
    for rank in range(n):
        assert f"Node with rank {rank} completed" in log, log[-3000:]


def launch_ok(model: str, mode: str, out: Path, *flags: str) -> dict[str, Any]:
    """Rank 0's results of a run in which every rank ended cleanly."""
    result, log = launch(model, mode, out, *flags)
    assert_all_ranks_exited_cleanly(log)
    assert result is not None, log[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("dist") / "tiny-f32"
    return str(write_tiny_model(folder, hidden_size=64, dtype="float32"))


def test_tiny_tensor_matches_one_process(tiny32: str, tmp_path: Path) -> None:
    single = run_plain(tiny32, tmp_path / "single.json")
    sharded = launch_ok(tiny32, "tensor", tmp_path / "tensor.json")
    assert single.pop("sharded") is None
    assert sharded.pop("sharded") == [0, 2]
    assert sharded == single  # every answer, usage, cache reuse, finish counts
    assert sharded["largest_batch"] == 4  # four concurrent requests, one batch
    assert sharded["tool_calls"][0]["name"] == "get_weather"
    assert sharded["structured"]["capital"] in {"Paris", "Rome", "Madrid"}
    assert sharded["again_usage"]["cached"] > 0  # the prefix cache, sharded
    assert sharded["cancelled"] == 1  # and the engine went on after it


def test_qwen_pipeline_matches_one_process(tmp_path: Path) -> None:
    # The one sharded Qwen run (a launch costs minutes here). Pipeline stages
    # hold whole layers, so every answer must equal one process's: a superset of
    # what a tensor run could check (there bf16 near-ties may flip; tensor
    # sharding is covered by the tiny model exactly and by SmolLM2).
    qwen = str(prepare_model("qwen2.5-coder-0.5b-instruct"))
    single = run_plain(qwen, tmp_path / "single.json", "--quick")
    sharded = launch_ok(qwen, "pipeline", tmp_path / "pipe.json", "--quick")
    assert single.pop("sharded") is None
    assert sharded.pop("sharded") == [0, 2]
    assert sharded == single  # invoke, usage, stream, batch, tool call, seeded
    assert "Paris" in str(sharded["invoke"])
    assert sharded["tool_calls"] == [{"name": "get_weather", "args": {"city": "Paris"}}]
    assert sharded["largest_batch"] == 4  # four concurrent requests, one batch


def test_smollm2_tensor_over_two_ranks_by_head_groups(tmp_path: Path) -> None:
    # 9 heads, 3 key-value heads: mlx-lm's split cannot, head groups (6+2, 3+1) can
    smollm2 = str(prepare_model("smollm2-135m-instruct"))
    single = run_plain(smollm2, tmp_path / "single.json", "--quick")
    sharded = launch_ok(smollm2, "tensor", tmp_path / "tensor.json", "--quick")
    assert sharded["invoke"] == single["invoke"] == "The capital of France is Paris."
    assert sharded["stream"] == sharded["invoke"]
    assert sharded["tool_calls"] == single["tool_calls"]
    assert sharded["largest_batch"] == 4
    # near-ties in bf16 may flip later tokens of some batched answers
    same = sum(a == b for a, b in zip(sharded["batch"], single["batch"], strict=True))
    assert same >= 2, (sharded["batch"], single["batch"])


def test_a_mode_the_model_lacks_fails_on_every_rank(tmp_path: Path) -> None:
    smollm2 = str(prepare_model("smollm2-135m-instruct"))
    result, log = launch(smollm2, "pipeline", tmp_path / "y.json", "--quick")
    assert result is None
    assert log.count("CONSTRUCT-ERROR") == 2  # both ranks, before any weight
    assert "it can shard it by 'tensor'" in log


def _ranks(
    model: str, tmp_path: Path, *flags: str, n: int = 2
) -> list[subprocess.Popen[str]]:
    """Start the ranks by hand (as mlx.launch does), to kill one of them."""
    start = _free_ports(n)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{start + i}"] for i in range(n)]))
    procs = []
    for rank in range(n):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(APP),
                    model,
                    "tensor",
                    str(tmp_path / "o"),
                    *flags,
                ],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:
        seen += line
        if line.startswith(marker):
            return seen
    raise AssertionError(f"{marker!r} never came:\n{seen[-3000:]}")


def test_a_dead_rank_gives_rank_0_a_clear_error(tiny32: str, tmp_path: Path) -> None:
    rank0, rank1 = _ranks(tiny32, tmp_path, "--failure")
    try:
        _read_until(rank0, "READY")
        rank1.send_signal(signal.SIGKILL)
        rank1.wait(timeout=WAIT)
        assert rank0.stdin is not None
        rank0.stdin.write("go\n")
        rank0.stdin.flush()
        out, _ = rank0.communicate(timeout=WAIT)
    finally:
        for p in (rank0, rank1):
            p.kill()
    second = next(line for line in out.splitlines() if line.startswith("SECOND"))
    third = next(line for line in out.splitlines() if line.startswith("THIRD"))
    assert "DistributedError" in second and "lost the group" in second, out
    assert "DistributedError" in third, out  # the engine stays stopped
    assert rank0.returncode == 0


def test_other_ranks_exit_when_rank_0_dies(tiny32: str, tmp_path: Path) -> None:
    rank0, rank1 = _ranks(tiny32, tmp_path, "--failure")
    try:
        _read_until(rank0, "READY")
        rank0.send_signal(signal.SIGKILL)
        rank1.wait(timeout=WAIT)
    finally:
        for p in (rank0, rank1):
            p.kill()
    assert rank1.returncode == 1  # the group broke: not a clean end


def test_forming_the_group_times_out(tiny32: str, tmp_path: Path) -> None:
    # a hostfile of 2 ranks, only rank 0 started: MLX would wait forever
    start = _free_ports(2)
    hosts = tmp_path / "hosts2.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{start}"], [f"127.0.0.1:{start + 1}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}
    proc = subprocess.run(
        [sys.executable, str(APP), tiny32, "tensor", str(tmp_path / "o"),
         "--timeout=3"],
        env=env, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "rank 0 could not form the MLX distributed group within 3 s" in proc.stderr
    assert "mlx.launch" in proc.stderr

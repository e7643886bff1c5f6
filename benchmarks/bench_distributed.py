"""One process vs the model sharded over 2 ranks (MLX ring on loopback).

    python benchmarks/bench_distributed.py [--model qwen2.5-coder-0.5b-instruct]

Runs the same app three times in one go: plainly, then as 2 ranks of the ring
backend on loopback (started as `mlx.launch --backend ring -n 2` starts them)
with `distributed="tensor"` and with `distributed="pipeline"`. Each measures one answer (prompt tokens/s, generated
tokens/s), four concurrent answers (total generated tokens/s) and every
rank's memory (active after loading, peak while answering, as each rank logs
it). Writes `results/distributed.{json,md}`.

On this 2-core machine both ranks share the two cores and talk over
loopback, so sharding is slower here: what it buys is memory per rank (each
holds about half the weights), which is what lets a model that does not fit
one machine run on several.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

PROMPT = (
    "Explain in two sentences what a hash map is and when a programmer "
    "should prefer it over a sorted list."
)
QUESTIONS = [
    "What is a linked list?",
    "What is a binary tree?",
    "What is recursion?",
    "What is a stack?",
]
MEMORY = re.compile(
    r"rank (\d+) of (\d+) (loaded its part of the model|stops): "
    r"([\d.]+) MB active, ([\d.]+) MB peak"
)


def app(model: str, mode: str, tokens: int) -> None:
    """Runs on every rank; rank 0 (or the only process) prints RESULT."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import mlx.core as mx

    from langchain_mlx import ChatMLX

    chat = ChatMLX(
        model=model,
        max_tokens=tokens,
        distributed=None if mode == "none" else mode,  # type: ignore[arg-type]
    )
    loaded = mx.get_active_memory() / 1e6
    chat.invoke("Hi")  # warm-up (compiles, sizes the prefill step)
    tic = time.perf_counter()
    one = chat.invoke(PROMPT)
    one_s = time.perf_counter() - tic
    tic = time.perf_counter()
    many = chat.batch(QUESTIONS)
    many_s = time.perf_counter() - tic
    meta = one.response_metadata
    result = {
        "mode": mode,
        "loaded_mb": loaded,
        "peak_mb": mx.get_peak_memory() / 1e6,
        "prompt_tokens": (one.usage_metadata or {}).get("input_tokens"),
        "prompt_tps": meta["prompt_tokens_per_second"],
        "generation_tps": meta["generation_tokens_per_second"],
        "one_s": one_s,
        "batch_tokens": sum(
            (m.usage_metadata or {}).get("output_tokens", 0) for m in many
        ),
        "batch_s": many_s,
        "text": one.content,
    }
    print("RESULT", json.dumps(result), flush=True)
    chat.close()


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def run(model: str, mode: str, tokens: int) -> dict:
    """One run; the ranks are started as `mlx.launch --backend ring` starts them.

    (Not through mlx.launch itself: its output relay polls an always-writable
    stdin pipe and keeps most of a core busy, a cost of the launcher, not of
    the sharded engine, that a 2-core machine cannot spare.)
    """
    me = [sys.executable, str(Path(__file__).resolve()), "--app", mode,
          "--model", model, "--tokens", str(tokens)]  # fmt: skip
    if mode == "none":
        proc = subprocess.run(me, capture_output=True, text=True, timeout=3600)
        out = proc.stdout + proc.stderr
    else:
        with tempfile.TemporaryDirectory() as tmp:
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _ports(2)]))
            ranks = [
                subprocess.Popen(
                    me,
                    env={
                        **os.environ,
                        "MLX_RANK": str(r),
                        "MLX_HOSTFILE": str(hostfile),
                    },
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for r in range(2)
            ]
            out = "".join(p.communicate(timeout=3600)[0] for p in ranks)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{mode}: no result\n{out[-4000:]}")
    result = json.loads(line[len("RESULT ") :])
    ranks: dict[int, dict[str, float]] = {}
    for m in MEMORY.finditer(out):
        rank = ranks.setdefault(int(m.group(1)), {})
        if m.group(3).startswith("loaded"):
            rank["loaded_mb"] = float(m.group(4))
        else:
            rank["peak_mb"] = float(m.group(5))
    ranks.setdefault(0, {}).update(
        loaded_mb=result["loaded_mb"], peak_mb=result["peak_mb"]
    )
    result["ranks"] = {str(k): v for k, v in sorted(ranks.items())}
    return result


def table(model: str, tokens: int, results: list[dict]) -> str:
    base = results[0]
    rows = [
        f"Model `{model}` (bf16), {base['prompt_tokens']} prompt tokens, up to "
        f"{tokens} generated, greedy; 4 concurrent answers of up to {tokens} "
        f"tokens; {platform.system()} {platform.machine()}, 2 cores shared by "
        "both ranks, ring backend over loopback.",
        "",
        "| run | ranks | memory per rank after loading | peak per rank | "
        "prompt tok/s | generation tok/s | 4 concurrent, tok/s | vs 1 process (generation) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mem = " / ".join(f"{v['loaded_mb']:.0f} MB" for v in r["ranks"].values())
        peak = " / ".join(
            f"{v.get('peak_mb', float('nan')):.0f} MB" for v in r["ranks"].values()
        )
        batch_tps = r["batch_tokens"] / r["batch_s"]
        name = "one process" if r["mode"] == "none" else f'`distributed="{r["mode"]}"`'
        rows.append(
            f"| {name} | {len(r['ranks'])} | {mem} | {peak} | {r['prompt_tps']:.2f} | "
            f"{r['generation_tps']:.2f} | {batch_tps:.2f} | "
            f"{r['generation_tps'] / base['generation_tps']:.2f}× |"
        )
    same = all(r["text"] == base["text"] for r in results)
    rows += ["", f"Same greedy answer in all three runs: {'yes' if same else 'no'}."]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--app", choices=["none", "tensor", "pipeline"])
    args = parser.parse_args()
    if args.app:
        app(args.model, args.app, args.tokens)
        return
    from langchain_mlx.models.prepare import resolve_model

    path = resolve_model(args.model)
    results = [run(path, mode, args.tokens) for mode in ("none", "tensor", "pipeline")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(results, indent=1))
    md = table(args.model, args.tokens, results)
    (RESULTS / "distributed.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()

"""ChatMLX.stream vs raw mlx_lm.stream_generate: same model, prompt, settings, one run.

The prefix cache is off (the same prompt repeats). Measures, from the caller's
side, time to first token (ChatMLX's includes chat
template rendering, tokenization and the hand-off to the engine thread; raw gets
pre-tokenized ids) and generation tokens/s, alternating the two (A B A B ...) so
drift on the machine hits both. Writes benchmarks/results/stream.{json,md}.

    python benchmarks/bench_stream.py [--model smollm2-135m-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from langchain_core.messages import HumanMessage

from langchain_mlx import ChatMLX
from langchain_mlx._messages import render_prompt
from langchain_mlx.models.prepare import resolve_model

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle."
)
RESULTS = Path(__file__).parent / "results"


def run_chatmlx(chat: ChatMLX, max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    usage = None
    for chunk in chat.stream([HumanMessage(PROMPT)], max_tokens=max_tokens):
        if first is None and chunk.content:
            first = time.perf_counter()
        if chunk.usage_metadata:
            usage = chunk.usage_metadata
    end = time.perf_counter()
    assert first is not None and usage is not None
    n = usage["output_tokens"]
    return {"ttft": first - start, "tps": (n - 1) / (end - first), "tokens": n}


def run_raw(model, tokenizer, ids: list[int], max_tokens: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import mlx_lm

    start = time.perf_counter()
    first = None
    last = None
    for response in mlx_lm.stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens
    ):
        if first is None and response.text:
            first = time.perf_counter()
        last = response
    end = time.perf_counter()
    assert first is not None and last is not None
    n = last.generation_tokens
    return {"ttft": first - start, "tps": (n - 1) / (end - first), "tokens": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    resolve_model(args.model, progress=print)
    # The prompt repeats every round: with the prefix cache on, ChatMLX would
    # skip its prefill and win on time to first token for the wrong reason.
    # Off, this measures the package's own overhead, like for like.
    chat = ChatMLX(model=args.model, temperature=0.0, prefix_cache_entries=0)
    engine = chat.llm.engine  # type: ignore[union-attr]
    ids = render_prompt(
        chat.tokenizer, [HumanMessage(PROMPT)], system_message=chat.system_message
    )

    # warm-up both paths (first-call compilation, allocator)
    run_chatmlx(chat, 4)
    run_raw(engine.model, engine.tokenizer, ids, 4)
    ours, raw = [], []
    for _ in range(args.rounds):
        ours.append(run_chatmlx(chat, args.max_tokens))
        raw.append(run_raw(engine.model, engine.tokenizer, ids, args.max_tokens))

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    result = {
        "model": args.model,
        "prompt_tokens": len(ids),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "machine": f"{platform.system()} {platform.machine()}",
        "chatmlx": {
            "ttft_s": med(ours, "ttft"),
            "gen_tps": med(ours, "tps"),
            "tokens": med(ours, "tokens"),
        },
        "raw_mlx_lm": {
            "ttft_s": med(raw, "ttft"),
            "gen_tps": med(raw, "tps"),
            "tokens": med(raw, "tokens"),
        },
    }
    result["throughput_ratio"] = (
        result["chatmlx"]["gen_tps"] / result["raw_mlx_lm"]["gen_tps"]
    )
    result["extra_ttft_ms"] = 1000 * (
        result["chatmlx"]["ttft_s"] - result["raw_mlx_lm"]["ttft_s"]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stream.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"Model `{args.model}` (bf16), {len(ids)} prompt tokens, {args.max_tokens} generated, "
        f"greedy, median of {args.rounds} alternating rounds, {result['machine']}.\n\n"
        "| path | time to first token | generation tok/s |\n|---|---|---|\n"
        f"| raw `mlx_lm.stream_generate` | {result['raw_mlx_lm']['ttft_s'] * 1000:.0f} ms "
        f"| {result['raw_mlx_lm']['gen_tps']:.2f} |\n"
        f"| `ChatMLX.stream` | {result['chatmlx']['ttft_s'] * 1000:.0f} ms "
        f"| {result['chatmlx']['gen_tps']:.2f} |\n"
        f"| **ratio / difference** | **{result['extra_ttft_ms']:+.1f} ms** "
        f"| **{result['throughput_ratio']:.3f}×** |\n"
    )
    (RESULTS / "stream.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

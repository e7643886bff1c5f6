"""A real draft pair: Qwen2.5-Coder-1.5B alone vs with the 0.5B drafting vs mlx_lm.server.

The same prompts, greedy, in one run: ChatMLX on the 1.5B model alone
(default settings), ChatMLX on its own copy of the 1.5B model with
`draft_model="qwen2.5-coder-0.5b-instruct"`, and `mlx_lm.server --model 1.5B
--draft-model 0.5B` called through langchain-openai's `ChatOpenAI`. Each
mode has its own engine (its own prefix cache); the prompts go to each mode in
lockstep. Reports wall time per mode, its ratio to the 1.5B alone, draft tokens
accepted, and whether the text equals the 1.5B alone's (greedy: it must).
Writes benchmarks/results/draft.{json,md}.

    python benchmarks/bench_draft.py [--max-tokens 48] [--prompts 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from langchain_mlx import ChatMLX, MLXPipeline
from langchain_mlx.models.prepare import resolve_model

RESULTS = Path(__file__).parent / "results"
TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFT = "qwen2.5-coder-0.5b-instruct"
PROMPTS = [
    "Write a Python function `is_prime(n)` that returns whether n is prime.",
    "Explain in two sentences what a Python list comprehension is.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="first N")
    parser.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    args = parser.parse_args()
    prompts = PROMPTS[: args.prompts]

    target = str(resolve_model(TARGET, progress=print))
    draft = str(resolve_model(DRAFT, progress=print))
    alone = ChatMLX(model=TARGET, temperature=0.0)
    from mlx_lm import load

    model, tokenizer = load(target)  # a second copy: its own engine
    copy = MLXPipeline(model=model, tokenizer=tokenizer, model_id=TARGET + "-copy")
    drafted = ChatMLX(llm=copy, temperature=0.0, draft_model=DRAFT)
    models: dict[str, Any] = {
        "ChatMLX, 1.5B alone": alone,
        "ChatMLX, 1.5B + 0.5B draft": drafted,
    }
    for m in models.values():
        m.invoke("Hi", max_tokens=2)  # warm-up (first-call compilation)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        if not args.no_server:
            from _peer import chat_openai, mlx_lm_server

            base_url = stack.enter_context(
                mlx_lm_server(target, "--draft-model", draft)
            )
            peer = chat_openai(base_url, temperature=0.0)
            peer.invoke("Hi", max_tokens=2)
            name = "mlx_lm.server --draft-model 0.5B"
            models[name] = peer
            rows[name] = []
        for prompt in prompts:
            for name, m in models.items():
                t = time.perf_counter()
                reply = m.invoke(prompt, max_tokens=args.max_tokens)
                seconds = time.perf_counter() - t
                usage = reply.usage_metadata or {}
                rows[name].append(
                    {
                        "seconds": seconds,
                        "text": str(reply.content),
                        "output_tokens": usage.get("output_tokens", 0),
                        "accepted": reply.response_metadata.get("accepted_tokens"),
                    }
                )
                print(f"  {name}: {seconds:.1f} s", flush=True)

    base = rows["ChatMLX, 1.5B alone"]
    result = {
        "machine": f"{platform.system()} {platform.machine()}",
        "max_tokens": args.max_tokens,
        "prompts": prompts,
        "modes": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "draft.json").write_text(json.dumps(result, indent=2) + "\n")
    total = sum(r["seconds"] for r in base)
    lines = ""
    for name, rs in rows.items():
        seconds = sum(r["seconds"] for r in rs)
        same = sum(r["text"] == b["text"] for r, b in zip(rs, base, strict=True))
        accepted = [r["accepted"] for r in rs]
        acc = "-" if None in accepted else str(sum(accepted))
        tokens = sum(r["output_tokens"] for r in rs)
        lines += (
            f"| {name} | {seconds:.1f} s | {total / seconds:.2f}× | {tokens} "
            f"| {acc} | {same}/{len(rs)} |\n"
        )
    md = (
        f"Speculative decoding on a real pair: `{TARGET}` (bf16) with `{DRAFT}` "
        f"(bf16) drafting; {len(prompts)} prompt(s), up to {args.max_tokens} tokens "
        f"each, greedy, {result['machine']}, one run, the modes in lockstep.\n\n"
        "| mode | wall time | speed vs 1.5B alone | output tokens "
        "| draft tokens accepted | same text as 1.5B alone |\n"
        "|---|---|---|---|---|---|\n"
        f"{lines}"
    )
    (RESULTS / "draft.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

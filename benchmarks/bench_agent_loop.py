"""An agent loop with and without the prefix KV cache, and against mlx_lm.server.

A 6-step tool-using conversation on SmolLM2-135M-Instruct: a system prompt with
four tool descriptions, a task, then five rounds of a tool call (an AIMessage
written as `Action: tool({...})`, since SmolLM2's template has no tools section)
and its result (a ToolMessage). Each step sends the whole history, as LangGraph
does, and generates 16 tokens (greedy); the history is about 1,000 tokens by
the last step. The calls are the same in every mode, so the replies must be too.

Modes, in one run: ChatMLX with its prefix cache, starting cold; the same
after loading the system prompt's KV state from a file (`save_prompt_cache`,
as a later process of the same app would); ChatMLX with the cache off
(`prefix_cache_entries=0`); and the same model folder served by
`mlx_lm.server` (its own LRU prompt cache, starting cold) called through
langchain-openai's `ChatOpenAI`.
Writes benchmarks/results/agent_loop.{json,md}.

    python benchmarks/bench_agent_loop.py [--model smollm2-135m-instruct] [--no-server]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from langchain_mlx import ChatMLX
from langchain_mlx.models.prepare import resolve_model

RESULTS = Path(__file__).parent / "results"
MAX_TOKENS = 16

SYSTEM = """You are a research agent. Work step by step. To use a tool, answer with \
one line `Action: <tool>(<JSON arguments>)` and wait for its result; when you are \
done, answer with `Final answer: <answer>`.

Tools:
- search(query: string) -> the top three web results, each with a title, a URL \
and a snippet. Use it to find pages; prefer official statistics offices.
- read_page(url: string) -> the main text of a web page, without navigation, \
trimmed to about two hundred words. Use it after search to read a result.
- calculator(expression: string) -> the value of an arithmetic expression with \
+ - * / and parentheses. Use it for every sum; do not add numbers yourself.
- write_note(title: string, body: string) -> saves a note the user will read. \
Use it once, at the end, for the answer and the sources you used.

Rules: cite the page each number comes from; when two sources disagree, prefer \
the most recent official one and say so; never guess a number you have not read; \
keep each action on one line; if a tool fails, try once more with simpler \
arguments, then explain what is missing instead of inventing it."""

TASK = (
    "Find the populations of the three largest cities in Canada, add them up, "
    "and save a note with the total and your sources."
)

ROUNDS = [
    (
        'Action: search({"query": "largest cities in Canada by population 2021 census"})',
        "1. Population and dwelling counts: Canada's largest municipalities - "
        "Statistics Canada (https://www12.statcan.gc.ca/census-recensement/2021) - "
        "Toronto 2,794,356; Montreal 1,762,949; Calgary 1,306,784; Ottawa 1,017,449.\n"
        "2. List of the 100 largest municipalities in Canada by population - "
        "Wikipedia - ranks cities by the 2021 census counts.\n"
        "3. Canada's fastest growing cities - Canadian Geographic - growth rates "
        "of Calgary, Edmonton and Ottawa since 2016.",
    ),
    (
        'Action: read_page({"url": "https://www12.statcan.gc.ca/census-recensement/2021"})',
        "Population and dwelling counts, 2021 Census. Toronto remains the most "
        "populous municipality in Canada with 2,794,356 residents, up 2.3% from "
        "2016. Montreal follows with 1,762,949 (+3.4%), then Calgary with "
        "1,306,784 (+5.5%), Ottawa with 1,017,449 (+8.1%) and Edmonton with "
        "1,010,899 (+8.3%). Counts refer to census subdivisions (municipalities), "
        "not to census metropolitan areas, which are larger.",
    ),
    (
        'Action: calculator({"expression": "2794356 + 1762949 + 1306784"})',
        "5864089",
    ),
    (
        'Action: search({"query": "census subdivision versus metropolitan area Canada"})',
        "1. Census subdivision (CSD) - Statistics Canada dictionary - a "
        "municipality or an area treated as one for statistical purposes.\n"
        "2. Census metropolitan area (CMA) - Statistics Canada dictionary - one or "
        "more adjacent municipalities centred on a core of at least 100,000 "
        "people; Toronto's CMA had 6,202,225 residents in 2021.\n"
        "3. Which population figure should I cite? - a blog post recommending "
        "CSD counts for city comparisons.",
    ),
    (
        'Action: write_note({"title": "Three largest Canadian cities", "body": '
        '"Toronto 2,794,356 + Montreal 1,762,949 + Calgary 1,306,784 = 5,864,089 '
        '(2021 Census, municipal counts; Statistics Canada)."})',
        "Note saved: 'Three largest Canadian cities' (1 note in total, 142 "
        "characters). The user will see it in their notes panel; notes cannot be "
        "edited after saving, but a new note with the same title replaces it.",
    ),
]


def conversation(step: int) -> list[BaseMessage]:
    """The history sent at `step` (0-based): system, task, `step` rounds."""
    messages: list[BaseMessage] = [SystemMessage(SYSTEM), HumanMessage(TASK)]
    for i, (action, result) in enumerate(ROUNDS[:step]):
        messages.append(AIMessage(action))
        messages.append(ToolMessage(result, tool_call_id=f"call_{i}"))
    return messages


def run_loops(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run the steps on each chat model in lockstep (step 1 on every model, then
    step 2, ...), so a drift in the machine's speed hits them alike."""
    steps: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for step in range(len(ROUNDS) + 1):
        for name, model in models.items():
            t = time.perf_counter()
            reply = model.invoke(conversation(step))
            usage = reply.usage_metadata or {}
            details = usage.get("input_token_details") or {}
            steps[name].append(
                {
                    "seconds": time.perf_counter() - t,
                    "prompt_tokens": usage.get("input_tokens", 0),
                    "cached_tokens": details.get("cache_read", 0),
                    "reply": str(reply.content),
                }
            )
    out = {}
    for name, rows in steps.items():
        sent = sum(s["prompt_tokens"] for s in rows)
        out[name] = {
            "seconds": sum(s["seconds"] for s in rows),
            "prompt_tokens_sent": sent,
            "prompt_tokens_processed": sent - sum(s["cached_tokens"] for s in rows),
            "steps": rows,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    args = parser.parse_args()

    path = str(resolve_model(args.model, progress=print))
    chat = ChatMLX(model=args.model, temperature=0.0, max_tokens=MAX_TOKENS)
    engine = chat.llm.engine  # type: ignore[union-attr]
    chat.invoke("Hi", max_tokens=2)  # warm-up (first-call compilation)
    modes: dict[str, dict[str, Any]] = {}

    with contextlib.ExitStack() as stack:
        models = {"ChatMLX, prefix cache": chat}
        if not args.no_server:
            from _peer import chat_openai, mlx_lm_server

            base_url = stack.enter_context(mlx_lm_server(path))
            peer = chat_openai(base_url, temperature=0.0, max_tokens=MAX_TOKENS)
            peer.invoke("Hi", max_tokens=2)  # the same warm-up
            models["mlx_lm.server + ChatOpenAI"] = peer
        print(f"{' and '.join(models)}, in lockstep ...", flush=True)
        modes.update(run_loops(models))
    with tempfile.TemporaryDirectory() as folder:
        saved = chat.save_prompt_cache(Path(folder) / "system", [SystemMessage(SYSTEM)])
        engine.clear_prefix_cache()  # as a new process that loads the file
        chat.load_prompt_cache(Path(folder) / "system")
        name = "ChatMLX, prefix cache + system prompt loaded from disk"
        print(f"{name} ({saved} tokens) ...", flush=True)
        modes.update(run_loops({name: chat}))
    engine.configure(prefix_cache_entries=0)
    print("ChatMLX, no cache ...", flush=True)
    modes.update(run_loops({"ChatMLX, no cache": chat}))
    engine.configure(prefix_cache_entries=10)

    cached, cold = modes["ChatMLX, prefix cache"], modes["ChatMLX, no cache"]
    result = {
        "model": args.model,
        "machine": f"{platform.system()} {platform.machine()}",
        "steps": len(ROUNDS) + 1,
        "max_tokens": MAX_TOKENS,
        "last_prompt_tokens": cached["steps"][-1]["prompt_tokens"],
        "speedup_cache_vs_no_cache": cold["seconds"] / cached["seconds"],
        "same_replies_with_and_without_cache": [s["reply"] for s in cached["steps"]]
        == [s["reply"] for s in cold["steps"]],
        "modes": modes,
    }
    if "mlx_lm.server + ChatOpenAI" in modes:
        result["speedup_vs_mlx_lm_server"] = (
            modes["mlx_lm.server + ChatOpenAI"]["seconds"] / cached["seconds"]
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agent_loop.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(
        f"| {name} | {m['seconds']:.1f} s | {m['prompt_tokens_sent']} "
        f"| {m['prompt_tokens_processed']} | {cold['seconds'] / m['seconds']:.2f}× |\n"
        for name, m in modes.items()
    )
    table = (
        f"Agent loop: {result['steps']} steps of a tool-using conversation "
        f"({result['last_prompt_tokens']} prompt tokens at the last step), "
        f"{MAX_TOKENS} generated tokens per step, greedy; model `{args.model}` "
        f"(bf16), {result['machine']}, one run (ChatMLX and the server in lockstep, "
        "step by step).\n\n"
        "| mode | wall time | prompt tokens sent | prompt tokens processed "
        "| speed-up vs no cache |\n|---|---|---|---|---|\n"
        f"{rows}\n"
        "Replies identical with and without the cache: "
        f"{'yes' if result['same_replies_with_and_without_cache'] else 'NO'}.\n"
    )
    (RESULTS / "agent_loop.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""A tool-using agent loop: ChatMLX (fast paths on / off) vs mlx_lm.server + ChatOpenAI.

The same scripted conversation goes to every model, step by step and in
lockstep (step 1 on each, then step 2, ...): a system prompt, a task, then
rounds of a tool call (an `AIMessage` with `tool_calls`) and its result (a
`ToolMessage`), with the same three tools bound on each side
(`bind_tools`). At each step the model writes the next message (a call or
the answer, up to `--max-tokens`, greedy); the history then continues with
the scripted message, so every side sees the same conversation. Both sides
keep a prefix KV cache (mlx_lm.server its LRU prompt cache).

Modes: ChatMLX with everything on (grammar fast-forward, auto-mode calls
constrained, prompt-lookup speculation), ChatMLX with them off
(`fast_forward=False, prompt_lookup=False`, `bind_tools(strict=False)`), and
the same model folder served by `mlx_lm.server`, called through
langchain-openai's `ChatOpenAI`. Reports wall time per mode and the ratio to
the server, and what each reply was (a call of a bound tool with valid
arguments, text, or a malformed call). Replies are streamed, so each step's
time splits at its first token (the server: the first streamed chunk; ChatMLX,
which streams a call only in its last chunk: the engine's
`time_to_first_token_seconds`): before it the new messages are prefilled (the
same tokens on every side), after it the reply is decoded — the part the fast
paths shorten, and the part that dominates where prefill is fast (a GPU).
Writes
benchmarks/results/agent_tools-<model>.{json,md}.

    python benchmarks/bench_agent_tools.py [--model qwen2.5-coder-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
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
from langchain_core.tools import tool

from langchain_mlx import ChatMLX
from langchain_mlx.models.prepare import resolve_model

RESULTS = Path(__file__).parent / "results"
OFF = {"fast_forward": False, "prompt_lookup": False}


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather in a city."""
    return ""


@tool
def search(query: str) -> str:
    """Search the web; returns the top results with titles and snippets."""
    return ""


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses."""
    return ""


TOOLS = [get_weather, search, calculator]
SYSTEM = (
    "You are a helpful assistant with tools. Call a tool when you need "
    "information or arithmetic; answer the user when you have what you need, "
    "quoting the numbers from the tool results."
)
TASK = (
    "What is the weather in Paris and in Berlin right now, and how many "
    "degrees warmer is the warmer city? Then find the population of the "
    "warmer city."
)
ROUNDS: list[tuple[str, dict[str, Any], str]] = [
    (
        "get_weather",
        {"city": "Paris"},
        "Paris: 18 degrees celsius, light rain, wind 12 km/h from the south-west, "
        "humidity 81%.",
    ),
    (
        "get_weather",
        {"city": "Berlin"},
        "Berlin: 23 degrees celsius, sunny, wind 8 km/h from the east, humidity 40%.",
    ),
    ("calculator", {"expression": "23 - 18"}, "5"),
    (
        "search",
        {"query": "population of Berlin"},
        "1. Berlin - Wikipedia: Berlin is the capital and largest city of Germany, "
        "with a population of 3,878,100 in 2023 within its city limits.\n"
        "2. Statistik Berlin-Brandenburg: 3,878,100 inhabitants (31 December 2023).",
    ),
]


def conversation(step: int) -> list[BaseMessage]:
    """The history sent at `step`: system, task, then `step` scripted rounds."""
    messages: list[BaseMessage] = [SystemMessage(SYSTEM), HumanMessage(TASK)]
    for i, (name, args, result) in enumerate(ROUNDS[:step]):
        call_id = f"call_{i}"
        messages.append(
            AIMessage("", tool_calls=[{"name": name, "args": args, "id": call_id}])
        )
        messages.append(ToolMessage(result, tool_call_id=call_id))
    return messages


def kind_of(reply: AIMessage) -> str:
    """What a reply is: a valid call of a bound tool, text, or a malformed call."""
    if reply.invalid_tool_calls:
        return "malformed call"
    if reply.tool_calls:
        names = {t.name: t for t in TOOLS}
        for call in reply.tool_calls:
            spec = names.get(call["name"])
            if spec is None or set(call["args"]) - set(spec.args):
                return "invalid call"
        return "call " + ",".join(c["name"] for c in reply.tool_calls)
    return "text"


def streamed(model: Any, messages: list[BaseMessage], max_tokens: int) -> Any:
    """The reply (chunks added up), seconds to its first token, seconds in all."""
    t = time.perf_counter()
    reply, first = None, None
    for chunk in model.stream(messages, max_tokens=max_tokens):
        if first is None and (chunk.content or chunk.tool_call_chunks):
            first = time.perf_counter() - t
        reply = chunk if reply is None else reply + chunk
    seconds = time.perf_counter() - t
    assert reply is not None, "the stream gave no chunk"
    # ChatMLX holds a call's text back to its last chunk: its engine's own
    # time to the first token (from the request's submission) is the split
    engine_first = reply.response_metadata.get("time_to_first_token_seconds")
    if engine_first is not None:
        first = engine_first
    return reply, seconds if first is None else first, seconds


def run_loops(models: dict[str, Any], max_tokens: int) -> dict[str, dict[str, Any]]:
    steps: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for step in range(len(ROUNDS) + 1):
        for name, model in models.items():
            reply, first, seconds = streamed(model, conversation(step), max_tokens)
            usage = reply.usage_metadata or {}
            details = usage.get("input_token_details") or {}
            md = reply.response_metadata
            steps[name].append(
                {
                    "seconds": seconds,
                    "first_token": first,
                    "output_tokens": usage.get("output_tokens", 0),
                    "input_tokens": usage.get("input_tokens", 0),
                    "cached": details.get("cache_read"),  # None: not reported
                    "kind": kind_of(reply),
                    "reply": str(reply.content)
                    or json.dumps(reply.tool_calls, default=str),
                    "forced": md.get("forced_tokens", 0),
                    "accepted": md.get("accepted_tokens", 0),
                }
            )
            print(f"  step {step} {name}: {seconds:.1f} s {steps[name][-1]['kind']}")
    return {
        name: {
            "seconds": sum(s["seconds"] for s in rows),
            "first_token": sum(s["first_token"] for s in rows),
            "output_tokens": sum(s["output_tokens"] for s in rows),
            "forced": sum(s["forced"] for s in rows),
            "accepted": sum(s["accepted"] for s in rows),
            "prefilled": None
            if any(s["cached"] is None for s in rows)
            else sum(s["input_tokens"] - s["cached"] for s in rows),
            "steps": rows,
        }
        for name, rows in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-server", action="store_true", help="skip mlx_lm.server")
    args = parser.parse_args()

    path = str(resolve_model(args.model, progress=print))
    chat = ChatMLX(model=args.model, temperature=0.0)
    chat.invoke("Hi", max_tokens=2)  # warm-up (first-call compilation)
    # The off mode gets its own copy of the model, so its own engine and
    # prefix cache: sharing one, each mode would find the other's prompts
    # cached (the conversation is the same).
    from mlx_lm import load

    from langchain_mlx import MLXPipeline

    model, tokenizer = load(path)
    other = MLXPipeline(model=model, tokenizer=tokenizer, model_id=args.model)
    off = ChatMLX(llm=other, temperature=0.0, **OFF)
    off.invoke("Hi", max_tokens=2)
    models: dict[str, Any] = {
        "ChatMLX, fast paths on": chat.bind_tools(TOOLS),
        "ChatMLX, fast paths off": off.bind_tools(TOOLS, strict=False),
    }
    with contextlib.ExitStack() as stack:
        if not args.no_server:
            from _peer import chat_openai, mlx_lm_server

            base_url = stack.enter_context(mlx_lm_server(path))
            peer = chat_openai(base_url, temperature=0.0, stream_usage=True)
            peer.invoke("Hi", max_tokens=2)  # the same warm-up
            models["mlx_lm.server + ChatOpenAI"] = peer.bind_tools(TOOLS)
        print(f"{', '.join(models)}: in lockstep ...", flush=True)
        modes = run_loops(models, args.max_tokens)

    server = modes.get("mlx_lm.server + ChatOpenAI")
    result = {
        "model": args.model,
        "machine": f"{platform.system()} {platform.machine()}",
        "steps": len(ROUNDS) + 1,
        "max_tokens": args.max_tokens,
        "modes": modes,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"agent_tools-{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = ""
    for name, m in modes.items():
        ratio = f"{m['seconds'] / server['seconds']:.2f}×" if server else "-"
        decode = m["seconds"] - m["first_token"]
        if server:
            decode_ratio = decode / (server["seconds"] - server["first_token"])
            after = f"{decode:.1f} s ({decode_ratio:.2f}×)"
        else:
            after = f"{decode:.1f} s"
        kinds = "; ".join(s["kind"] for s in m["steps"])
        first, later = m["steps"][0]["seconds"], m["seconds"] - m["steps"][0]["seconds"]
        prefilled = "-" if m["prefilled"] is None else m["prefilled"]
        rows += (
            f"| {name} | {m['seconds']:.1f} s | {ratio} | {first:.1f} s "
            f"| {later:.1f} s | {m['first_token']:.1f} s | {after} "
            f"| {prefilled} | {m['output_tokens']} "
            f"| {m['forced']} / {m['accepted']} | {kinds} |\n"
        )
    table = (
        f"Agent loop with tools: {result['steps']} steps of a scripted conversation "
        f"(tool calls and results as messages, three tools bound), up to "
        f"{args.max_tokens} tokens per reply, greedy; model `{args.model}` (bf16), "
        f"{result['machine']}, one run, the modes in lockstep.\n\n"
        "| mode | wall time | vs server | step 0 | steps 1+ | to first tokens "
        "| after first tokens (vs server) | prompt tokens prefilled "
        "| output tokens | forced / accepted | replies |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n"
        "Step 0 prefills system prompt, tools and task from cold; to / after first "
        "tokens: each streamed reply's time split at its first token (prefill, "
        "then decoding), summed over the steps; prompt tokens prefilled = input "
        "tokens not read from the prefix cache, over all steps (- where not "
        "reported).\n"
    )
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""One app script for every rank: run plainly, or under `mlx.launch` with sharding.

    python distributed_app.py MODEL MODE OUT.json          # MODE: none|tensor|pipeline
    mlx.launch --backend ring -n 2 --python PY distributed_app.py MODEL tensor OUT.json

Rank 0 (or the only process) runs invoke, stream, async, four concurrent
requests, stop strings, a forced tool call, structured output, a repeated
prompt (prefix cache) and a stream its reader leaves (cancellation), and
writes what it got to OUT.json. On the other ranks
constructing the model never returns: they serve rank 0's engine and exit
when it closes the model.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Literal

from pydantic import BaseModel, Field

from langchain_mlx import ChatMLX

QUESTION = "What is the capital of France?"
QUESTIONS = [
    "What is the capital of France?",
    "Name a color.",
    "What is 2 + 2?",
    "Say hello.",
]


def get_weather(city: Literal["Paris", "Rome", "Madrid"]) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


class Capital(BaseModel):
    """The capital of a country."""

    country: Literal["France", "Italy", "Spain"] = Field(description="the country")
    capital: Literal["Paris", "Rome", "Madrid"] = Field(description="its capital")


def usage(message: object) -> dict[str, object]:
    meta = getattr(message, "usage_metadata", None) or {}
    return {
        "input": meta.get("input_tokens"),
        "output": meta.get("output_tokens"),
        "cached": (meta.get("input_token_details") or {}).get("cache_read", 0),
    }


def main() -> None:
    model, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    full = "--quick" not in sys.argv
    timeout = next(
        (float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--timeout=")),
        60.0,
    )
    try:
        chat = ChatMLX(
            model=model,
            max_tokens=16,
            distributed=None if mode == "none" else mode,  # type: ignore[arg-type]
            distributed_timeout=timeout,
        )
    except Exception as e:
        print(f"CONSTRUCT-ERROR {type(e).__name__}: {e}", flush=True)
        sys.exit(3)
    # ---- only rank 0 gets here ----
    if "--failure" in sys.argv:
        failure(chat)
        return
    result: dict[str, object] = {"sharded": chat.llm.engine.sharded}  # type: ignore[union-attr]
    first = chat.invoke(QUESTION)
    result["invoke"] = first.content
    result["invoke_usage"] = usage(first)
    result["stream"] = "".join(str(c.content) for c in chat.stream(QUESTION))
    result["batch"] = [m.content for m in chat.batch(QUESTIONS)]
    result["largest_batch"] = chat.llm.engine.largest_batch  # type: ignore[union-attr]
    roomy = ChatMLX(llm=chat.llm, max_tokens=48)  # the same engine
    forced = roomy.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    result["tool_calls"] = [
        {"name": c["name"], "args": c["args"]} for c in forced.tool_calls
    ]
    result["invalid_tool_calls"] = [c.get("error") for c in forced.invalid_tool_calls]
    sampled = chat.invoke(QUESTION, temperature=1.0, seed=7)
    result["sampled_seeded"] = sampled.content
    if full:
        result["ainvoke"] = asyncio.run(chat.ainvoke(QUESTION)).content
        result["stop"] = chat.invoke(QUESTION, stop=["is"]).content
        structured = chat.with_structured_output(Capital).invoke(
            "What is the capital of France?"
        )
        result["structured"] = structured.model_dump()  # type: ignore[union-attr]
        again = chat.invoke(QUESTION)
        result["again_usage"] = usage(again)
        result["finished"] = dict(chat.llm.engine.finished)  # type: ignore[union-attr]
        # a reader that leaves mid-stream: every rank drops the request
        for i, _ in enumerate(chat.stream("Tell me a long story.", max_tokens=200)):
            if i == 2:
                break
        result["after_cancel"] = chat.invoke(QUESTION).content
        engine = chat.llm.engine  # type: ignore[union-attr]
        result["cancelled"] = engine.finished["cancelled"]
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    chat.close()  # the other ranks exit with status 0


def failure(chat: ChatMLX) -> None:
    """Answer once, wait for a line on stdin (a rank is killed meanwhile), retry."""
    print("FIRST", chat.invoke(QUESTION).content.__len__(), flush=True)
    print("READY", flush=True)
    sys.stdin.readline()
    for attempt in ("SECOND", "THIRD"):
        try:
            chat.invoke(QUESTION)
            print(attempt, "ok", flush=True)
        except Exception as e:
            print(attempt, f"{type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()

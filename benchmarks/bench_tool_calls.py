"""Auto-mode tool calling: correct calls with and without the strict grammar.

Ten one-turn tasks, each needing one call of one of five bound tools with
specific arguments, under `tool_choice="auto"` (the model may also answer in
text). A reply is *correct* when its first call names the expected tool and
its arguments contain the expected values (case-insensitive for strings),
*malformed* when the output holds an unparseable or invalid call
(`invalid_tool_calls`, an unknown tool, an argument the tool does not take).
Modes: `bind_tools(tools)` (auto-mode calls constrained by a lazy grammar,
the default) and `bind_tools(tools, strict=False)` (free text, parsed
afterwards). Greedy. Writes benchmarks/results/tool_calls-<model>.{json,md}.

    python benchmarks/bench_tool_calls.py [--model qwen2.5-coder-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from langchain_core.tools import tool

from langchain_mlx import ChatMLX
from langchain_mlx.models.prepare import resolve_model

RESULTS = Path(__file__).parent / "results"


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather in a city; unit is celsius or fahrenheit."""
    return ""


@tool
def convert_currency(amount: float, from_currency: str, to_currency: str) -> str:
    """Convert an amount of money between two currencies (ISO codes like USD)."""
    return ""


@tool
def send_email(to: str, subject: str, body: str) -> str:
    """Send an email."""
    return ""


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return ""


@tool
def create_event(title: str, date: str, time: str) -> str:
    """Add an event to the calendar; date as YYYY-MM-DD, time as HH:MM."""
    return ""


TOOLS = [get_weather, convert_currency, send_email, calculator, create_event]
TASKS: list[tuple[str, str, dict[str, Any]]] = [
    ("What's the weather like in Tokyo?", "get_weather", {"city": "Tokyo"}),
    (
        "Is it cold in Oslo right now? Give me fahrenheit.",
        "get_weather",
        {"city": "Oslo", "unit": "fahrenheit"},
    ),
    (
        "How much is 250 US dollars in euros?",
        "convert_currency",
        {"amount": 250, "from_currency": "USD", "to_currency": "EUR"},
    ),
    (
        "Convert 1000 JPY to GBP please.",
        "convert_currency",
        {"amount": 1000, "from_currency": "JPY", "to_currency": "GBP"},
    ),
    ("What is 1234 * 5678?", "calculator", {"expression": "1234 * 5678"}),
    ("Compute (17 + 25) / 6 for me.", "calculator", {"expression": "(17 + 25) / 6"}),
    (
        "Email bob@example.com with subject 'Lunch' saying 'See you at noon'.",
        "send_email",
        {"to": "bob@example.com", "subject": "Lunch"},
    ),
    (
        "Send an email to alice@example.org, subject Report, body: the report is done.",
        "send_email",
        {"to": "alice@example.org", "subject": "Report"},
    ),
    (
        "Put 'Dentist' in my calendar on 2025-03-14 at 09:30.",
        "create_event",
        {"title": "Dentist", "date": "2025-03-14", "time": "09:30"},
    ),
    (
        "Schedule a team meeting on 2025-07-01 at 14:00.",
        "create_event",
        {"date": "2025-07-01", "time": "14:00"},
    ),
]


def same(expected: Any, got: Any) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and expected.lower() in got.lower().replace(
            "  ", " "
        )
    try:
        return float(expected) == float(got)
    except (TypeError, ValueError):
        return False


def grade(reply: Any, name: str, args: dict[str, Any]) -> str:
    tools = {t.name: t for t in TOOLS}
    if reply.invalid_tool_calls:
        return "malformed"
    for call in reply.tool_calls:
        spec = tools.get(call["name"])
        if spec is None or set(call["args"]) - set(spec.args):
            return "malformed"
    if not reply.tool_calls:
        return "no call"
    call = reply.tool_calls[0]
    if call["name"] != name:
        return "wrong tool"
    ok = all(k in call["args"] and same(v, call["args"][k]) for k, v in args.items())
    return "correct" if ok else "wrong args"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    resolve_model(args.model, progress=print)
    chat = ChatMLX(model=args.model, temperature=0.0, max_tokens=args.max_tokens)
    modes = {
        "strict (default)": chat.bind_tools(TOOLS),
        "strict=False": chat.bind_tools(TOOLS, strict=False),
    }
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for prompt, name, expected in TASKS:
        for mode, model in modes.items():
            t = time.perf_counter()
            reply = model.invoke(prompt)
            verdict = grade(reply, name, expected)
            rows[mode].append(
                {
                    "task": prompt,
                    "verdict": verdict,
                    "seconds": time.perf_counter() - t,
                    "calls": reply.tool_calls,
                    "invalid": [dict(c) for c in reply.invalid_tool_calls],
                    "content": str(reply.content),
                }
            )
            print(f"{mode}: {verdict}: {prompt}", flush=True)
    summary = {
        mode: {
            "correct": sum(r["verdict"] == "correct" for r in rs),
            "malformed": sum(r["verdict"] == "malformed" for r in rs),
            "seconds": sum(r["seconds"] for r in rs),
        }
        for mode, rs in rows.items()
    }
    result = {
        "model": args.model,
        "machine": f"{platform.system()} {platform.machine()}",
        "summary": summary,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = f"tool_calls-{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    table = (
        f"Auto-mode tool calls: {len(TASKS)} tasks, five tools bound, greedy, "
        f"model `{args.model}` (bf16), {result['machine']}, one run.\n\n"
        "| mode | correct | malformed | wall time |\n|---|---|---|---|\n"
        + "".join(
            f"| {mode} | {s['correct']}/{len(TASKS)} | {s['malformed']} "
            f"| {s['seconds']:.0f} s |\n"
            for mode, s in summary.items()
        )
        + "\nWall time: on each task the strict mode runs first and prefills the "
        "prompt; the other finds it in the prefix cache, so the times are not a "
        "speed comparison.\n"
    )
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

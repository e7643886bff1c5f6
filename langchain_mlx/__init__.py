"""LangChain chat model, LLM, embeddings and decision model on Apple MLX (mlx-lm).

`import langchain_mlx` does not import mlx: the backend is loaded when a model is.
The error types every call may raise are importable from here too.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_mlx._constraints import (
        ConstraintViolationError,
        UnsupportedSchemaError,
    )
    from langchain_mlx._control_tokens import UnencodableTextError
    from langchain_mlx._messages import ChatTemplateError, UnsupportedContentError
    from langchain_mlx.chat_models import ChatMLX
    from langchain_mlx.decisions import MLXDecisionModel
    from langchain_mlx.embeddings import MLXEmbeddings
    from langchain_mlx.engine.types import (
        ContextWindowExceededError,
        DistributedError,
        EngineOverloadedError,
        EngineStoppedError,
        GenerationTimeoutError,
        ModelLoadError,
        PromptCacheError,
        RequestFailedError,
    )
    from langchain_mlx.llms import MLXPipeline
    from langchain_mlx.models.errors import ModelPreparationError

try:
    __version__ = metadata.version(__package__ or "langchain-mlx")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

# name -> module that defines it (imported on first access: langchain-core's
# modules are heavy, and nothing here may import mlx)
_LAZY = {
    "ChatMLX": "langchain_mlx.chat_models",
    "MLXPipeline": "langchain_mlx.llms",
    "MLXEmbeddings": "langchain_mlx.embeddings",
    "MLXDecisionModel": "langchain_mlx.decisions",
    "ChatTemplateError": "langchain_mlx._messages",
    "ConstraintViolationError": "langchain_mlx._constraints",
    "ContextWindowExceededError": "langchain_mlx.engine.types",
    "DistributedError": "langchain_mlx.engine.types",
    "EngineOverloadedError": "langchain_mlx.engine.types",
    "EngineStoppedError": "langchain_mlx.engine.types",
    "GenerationTimeoutError": "langchain_mlx.engine.types",
    "ModelLoadError": "langchain_mlx.engine.types",
    "ModelPreparationError": "langchain_mlx.models.errors",
    "PromptCacheError": "langchain_mlx.engine.types",
    "RequestFailedError": "langchain_mlx.engine.types",
    "UnencodableTextError": "langchain_mlx._control_tokens",
    "UnsupportedContentError": "langchain_mlx._messages",
    "UnsupportedSchemaError": "langchain_mlx._constraints",
}

__all__ = [
    "ChatMLX",
    "ChatTemplateError",
    "ConstraintViolationError",
    "ContextWindowExceededError",
    "DistributedError",
    "EngineOverloadedError",
    "EngineStoppedError",
    "GenerationTimeoutError",
    "MLXDecisionModel",
    "MLXEmbeddings",
    "MLXPipeline",
    "ModelLoadError",
    "ModelPreparationError",
    "PromptCacheError",
    "RequestFailedError",
    "UnencodableTextError",
    "UnsupportedContentError",
    "UnsupportedSchemaError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'langchain_mlx' has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(module), name)

"""LangChain chat model and LLM for local models on Apple MLX (through mlx-lm).

`import langchain_mlx` does not import mlx: the backend is loaded when a model is.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_mlx.chat_models import ChatMLX
    from langchain_mlx.llms import MLXPipeline

try:
    __version__ = metadata.version(__package__ or "langchain-mlx")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["ChatMLX", "MLXPipeline", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: the classes import langchain-core's heavy modules; mlx itself is
    # imported only when a model is loaded.
    if name == "ChatMLX":
        from langchain_mlx.chat_models import ChatMLX

        return ChatMLX
    if name == "MLXPipeline":
        from langchain_mlx.llms import MLXPipeline

        return MLXPipeline
    msg = f"module 'langchain_mlx' has no attribute {name!r}"
    raise AttributeError(msg)

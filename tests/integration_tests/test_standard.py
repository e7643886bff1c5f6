"""langchain-tests' standard integration suite against the real SmolLM2-135M-Instruct.

The model is prepared from its PyPI-shipped GGUF by `langchain_mlx._models`.
SmolLM2's chat template has no tools section, so tool calling and structured
output are not claimed here (`has_tool_calling` is False because `bind_tools`
is not implemented yet); everything else must pass.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_mlx import ChatMLX
from langchain_mlx._models import DEFAULT_MODEL, write_tiny_model


@cache
def _override_model() -> str:
    # A second, different model for the per-call `model=` override tests.
    return str(write_tiny_model(Path(tempfile.mkdtemp()) / "tiny-override"))


class TestChatMLXStandardIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMLX]:
        return ChatMLX

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Short answers keep the suite inside CI's budget on a 2-core CPU.
        return {"model": DEFAULT_MODEL, "max_tokens": 24}

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return _override_model()

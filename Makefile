# Developer shortcuts; every target sets up .venv first (see run.py).
.PHONY: chat test unit_test integration_test lint format type bench

chat:
	python3 run.py chat "What is the capital of France?"

test:
	python3 run.py test

unit_test:
	python3 run.py test tests/unit_tests

integration_test:
	python3 run.py test tests/integration_tests

lint:
	.venv/bin/ruff check langchain_mlx tests benchmarks
	.venv/bin/ruff format --check langchain_mlx tests benchmarks

format:
	.venv/bin/ruff format langchain_mlx tests benchmarks
	.venv/bin/ruff check --fix langchain_mlx tests benchmarks

type:
	.venv/bin/mypy

bench:
	python3 run.py bench

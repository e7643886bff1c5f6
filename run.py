#!/usr/bin/env python3
"""Set up a virtual environment and run the project's jobs; needs only Python 3.10+.

    python3 run.py chat "What is the capital of France?"  # chat, default model
    python3 run.py test                                   # lint, types, all tests
    python3 run.py bench                                  # the benchmarks

The environment lives in `.venv` next to this file and is reused; the backend
extra is chosen for the platform (`cpu` on Linux, set LANGCHAIN_MLX_BACKEND=cuda
for NVIDIA; plain `mlx` on macOS).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".langchain-mlx-installed"


def sh(*args: str | Path) -> None:
    """Run a command in the project folder, echoing it; fail on error."""
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=ROOT)


def setup() -> None:
    """Create .venv and install the project with its test and lint tools."""
    if sys.version_info < (3, 10):  # noqa: UP036 - run.py may meet an old python3
        sys.exit(
            f"langchain-mlx needs Python 3.10+; this is {platform.python_version()}"
        )
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    spec = (ROOT / "pyproject.toml").read_text()
    if STAMP.exists() and STAMP.read_text() == spec:
        return
    backend = os.environ.get("LANGCHAIN_MLX_BACKEND", "")
    if not backend:
        backend = "" if platform.system() == "Darwin" else "cpu"
    extra = f"[{backend}]" if backend else ""
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    sh(*pip, "--upgrade", "pip>=25.1")  # for --group (PEP 735 dependency groups)
    sh(
        *pip,
        "-e",
        f".{extra}",
        "--group",
        "test",
        "--group",
        "lint",
        "--group",
        "bench",
    )
    STAMP.write_text(spec)


def main() -> int:
    """Dispatch `chat`, `test`, `bench` or `setup`."""
    if len(sys.argv) < 2 or sys.argv[1] not in {"chat", "test", "bench", "setup"}:
        print(__doc__)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    setup()
    if command == "chat":
        return subprocess.call([str(BIN / "langchain-mlx"), "chat", *rest], cwd=ROOT)
    if command == "test":
        sh(
            PY,
            "-m",
            "ruff",
            "check",
            "langchain_mlx",
            "tests",
            "benchmarks",
            "examples",
        )
        sh(PY, "-m", "mypy")
        return subprocess.call(
            [str(PY), "-m", "pytest", "-q", "-rs", "--durations=15", *rest], cwd=ROOT
        )
    if command == "bench":
        for script in (
            "bench_stream.py",
            "bench_constraints.py",
            "bench_agent_loop.py",
            "bench_concurrency.py",
            "bench_embeddings.py",
            "bench_speed.py",
            "bench_agent_tools.py",
            "bench_tool_calls.py",
            "bench_distributed.py",
            "bench_decisions.py",
            "bench_restart.py",
            "bench_bfcl.py",
            "bench_draft.py",
        ):
            sh(PY, f"benchmarks/{script}", *rest)
        sh(PY, "benchmarks/update_readme.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())

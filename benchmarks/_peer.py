"""The peer for side-by-side numbers: the same model folder served by `mlx_lm.server`.

The benchmarks start it on 127.0.0.1 as a subprocess, call it through
langchain-openai's `ChatOpenAI` (install `langchain-openai` for these rows), and
stop it afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def mlx_lm_server(model_path: str, *extra_args: str) -> Iterator[str]:
    """Run `mlx_lm.server` for `model_path`; yield its OpenAI base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept until the server stops
        "w+", prefix="mlx_lm_server-", suffix=".log", delete=False
    )
    command = [
        sys.executable, "-m", "mlx_lm.server", "--model", model_path,
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING",
        *extra_args,
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError("mlx_lm.server exited:\n" + log.read()[-2000:])
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health", timeout=2
                ):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def chat_openai(base_url: str, **kwargs: Any) -> Any:
    """`ChatOpenAI` for the server's default model."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=base_url, api_key="x", model="default_model", max_retries=0, **kwargs
    )

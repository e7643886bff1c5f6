"""`langchain-mlx chat` without a question: a conversation, one turn per line.

Two kinds of test:
- the real command in a subprocess, stdin piped, on the tiny random-weight model:
  its answers are gibberish, so the tests assert structure (one answer per line
  read, history growth and prefix-cache reuse in the `-v` summaries, commands);
- `cli.main` in-process with a fake chat model and fake stdin/stdout, for what
  must be exact (the history sent each turn) and for Ctrl-C, raised at a chosen
  chunk or write: deterministic, no signals, no timing.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage

from langchain_mlx import cli
from langchain_mlx.engine.types import ContextWindowExceededError

SUMMARY = re.compile(
    r"^\[langchain-mlx\] (\d+) prompt tokens \((\d+) from cache(?: on disk)?, "
    r"[\d.]+ tok/s\), "
    r"(\d+) generated \([\d.]+ tok/s\), finish: (\w+)$"
)


class Summary:
    """One `-v` line: prompt tokens, of them from cache, generated."""

    def __init__(self, line: str) -> None:
        match = SUMMARY.match(line)
        assert match, line
        self.prompt, self.cached, self.generated = map(int, match.groups()[:3])


def _turns(messages: list[BaseMessage]) -> list[tuple[str, Any]]:
    return [(m.type, m.content) for m in messages]


def _summaries(err: str) -> list[Summary]:
    return [Summary(line) for line in err.splitlines() if SUMMARY.match(line)]


# ---------------------------------------------------------------- real command


_KV_FOLDER = tempfile.mkdtemp(prefix="langchain-mlx-test-kv-")


def _run_cli(
    model: str,
    stdin: str,
    *args: str,
    merge: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "langchain_mlx.cli", "chat", "--model", model, *args],
        # the default folder of the disk tier is the cache home's: not from tests
        env={**os.environ, "LANGCHAIN_MLX_PREFIX_CACHE_DIR": _KV_FOLDER, **(env or {})},
        input=stdin,
        capture_output=not merge,
        stdout=subprocess.PIPE if merge else None,
        stderr=subprocess.STDOUT if merge else None,
        text=True,
        timeout=300,  # a bound on a hang, not a measurement
        check=False,
    )


def test_two_piped_lines_are_both_answered(tiny_model_path: str) -> None:
    # stderr merged into stdout: the order of writes shows each answer, then
    # its newline, then its summary (stdout is flushed before each summary)
    result = _run_cli(
        tiny_model_path,
        "What is MLX?\nAnd LangChain?\n",
        *("--max-tokens", "6", "--temperature", "1", "--seed", "7", "-v"),
        merge=True,
    )
    assert result.returncode == 0, result.stdout
    parts = re.split(r"^(\[langchain-mlx\] .*)$\n", result.stdout, flags=re.M)
    answer1, line1, answer2, line2, rest = parts
    assert rest == ""
    for answer, line in ((answer1, line1), (answer2, line2)):
        assert answer.endswith("\n")  # each answer ends its line
        assert Summary(line).generated == 6  # the whole answer reached stdout
    assert ">>>" not in result.stdout  # no prompts without a terminal
    first, second = Summary(line1), Summary(line2)
    # turn 2 carries turn 1's question and answer, reused from the prefix cache
    assert second.prompt >= first.prompt + first.generated
    assert second.cached > 0


def test_a_restarted_question_reads_its_prompt_from_disk(
    tiny_model_path: str, tmp_path: Path
) -> None:
    # the default folder under the cache home: a second run starts from disk
    env = {"LANGCHAIN_MLX_PREFIX_CACHE_DIR": str(tmp_path / "kv")}
    question = ("--max-tokens", "3", "-v", "--system", "Be brief. " * 20, "Hi")
    first = _run_cli(tiny_model_path, "", *question, env=env)
    second = _run_cli(tiny_model_path, "", *question, env=env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert " from cache on disk" not in first.stderr
    assert " from cache on disk" in second.stderr
    assert first.stdout == second.stdout
    off = _run_cli(tiny_model_path, "", *question, "--no-disk-cache", env=env)
    assert " from cache on disk" not in off.stderr


def test_commands_in_a_piped_session(tiny_model_path: str) -> None:
    stdin = "hello\n\n   \n/nope\nhello again\n/help\n/reset\nhello\n/exit\nnever\n"
    result = _run_cli(tiny_model_path, stdin, "--max-tokens", "4", "-v")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # blank lines and commands are not turns; nothing after /exit is read
    first, second, after_reset = _summaries(result.stderr)
    assert second.prompt > first.prompt  # history grows
    assert second.cached > 0
    assert after_reset.prompt == first.prompt  # /reset forgets it
    notices = [line for line in result.stderr.splitlines() if "/nope" in line]
    assert notices == ["[langchain-mlx] unknown command '/nope' (ignored); try /help"]
    assert "/reset   forget the conversation" in result.stderr  # /help, on stderr
    assert ">>>" not in result.stdout + result.stderr
    assert result.stdout.count("\n") >= 3


def test_a_question_is_answered_once(tiny_model_path: str) -> None:
    result = _run_cli(tiny_model_path, "not read\n", "--max-tokens", "3", "-v", "Hi")
    assert result.returncode == 0, result.stderr
    (summary,) = _summaries(result.stderr)
    assert summary.generated == 3
    assert result.stdout.endswith("\n")


# ---------------------------------------------------------------- in-process

Step = str | AIMessageChunk | BaseException

LAST = AIMessageChunk(
    content="",
    usage_metadata={
        "input_tokens": 12,
        "output_tokens": 2,
        "total_tokens": 14,
        "input_token_details": {"cache_read": 8},
    },
    response_metadata={
        "finish_reason": "stop",
        "prompt_tokens_per_second": 100.0,
        "generation_tokens_per_second": 50.0,
    },
    chunk_position="last",
)
HELLO: list[Step] = ["Hel", "lo", LAST]


class _FakeChat:
    """Stands in for ChatMLX: one script of chunks per call; records the calls.

    A `BaseException` in a script is raised inside the stream at that point
    (where a real Ctrl-C usually lands: waiting for the next token). `open`
    counts streams not yet closed; `on_close` is raised when a stream is
    closed early (a second Ctrl-C while the first is being handled).
    """

    def __init__(
        self, *scripts: list[Step], on_close: BaseException | None = None
    ) -> None:
        self.scripts = list(scripts)
        self.calls: list[list[BaseMessage]] = []
        self.open = 0
        self.open_at_call: list[int] = []
        self.on_close = on_close

    def stream(self, messages: Sequence[BaseMessage]) -> Iterator[AIMessageChunk]:
        self.calls.append(list(messages))
        self.open_at_call.append(self.open)
        turn = len(self.calls) - 1
        return self._run(self.scripts[turn] if turn < len(self.scripts) else HELLO)

    def _run(self, script: list[Step]) -> Iterator[AIMessageChunk]:
        self.open += 1
        try:
            for step in script:
                if isinstance(step, BaseException):
                    raise step
                yield AIMessageChunk(content=step) if isinstance(step, str) else step
        except GeneratorExit:
            if self.on_close is not None:
                raise self.on_close from None
            raise
        finally:
            self.open -= 1


class _Terminal(io.StringIO):
    """Fake stdin that is a terminal; raises `interrupt` on its Nth line read."""

    def __init__(self, text: str, interrupt_at: int | None = None) -> None:
        super().__init__(text)
        self.reads = 0
        self.interrupt_at = interrupt_at

    def isatty(self) -> bool:
        return True

    def readline(self, size: int | None = -1, /) -> str:  # type: ignore[override]  # typeshed: _IOBase and _TextIOBase disagree
        self.reads += 1
        if self.reads == self.interrupt_at:
            raise KeyboardInterrupt
        return super().readline(-1 if size is None else size)


class _Stdout(io.StringIO):
    """Fake stdout; Ctrl-C arrives while it writes `interrupt_on` (once)."""

    def __init__(self, interrupt_on: str | None = None) -> None:
        super().__init__()
        self.interrupt_on = interrupt_on

    def write(self, text: str) -> int:
        if text == self.interrupt_on:
            self.interrupt_on = None
            raise KeyboardInterrupt
        return super().write(text)


def _session(
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    chat: Any,
    stdin: io.StringIO | str,
    *args: str,
    stdout: io.StringIO | None = None,
) -> tuple[int, str, str]:
    """Run `langchain-mlx chat --model model *args` in-process; code, out, err."""
    out, err = stdout or _Stdout(), io.StringIO()
    monkeypatch.setattr(
        sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin
    )
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    if chat is not None:
        monkeypatch.setattr(cli, "_open_chat", lambda args: chat)
    else:  # the engine is shared in this process: keep its options as they are
        args = (*args, "--no-disk-cache")
    code = cli.main(["chat", "--model", model, *args])
    return code, out.getvalue(), err.getvalue()


def test_history_is_sent_each_turn_and_reset_forgets(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat()
    code, out, err = _session(
        monkeypatch, tiny_model_path, chat, "one\n\ntwo\n/reset\nthree\n"
    )
    assert (code, out, err) == (0, "Hello\nHello\nHello\n", "")
    one, two, three = chat.calls
    assert one == [HumanMessage("one")]
    assert [type(m) for m in two] == [HumanMessage, AIMessage, HumanMessage]
    assert two[1].content == "Hello"  # the chunks added up
    assert two[1].usage_metadata == LAST.usage_metadata  # type: ignore[attr-defined]
    assert two[2] == HumanMessage("two")
    assert three == [HumanMessage("three")]
    assert chat.open == 0


def test_verbose_prints_one_summary_per_answer(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    code, _, err = _session(monkeypatch, tiny_model_path, _FakeChat(), "a\nb\n", "-v")
    assert code == 0
    line = (
        "[langchain-mlx] 12 prompt tokens (8 from cache, 100.0 tok/s), "
        "2 generated (50.0 tok/s), finish: stop"
    )
    assert err.splitlines() == [line, line]


def test_unknown_command_and_slash_escape(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat()
    code, out, err = _session(
        monkeypatch, tiny_model_path, chat, "/nope now\n//etc/hosts\n/quit\nx\n"
    )
    assert code == 0
    assert out == "Hello\n"
    assert err == "[langchain-mlx] unknown command '/nope' (ignored); try /help\n"
    assert chat.calls == [[HumanMessage("/etc/hosts")]]


def test_ctrl_c_in_the_stream_stops_the_answer_not_the_session(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat(HELLO, ["Hel", KeyboardInterrupt(), "lo", LAST])
    code, out, err = _session(monkeypatch, tiny_model_path, chat, "one\ntwo\nthree\n")
    assert code == 0
    assert out == "Hello\nHel\nHello\n"  # the stopped answer ends its line
    assert err == (
        "[langchain-mlx] stopped; this question and its partial answer are not kept\n"
    )
    # the interrupted turn (question and partial answer) is not in the history
    assert _turns(chat.calls[2]) == [
        ("human", "one"),
        ("ai", "Hello"),
        ("human", "three"),
    ]
    assert chat.open_at_call == [0, 0, 0]


def test_ctrl_c_while_writing_closes_the_stream(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    # Ctrl-C lands in the CLI, not in the stream: the CLI must close the
    # stream (for ChatMLX, closing cancels the request in the engine)
    chat = _FakeChat()
    code, out, _ = _session(
        monkeypatch, tiny_model_path, chat, "one\ntwo\n", stdout=_Stdout("lo")
    )
    assert code == 0
    assert out == "Hel\nHello\n"
    assert chat.open_at_call == [0, 0]  # closed before the next turn began
    assert chat.calls[1] == [HumanMessage("two")]
    assert chat.open == 0


def test_second_ctrl_c_ends_the_session(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat(on_close=KeyboardInterrupt())  # the 2nd, while stopping
    code, out, _ = _session(
        monkeypatch, tiny_model_path, chat, "one\ntwo\n", stdout=_Stdout("lo")
    )
    assert code == 130
    assert out == "Hel"
    assert len(chat.calls) == 1


def test_terminal_session_prompts_and_ends_at_ctrl_d(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat()
    code, out, err = _session(
        monkeypatch, tiny_model_path, chat, _Terminal("hi\n/reset\n")
    )
    assert code == 0
    assert out == "Hello\n\n"  # Ctrl-D ends the prompt's line
    # stdout is not a terminal: prompts and notices go to stderr
    assert err.startswith(f"[langchain-mlx] chatting with {tiny_model_path};")
    assert err.count(">>> ") == 3
    assert "[langchain-mlx] the conversation is forgotten" in err


def test_ctrl_c_at_the_prompt_exits_130(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat()
    code, out, _ = _session(
        monkeypatch, tiny_model_path, chat, _Terminal("hi\nnever\n", interrupt_at=2)
    )
    assert code == 130
    assert out == "Hello\n\n"
    assert len(chat.calls) == 1


def test_context_window_full(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    full = ContextWindowExceededError("the prompt has 9000 tokens; shorten it")
    # piped: a script cannot /reset, so the session fails as one error line
    code, out, err = _session(
        monkeypatch, tiny_model_path, _FakeChat(HELLO, [full]), "one\ntwo\nthree\n"
    )
    assert (code, out) == (2, "Hello\n")
    assert err == "langchain-mlx: error: the prompt has 9000 tokens; shorten it\n"
    # on a terminal: the turn is dropped, the session goes on
    chat = _FakeChat(HELLO, [full])
    code, out, err = _session(
        monkeypatch, tiny_model_path, chat, _Terminal("one\ntwo\nthree\n")
    )
    assert (code, out) == (0, "Hello\nHello\n\n")
    assert (
        "langchain-mlx: error: the prompt has 9000 tokens; shorten it; or /reset\n"
        in err
    )
    assert _turns(chat.calls[2]) == [
        ("human", "one"),
        ("ai", "Hello"),
        ("human", "three"),
    ]


def test_a_question_does_not_read_stdin(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    chat = _FakeChat()
    code, out, err = _session(
        monkeypatch, tiny_model_path, chat, _Terminal("", interrupt_at=1), "Hi"
    )
    assert (code, out, err) == (0, "Hello\n", "")
    assert chat.calls == [[HumanMessage("Hi")]]


def test_ctrl_c_with_the_real_engine(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str
) -> None:
    # the real ChatMLX: Ctrl-C after a few tokens closes its stream (the engine
    # cancels the request) and the next turn is answered as if it had not been
    args = ("--max-tokens", "12", "--temperature", "1", "--seed", "3", "-v")
    code, _, err = _session(monkeypatch, tiny_model_path, None, "q\n", *args)
    assert code == 0
    (alone,) = _summaries(err)

    writes = 0

    class _ThirdWrite(_Stdout):
        def write(self, text: str) -> int:
            nonlocal writes
            writes += 1
            if writes == 3:
                raise KeyboardInterrupt
            return super().write(text)

    code, out, err = _session(
        monkeypatch, tiny_model_path, None, "q\nq\n", *args, stdout=_ThirdWrite()
    )
    assert code == 0
    assert "stopped; this question and its partial answer are not kept" in err
    (after,) = _summaries(err)
    assert after.prompt == alone.prompt  # the stopped turn is not in the history
    assert after.generated == 12
    assert out.endswith("\n")

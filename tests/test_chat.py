"""tokenrecycle chat: turns, /reset, Ctrl-C and Ctrl-D, driven by injected streams, a pipe and a terminal."""

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from tokenrecycle.chat import ChatSettings, chat_session

SETTINGS = ChatSettings(max_new_tokens=8)
CHAT = [sys.executable, "-m", "tokenrecycle.cli", "chat", "--no-tune", "--dtype", "float32"]


class Recording:
    """The generator, recording the messages each turn sends."""

    def __init__(self, generator):
        self.generator = generator
        self.prompts: list[list[dict]] = []

    def stream(self, messages, *args, **kwargs):
        self.prompts.append(list(messages))
        return self.generator.stream(messages, *args, **kwargs)


def lines_then(lines, end=EOFError):
    """A read_line that returns these lines, then raises `end` (EOF: Ctrl-D; KeyboardInterrupt: Ctrl-C)."""
    pending = list(lines)

    def read_line(prompt):
        if not pending:
            raise end
        return pending.pop(0)

    return read_line


def run_session(generator, lines, end=EOFError, out=None):
    recording = Recording(generator)
    out = out or io.StringIO()
    err = io.StringIO()
    code = chat_session(recording, SETTINGS, lines_then(lines, end), out, err)
    return code, recording.prompts, out, err.getvalue()


def test_turns_build_the_conversation_and_each_answer_has_stats(smollm2):
    code, prompts, out, err = run_session(smollm2, ["Name a fruit.", "", "   ", "What colour is it?"])
    assert code == 0
    assert len(prompts) == 2  # blank lines are ignored
    first = smollm2.generate([{"role": "user", "content": "Name a fruit."}], 8)
    assert prompts[1] == [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "What colour is it?"},
    ]
    assert out.getvalue().startswith(first.text + "\n")
    assert err.count("[tokenrecycle] ") == 2 and "MAT" in err


def test_reset_starts_a_new_conversation(smollm2):
    _, prompts, _, err = run_session(smollm2, ["Name a fruit.", "/reset", "Hi"])
    assert prompts[1] == [{"role": "user", "content": "Hi"}]
    assert "(conversation cleared)" in err


def test_ctrl_c_at_the_prompt_ends_the_session(smollm2):
    code, prompts, _, _ = run_session(smollm2, ["Hi"], end=KeyboardInterrupt)
    assert code == 0 and len(prompts) == 1


class InterruptedOnce(io.StringIO):
    """Output whose first write is hit by Ctrl-C, as if the user pressed it mid-answer."""

    interrupted = False

    def write(self, text):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_during_an_answer_drops_that_exchange_and_goes_on(smollm2):
    code, prompts, out, err = run_session(smollm2, ["Name a fruit.", "Hi"], out=InterruptedOnce())
    assert code == 0
    assert prompts[1] == [{"role": "user", "content": "Hi"}]  # neither the question nor the half answer
    assert "(answer interrupted" in err and err.count("[tokenrecycle] ") == 1
    assert out.getvalue().strip()  # the next answer streamed


def test_a_conversation_past_the_context_window_is_one_line_and_the_session_goes_on(smollm2):
    _, prompts, _, err = run_session(smollm2, ["word " * 9000, "Hi"])
    assert prompts[1] == [{"role": "user", "content": "Hi"}]
    too_long = [line for line in err.splitlines() if "exceeds the context window" in line]
    assert len(too_long) == 1 and too_long[0].startswith("tokenrecycle: ") and "/reset" in too_long[0]
    assert err.count("[tokenrecycle] ") == 1


def test_undecodable_line_is_ignored(smollm2):
    _, prompts, _, err = run_session(smollm2, ["caf\udce9", "Hi"])
    assert prompts == [[{"role": "user", "content": "Hi"}]]
    assert "not valid UTF-8; ignored" in err


def test_chat_through_a_pipe():
    lines = b"Name a fruit.\n\n\xff\xfe\n/reset\nHi\n"
    result = subprocess.run([*CHAT, "--max-new-tokens", "8"], input=lines, capture_output=True, timeout=300)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert err.count("[tokenrecycle] ") == 2 and "(conversation cleared)" in err and "not valid UTF-8" in err
    assert result.stdout.strip() and "> " not in result.stdout.decode()  # no prompts in piped output


def test_chat_option_errors_are_one_line(capsys):
    from tokenrecycle.cli import main

    code = main(["chat", "--stop", ""])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "tokenrecycle: error: a stop string must be a non-empty string (an empty one matches before the first token)"
    )


class Terminal:
    """A process on a pseudo-terminal: what it writes, and keys typed to it (Ctrl-C is a SIGINT)."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its stdin, stdout and stderr
            os.execv(argv[0], argv)
        self.seen = ""

    def expect(self, text, timeout=120.0):
        """Read until `text` appears after what earlier calls consumed; return what came before it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            self._read(text, deadline - time.monotonic())
        before, _, self.seen = self.seen.partition(text)
        return before

    def expect_output(self, timeout=60.0):
        """Wait for anything not yet consumed, and consume it."""
        if not self.seen:
            self._read("output", timeout)
        self.seen = ""

    def _read(self, wanted, timeout):
        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            raise AssertionError(f"no {wanted!r} in time; the terminal shows:\n{self.seen}")
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            raise AssertionError(f"the process ended before {wanted!r}; the terminal shows:\n{self.seen}")
        self.seen += chunk.decode(errors="replace")

    def type(self, keys: bytes):
        os.write(self.fd, keys)

    def exit_code(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # keep the terminal drained so the child never blocks on a write
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                pass
        self.kill()
        raise AssertionError(f"still running after {timeout} s; the terminal shows:\n{self.seen}")

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except OSError:
            pass


def test_chat_in_a_terminal_ctrl_c_stops_an_answer_and_the_session_goes_on():
    terminal = Terminal([*CHAT, "--tree", "none", "--max-new-tokens", "16"])
    try:
        terminal.expect("> ")
        terminal.type(b"Count from one to twenty in words.\r")
        terminal.expect("Count from one to twenty in words.")  # the echo
        terminal.expect("\n")
        terminal.expect_output()  # the answer is streaming: Ctrl-C now
        terminal.type(b"\x03")
        terminal.expect("(answer interrupted: it and its question are left out of the conversation)")
        terminal.expect("> ")
        terminal.type(b"Hi\r")
        terminal.expect("[tokenrecycle] ")  # the next turn is answered, with its stats line
        terminal.expect("> ")
        time.sleep(0.5)  # a SIGINT that lands before input() waits is only seen after the next line
        terminal.type(b"\x03")  # Ctrl-C at the prompt: the session ends cleanly
        assert terminal.exit_code() == 0
    finally:
        terminal.kill()

"""What the server's tests share: `tokenrecycle serve` in a subprocess on a tiny random Llama with
SmolLM2's tokenizer, and small helpers to read what it answers. Everything talks to 127.0.0.1
only, and every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_models import save_tiny_llama, smollm2_tokenizer

MODEL = "tiny"
KEY = "test-key"
START_TIMEOUT_S = 90
READY_LINE = re.compile(r"serving (\S+) on (http://127\.0\.0\.1:\d+)/v1")


class ServerProcess:
    """`tokenrecycle serve` in a subprocess, one torch thread; its stderr in a file."""

    def __init__(self, model_dir: str, log: Path, *options: str):
        command = [sys.executable, "-m", "tokenrecycle.cli", "serve", "--model", model_dir, "--dtype", "float32",
                   "--tree", "tr4", "--port", "0", "--served-model-name", MODEL, *options]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENRECYCLE_API_KEY": KEY}
        self.log = log
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        self.url = self._wait_until_serving()

    def _wait_until_serving(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = READY_LINE.search(self.log.read_text(errors="replace"))
            if found:
                return found.group(2)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    return save_tiny_llama(tmp_path_factory.mktemp("serve") / "model", smollm2_tokenizer(), 2, seed=3)


def metric(http, name: str, labels: str = "") -> float:
    """A sample's value in /metrics (0 when absent), summed over its label sets matching `labels`."""
    text = http.get("/metrics").text
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(value) for found_labels, value in pattern.findall(text) if labels in (found_labels or ""))


def wait_for(condition, timeout: float = 10, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def sse_events(response) -> list:
    """The data of each Server-Sent Event of a streamed response; [DONE] as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events

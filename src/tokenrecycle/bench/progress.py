"""Progress of a long benchmark with an ETA: a rich bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_EVERY_SECONDS = 30.0


class BenchProgress:
    """Counts method runs. `enabled=False` prints nothing (tests, the library API)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = 0
        self.done = 0
        self.started: float | None = None  # set by the first run: loading and warm-up are not in the ETA
        self._last_log = 0.0
        self._bar: Progress | None = None
        if enabled and sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(stderr=True),
            )  # fmt: skip
            self._task = self._bar.add_task("bench", total=None)
            self._bar.start()

    def add_work(self, runs: int) -> None:
        self.total += runs
        if self._bar:
            self._bar.update(self._task, total=self.total)

    def advance(self, description: str) -> None:
        """Called as a run starts; the count is of runs started, the last one still going."""
        if self.started is None:
            self.started = time.perf_counter()
        if self.done and self._bar:
            self._bar.update(self._task, advance=1, description=description)
        elif self._bar:
            self._bar.update(self._task, description=description)
        self.done += 1
        if self.enabled and not self._bar and time.perf_counter() - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = time.perf_counter()
            self.note(f"[{self.done}/{self.total}] {description} · elapsed {self._clock(self._elapsed())} · ETA {self._eta()}")

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar:
            self._bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar:
            self._bar.update(self._task, completed=self.done)
            self._bar.stop()

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0

    def _eta(self) -> str:
        if self.done < 2 or not self.total:
            return "?"
        return self._clock(self._elapsed() / (self.done - 1) * (self.total - self.done + 1))

    @staticmethod
    def _clock(seconds: float) -> str:
        minutes, seconds = divmod(int(seconds), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"

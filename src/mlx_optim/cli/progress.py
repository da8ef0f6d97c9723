"""A one-line progress bar on stderr, without dependencies; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    """``[3/8] Adam  [#######.............] 120/300  loss 0.4132``, redrawn at most 10 times a second."""

    def __init__(self, total: int, tasks: int = 1, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total, self.tasks, self.width = total, tasks, width
        self.task, self.last = 1, 0.0

    def update(self, label: str, done: int, loss: float | None = None) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        filled = self.width * done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        counter = f"[{self.task}/{self.tasks}] " if self.tasks > 1 else ""
        tail = "" if loss is None else f"  loss {loss:.4f}"
        self.stream.write(f"\r{counter}{label:<10} [{bar}] {done}/{self.total}{tail}\x1b[K")
        self.stream.flush()

    def next(self) -> None:
        self.task += 1

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

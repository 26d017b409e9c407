"""How long the worker (its GPU) waits between requests, for the benchmark.

With KILN_IDLE_TRACE=<file>, the worker appends one line per work request it takes after the
first: `<type> <ms>`, the milliseconds from starting to write the previous request's final frame
(result or error; the write itself is counted) to starting this request's work: read off stdin,
parsed, checked against the protocol and handed to the main thread. Measured here, on the
worker's side of the pipe, so it is the gap the GPU sees, whatever the agent believes.
"""

from __future__ import annotations

import os
import threading
import time


class IdleTrace:
    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: a killed worker loses nothing
        self._lock = threading.Lock()
        self._last_final: float | None = None

    @classmethod
    def from_env(cls) -> "IdleTrace | None":
        path = os.environ.get("KILN_IDLE_TRACE")
        return cls(path) if path else None

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def wrap(self, writer):
        """`writer`, noting the moment each final frame starts to be written."""
        return _TracedWriter(writer, self)

    def _final(self, at: float) -> None:
        with self._lock:
            self._last_final = at

    def taken(self, request_type: str, start_at: float) -> None:
        """A work request starts at `start_at` (perf_counter)."""
        with self._lock:
            last = self._last_final
        if last is not None:
            self._file.write(f"{request_type} {max(0.0, (start_at - last) * 1000):.3f}\n")


FINAL_TYPES = frozenset({"result", "loaded", "trained", "self_test_result", "error"})


class _TracedWriter:
    """A FrameWriter that tells the trace when a request's final frame goes out."""

    def __init__(self, writer, trace: IdleTrace):
        self._writer = writer
        self._trace = trace

    def send(self, message: dict) -> None:
        at = time.perf_counter()
        self._writer.send(message)
        if message.get("type") in FINAL_TYPES:
            self._trace._final(at)

    def log(self, request_id, level: str, message: str) -> None:
        self._writer.log(request_id, level, message)

    def error(self, request_id: str, error: dict, state) -> None:
        at = time.perf_counter()
        self._writer.error(request_id, error, state)
        self._trace._final(at)

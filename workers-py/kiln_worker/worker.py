"""The request loop: a reader thread takes lines off stdin; the main thread runs requests one at
a time, in arrival order. Cancel is handled on the reader thread so it takes effect mid-request.

Every request gets exactly one final frame (ready, result, loaded, trained, error or bye), after its
progress, previews, checkpoints and logs. A request that was still queued when canceled gets its `canceled` error at once.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import threading
import traceback
from dataclasses import dataclass, field

from . import __version__
from .backends.base import Backend
from .errors import WorkerError, coerce_error
from .idle_trace import IdleTrace
from .previews import Previews
from .protocol import FrameWriter, InvalidMessage, parse_line

log = logging.getLogger("kiln_worker")

MAX_LINE_BYTES = 16 * 1024 * 1024  # far above any valid request; guards memory against a runaway writer
WORK_TYPES = ("generate", "load", "unload", "train", "self_test")  # queued by id, cancelable, refused while closing
_EOF = object()


@dataclass
class _Request:
    message: dict
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "canceled by the agent"

    @property
    def id(self) -> str:
        return self.message["id"]

    @property
    def type(self) -> str:
        return self.message["type"]


class Worker:
    def __init__(self, backend: Backend, writer: FrameWriter, stdin_fd: int = 0):
        self._backend = backend
        self._writer = writer
        self._stdin_fd = stdin_fd
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._lock = threading.Lock()  # guards _current, _pending, _closing
        self._current: _Request | None = None
        self._pending: dict[str, _Request] = {}  # queued work requests (WORK_TYPES) by id
        self._closing = False
        self._idle = IdleTrace.from_env()
        if self._idle:
            self._writer = self._idle.wrap(writer)

    def run(self) -> int:
        """Serve until shutdown or stdin EOF; return the exit code."""
        reader = threading.Thread(target=self._read_loop, name="kiln-stdin", daemon=True)
        reader.start()
        while True:
            item = self._queue.get()
            if item is _EOF:
                log.info("stdin closed; exiting")
                return 0
            assert isinstance(item, _Request)
            with self._lock:
                if item.type in WORK_TYPES:
                    if self._pending.pop(item.id, None) is None:
                        continue  # canceled while queued; its error is already sent
                self._current = item
            try:
                if item.type == "shutdown":
                    self._writer.send({"type": "bye", "id": item.id})
                    log.info("shutdown requested; exiting")
                    return 0
                if self._idle and item.type in WORK_TYPES:
                    self._idle.taken(item.type, IdleTrace.now())  # the work starts now: read, parsed, checked, handed over
                self._execute(item)
            finally:
                with self._lock:
                    self._current = None

    # -- main thread ------------------------------------------------------------------------

    def _execute(self, req: _Request) -> None:
        try:
            if req.type == "hello":
                self._writer.send(self._ready(req.id))
            elif req.type == "generate":
                self._generate(req)
            elif req.type == "load":
                self._load(req)
            elif req.type == "unload":
                self._unload(req)
            elif req.type == "train":
                self._train(req)
            elif req.type == "self_test":
                self._self_test(req)
            else:  # the schema admits nothing else on the queue
                raise WorkerError("internal", f"unexpected request type {req.type!r}")
        except Exception as exc:
            err = coerce_error(exc)
            if err.code == "canceled":
                err = WorkerError("canceled", req.cancel_reason)
            elif err.code == "internal":
                log.error("request %s failed:\n%s", req.id, traceback.format_exc())
            else:
                log.info("request %s failed: %s: %s", req.id, err.code, err.message)
            self._writer.error(req.id, err.to_wire(), self._safe_state())

    def _ready(self, request_id: str) -> dict:
        return {
            "type": "ready",
            "id": request_id,
            "worker": {"version": __version__, "pid": os.getpid(), "python": platform.python_version()},
            "device": self._backend.device(),
            "capabilities": self._backend.capabilities(),
            "state": self._backend.state(),
        }

    def _generate(self, req: _Request) -> None:
        msg = req.message
        log.info("generate %s (job %s attempt %s) on %s", req.id, msg["job_id"], msg["attempt"], msg["request"]["model"]["base"])

        previews = Previews.of(msg["request"], lambda frame: self._writer.send({"type": "preview", "id": req.id, **frame}), self._log_cb(req))
        try:
            result = self._backend.generate(msg["request"], msg["job_dir"], self._progress(req), req.cancel, self._log_cb(req),
                                            files=msg["files"], previews=previews)
        finally:
            if previews is not None:
                log.info("generate %s: %d previews sent, %d skipped, %.1f ms spent on them", req.id, previews.sent, previews.skipped, previews.spent_ms)
        self._writer.send(
            {
                "type": "result",
                "id": req.id,
                "outputs": result.outputs,
                "timings": result.timings,
                "loaded_models": result.loaded_models,
                "state": self._backend.state(),
            }
        )

    def _progress(self, req: _Request):
        def progress(stage: str, step: int, total: int, loss: float | None = None) -> None:
            frame = {"type": "progress", "id": req.id, "stage": stage, "step": step, "total": total}
            if loss is not None:
                frame["loss"] = float(loss)
            self._writer.send(frame)

        return progress

    def _log_cb(self, req: _Request):
        return lambda level, message: self._writer.log(req.id, level, message)

    def _loaded(self, req: _Request, models: list[str], load_ms: float) -> None:
        self._writer.send({"type": "loaded", "id": req.id, "models": models, "timings": {"load_ms": round(load_ms, 3)},
                           "state": self._backend.state()})

    def _load(self, req: _Request) -> None:
        msg = req.message
        log.info("load %s: %s into %s%s", req.id, ", ".join(msg["models"]), msg["location"], " (pinned)" if msg["pin"] else "")
        result = self._backend.load(list(msg["models"]), msg["location"], msg["pin"], self._progress(req), req.cancel, self._log_cb(req))
        self._loaded(req, result.models, result.load_ms)

    def _unload(self, req: _Request) -> None:
        msg = req.message
        log.info("unload %s: %s", req.id, ", ".join(msg["models"]))
        result = self._backend.unload(list(msg["models"]), self._log_cb(req))
        self._loaded(req, result.models, 0)

    def _train(self, req: _Request) -> None:
        msg = req.message
        log.info("train %s (job %s attempt %s): %s on %s, %d steps%s", req.id, msg["job_id"], msg["attempt"],
                 msg["request"]["output"]["name"], msg["request"]["base_model"], msg["request"]["hyperparameters"]["steps"],
                 f", resuming at step {msg['resume']['step']}" if msg.get("resume") else "")

        def checkpoint(step: int, path: str, sha256: str, size: int) -> None:
            self._writer.send({"type": "checkpoint", "id": req.id, "step": step, "path": path, "sha256": sha256, "bytes": size})

        result = self._backend.train(msg, self._progress(req), checkpoint, req.cancel, self._log_cb(req))
        self._writer.send(
            {
                "type": "trained",
                "id": req.id,
                "path": result.path,
                "sha256": result.sha256,
                "bytes": result.bytes,
                "steps": result.steps,
                "final_loss": float(result.final_loss),
                "timings": {k: round(float(v), 3) for k, v in result.timings.items()},
                "state": self._backend.state(),
            }
        )

    def _self_test(self, req: _Request) -> None:
        from .self_test import run_self_test

        msg = req.message
        log.info("self_test %s (job %s attempt %s): %s", req.id, msg["job_id"], msg["attempt"], ", ".join(msg["checks"]))
        report = run_self_test(self._backend, msg, self._progress(req), req.cancel, self._log_cb(req))
        log.info("self_test %s: %s%s", req.id, report["verdict"], f" ({'; '.join(report['reasons'])})" if report["reasons"] else "")
        self._writer.send({"type": "self_test_result", "id": req.id, "report": report, "state": self._backend.state()})

    def _safe_state(self) -> dict | None:
        try:
            return self._backend.state()
        except Exception:
            log.exception("backend state unavailable")
            return None

    # -- reader thread ----------------------------------------------------------------------

    def _read_loop(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = os.read(self._stdin_fd, 65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._on_line(line)
                if len(buffer) > MAX_LINE_BYTES:
                    self._writer.log(None, "error", f"ignored an input line longer than {MAX_LINE_BYTES} bytes")
                    buffer = b""
            if buffer.strip():
                self._on_line(buffer)
        except Exception:
            log.exception("stdin reader failed")
        finally:
            self._close("stdin closed")
            self._queue.put(_EOF)

    def _on_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            parsed = parse_line(line)
            if isinstance(parsed, InvalidMessage):
                self._on_invalid(parsed)
            else:
                self._on_message(parsed)
        except Exception as exc:  # never let one bad line take the worker down
            log.exception("failed to handle an input line")
            self._writer.log(None, "error", f"failed to handle an input line: {exc}")

    def _on_invalid(self, bad: InvalidMessage) -> None:
        log.warning("invalid message (id=%s type=%s): %s", bad.id, bad.type, bad.description)
        if bad.type in WORK_TYPES and bad.id is not None and not self._known(bad.id):
            err = WorkerError("invalid_request", f"invalid {bad.type} message: {bad.description}")
            self._writer.error(bad.id, err.to_wire(), self._safe_state())
            return
        what = f" (id {bad.id!r}, type {bad.type!r})" if bad.id or bad.type else ""
        self._writer.log(None, "error", f"ignored an invalid message{what}: {bad.description}")

    def _known(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._pending or (self._current is not None and self._current.id == request_id)

    def _on_message(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "cancel":
            self._cancel(msg["id"])
            return
        if kind == "shutdown":
            self._close("worker shutting down")
            self._queue.put(_Request(msg))
            return
        req = _Request(msg)
        with self._lock:
            if kind in WORK_TYPES:
                if self._closing:
                    refused = WorkerError("unavailable", "worker is shutting down; send the request to a fresh worker")
                elif req.id in self._pending or (self._current is not None and self._current.id == req.id):
                    self._writer.log(None, "error", f"ignored {kind} {req.id!r}: a request with that id is already queued or running")
                    return
                else:
                    refused = None
                    self._pending[req.id] = req
            else:
                refused = None
        if refused is not None:
            self._writer.error(req.id, refused.to_wire(), self._safe_state())
            return
        self._queue.put(req)

    def _cancel(self, target: str) -> None:
        with self._lock:
            current = self._current
            if current is not None and current.id == target and current.type in WORK_TYPES:
                current.cancel.set()
                log.info("cancel %s: stopping at the next step", target)
                return
            queued = self._pending.pop(target, None)
        if queued is None:
            self._writer.log(None, "warning", f"cancel {target!r}: no such request running or queued")
            return
        log.info("cancel %s: dropped from the queue", target)
        self._writer.error(target, WorkerError("canceled", "canceled by the agent before it started").to_wire(), self._safe_state())

    def _close(self, reason: str) -> None:
        """Stop taking work: cancel what runs, fail what waits."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._current is not None:
                self._current.cancel_reason = f"canceled: {reason}"
                self._current.cancel.set()
            dropped = list(self._pending.values())
            self._pending.clear()
        for req in dropped:
            self._writer.error(req.id, WorkerError("canceled", f"canceled before it started: {reason}").to_wire(), self._safe_state())

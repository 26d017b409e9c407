"""Drives real `python -m kiln_worker` processes over JSON lines, the way a gpu-agent does.

Every line a worker writes on stdout must be one JSON object valid against worker-to-agent.json;
`WorkerProcess` fails the test on the first one that is not.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from kiln_worker.protocol import validation_problems
from kiln_worker.torch_compat import ensure_torchvision_importable

# the diffusers tests import diffusers, transformers and spandrel, which import torchvision: beside
# a CPU-only torch it needs this first (torch_compat.py); without torchvision installed it does nothing
ensure_torchvision_importable()

WORKERS_PY = Path(__file__).resolve().parents[1]
SCHEMAS = WORKERS_PY / "kiln_worker" / "schemas"
OUT_VALIDATOR = Draft202012Validator(json.loads((SCHEMAS / "worker-to-agent.json").read_text()))
IN_VALIDATOR = Draft202012Validator(json.loads((SCHEMAS / "agent-to-worker.json").read_text()))
DIFFUSERS_SKIP_REASON = "diffusers is not installed here (npm run setup:diffusers adds it); the diffusers backend tests run wherever it is"


def import_diffusers_or_skip():
    """diffusers, or skip the calling test module cleanly where it is not installed.

    KILN_REQUIRE_DIFFUSERS=1 (set by .ci/run, which installs the extras) makes a missing or broken
    diffusers fail the module instead, so CI cannot pass with the diffusers tests skipped.
    """
    if os.environ.get("KILN_REQUIRE_DIFFUSERS") == "1":
        import diffusers

        return diffusers
    return pytest.importorskip("diffusers", reason=DIFFUSERS_SKIP_REASON)


FINAL_TYPES = {"ready", "result", "loaded", "trained", "self_test_result", "error", "bye"}
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def assert_valid_outgoing(message: dict) -> None:
    errors = sorted(OUT_VALIDATOR.iter_errors(message), key=str)
    assert not errors, f"worker sent a message that breaks worker-to-agent.json: {message}\n{errors[0]}"


def generate_message(request_id: str, job_dir: str, *, model: str = SDXL, prompt: str = "a lighthouse at dawn",
                     seed: int = 1234, steps: int = 4, width: int = 256, height: int = 256, num_images: int = 1,
                     files: dict[str, str] | None = None, scheduler: dict | None = None, **request_overrides) -> dict:
    """A valid generate message, shaped exactly like the API's resolved GenerationRequest."""
    request = {
        "model": model if isinstance(model, dict) else {"base": model},
        "scheduler": scheduler or {"type": "EulerDiscreteScheduler", "steps": steps},
        "hyperparameters": {"guidance_scale": 5, "seed": seed, "width": width, "height": height, "num_images": num_images},
        "conditioning": {"prompt": prompt, "negative_prompt": "blurry"},
        "output": {"format": "png", "quality": 90, "embed_metadata": True},
        "priority": "normal",
        "timeout_s": 600,
    }
    request.update(request_overrides)
    msg = {"v": 1, "type": "generate", "id": request_id, "job_id": f"job-{request_id}", "attempt": 1,
           "job_dir": job_dir, "files": files or {}, "request": request}
    problems = validation_problems("agent-to-worker", msg)
    assert not problems, f"test built an invalid generate message: {problems}"
    return msg


class WorkerProcess:
    def __init__(self, env: dict[str, str] | None = None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
        full_env.update({"KILN_SYNTHETIC_STEP_MS": "2", "KILN_SYNTHETIC_LOAD_MS_PER_GB": "5", "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(WORKERS_PY) + os.pathsep + full_env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=str(WORKERS_PY),
        )
        self.received: list[dict] = []
        self._lines: "queue.Queue[bytes | None]" = queue.Queue()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    def send(self, message: dict) -> None:
        self.send_raw(json.dumps(message))

    def send_raw(self, line: str) -> None:
        self.proc.stdin.write(line.encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def recv(self, timeout: float = 10.0) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from the worker within {timeout}s; stderr:\n{self.stderr}") from None
        if line is None:
            self._lines.put(None)
            raise AssertionError(f"worker closed stdout (exit {self.proc.poll()}); stderr:\n{self.stderr}")
        try:
            message = json.loads(line)
        except ValueError:
            raise AssertionError(f"worker wrote a non-JSON line on stdout: {line!r}") from None
        assert_valid_outgoing(message)
        self.received.append(message)
        return message

    def until_final(self, request_id: str, timeout: float = 10.0) -> tuple[list[dict], dict]:
        """Messages for `request_id` up to and including its final one; others are kept in `received`."""
        deadline = time.monotonic() + timeout
        before: list[dict] = []
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg.get("id") != request_id:
                continue
            if msg["type"] in FINAL_TYPES:
                return before, msg
            before.append(msg)

    def hello(self) -> dict:
        self.send({"v": 1, "type": "hello", "id": "hello-1", "agent_id": "agent-test", "gpu_id": "0"})
        _, ready = self.until_final("hello-1")
        assert ready["type"] == "ready"
        return ready

    def run(self, message: dict, timeout: float = 10.0) -> tuple[list[dict], dict]:
        self.send(message)
        return self.until_final(message["id"], timeout)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def spawn():
    """spawn(env) → a running WorkerProcess; every one is stopped (and must not leak) after the test."""
    started: list[WorkerProcess] = []

    def _spawn(env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(env)
        started.append(worker)
        return worker

    yield _spawn
    for worker in started:
        worker.stop()
        assert worker.proc.poll() is not None, "worker process leaked"

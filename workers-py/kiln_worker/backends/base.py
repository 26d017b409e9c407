"""The interface every backend implements; the request loop knows nothing else about them."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

# progress_cb(stage, step, total) with stage "loading_model" or "running"
ProgressCallback = Callable[[str, int, int], None]
# log_cb(level, message): a log message tied to the running request
LogCallback = Callable[[str, str], None]


@dataclass
class GenerateResult:
    outputs: list[dict]  # WorkerOutput objects: index, path, width, height, seed, sha256, bytes, content_type
    timings: dict  # {model_load_ms, inference_ms}
    loaded_models: list[str] = field(default_factory=list)


class Backend(ABC):
    """A generation engine. Methods are called from one thread at a time (the request loop)."""

    name: str

    @abstractmethod
    def device(self) -> dict:
        """{name, vram_total_mb} of the GPU this worker drives."""

    @abstractmethod
    def capabilities(self) -> dict:
        """WorkerCapabilities: backend, models, schedulers, output_formats, max_side, max_images."""

    @abstractmethod
    def state(self) -> dict:
        """WorkerState: vram_total_mb, vram_used_mb, resident models."""

    @abstractmethod
    def generate(
        self,
        request: dict,
        job_dir: str,
        progress_cb: ProgressCallback,
        cancel_event: threading.Event,
        log_cb: LogCallback | None = None,
    ) -> GenerateResult:
        """Run one validated generation request, writing `<job_dir>/<index>.png`.

        Raises WorkerError (canceled when `cancel_event` is set, checked between steps).
        """

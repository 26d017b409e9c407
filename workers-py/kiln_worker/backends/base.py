"""The interface every backend implements; the request loop knows nothing else about them."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Mapping

# progress_cb(stage, step, total); stage is one of STAGES, in that order within a request:
# loading_model (0/1 then 1/1 per model loaded), base 1..N and refiner 1..M (denoising steps,
# see validation.stage_steps), upscale 0..1, safety 0..1
STAGES = ("loading_model", "base", "refiner", "upscale", "safety")
ProgressCallback = Callable[[str, int, int], None]
# log_cb(level, message): a log message tied to the running request
LogCallback = Callable[[str, str], None]


@dataclass
class GenerateResult:
    # WorkerOutput objects: index, path, width, height (final, after upscaling), seed, sha256, bytes,
    # content_type, upscaled, safety, metadata (the embedded dict plus "timings": ms per stage)
    outputs: list[dict]
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
        """WorkerCapabilities: backend, models, schedulers, output_formats, max_side, max_images,
        features, controlnet_types, controlnet_preprocessors, upscalers, dtypes, performance."""

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
        files: Mapping[str, str] | None = None,
    ) -> GenerateResult:
        """Run one validated generation request, writing `<job_dir>/<index>.<png|jpg|webp>`.

        `files` maps each input image's s3_key to the local path the agent downloaded it to.
        Raises WorkerError (canceled when `cancel_event` is set, checked between steps).
        """

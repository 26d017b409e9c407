"""The interface every backend implements; the request loop knows nothing else about them."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import WorkerError
from ..previews import Previews

# progress_cb(stage, step, total[, loss]); stage is one of STAGES, in that order within a request:
# loading_model (0/1 then 1/1 per model loaded), base 1..N and refiner 1..M (denoising steps,
# see validation.stage_steps), upscale 0..1, safety 0..1; a train request: loading_model, then
# train 1..steps with `loss` (from resume.step + 1 when it resumes)
STAGES = ("loading_model", "base", "refiner", "upscale", "safety", "train")
ProgressCallback = Callable[..., None]
# log_cb(level, message): a log message tied to the running request
LogCallback = Callable[[str, str], None]
# checkpoint_cb(step, path, sha256, bytes): a checkpoint file is complete on disk (not final)
CheckpointCallback = Callable[[int, str, str, int], None]


@dataclass
class GenerateResult:
    # WorkerOutput objects: index, path, width, height (final, after upscaling), seed, sha256, bytes,
    # content_type, upscaled, safety, metadata (the embedded dict plus "timings": ms per stage)
    outputs: list[dict]
    timings: dict  # {model_load_ms, inference_ms}
    loaded_models: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    models: list[str]  # load: what it brought in (cold or from RAM) or moved; unload: what it freed
    load_ms: float = 0.0


@dataclass
class TrainResult:
    path: str  # the LoRA (safetensors, diffusers key names) in job_dir
    sha256: str
    bytes: int
    steps: int
    final_loss: float
    timings: dict  # {model_load_ms, train_ms}


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
        previews: Previews | None = None,
    ) -> GenerateResult:
        """Run one validated generation request, writing `<job_dir>/<index>.<png|jpg|webp>`.

        `files` maps each input image's s3_key to the local path the agent downloaded it to.
        `previews` (when the request asks for them): offer it the first image's current estimate
        after each base and refiner step, right after that step's progress (previews.py).
        Raises WorkerError (canceled when `cancel_event` is set, checked between steps).
        """

    # -- residency requests (cache jobs) and training ---------------------------------------
    # Defaults refuse with a clear, non-retryable error, so a backend that lacks them never
    # crashes the worker; a backend that implements them advertises it (training: the
    # "training" feature in capabilities).

    def load(
        self,
        models: list[str],
        location: str,
        pin: bool,
        progress_cb: ProgressCallback,
        cancel_event: threading.Event,
        log_cb: LogCallback | None = None,
    ) -> LoadResult:
        """Make `models` resident at `location` ("vram": hot; "ram": warm in host memory, much
        cheaper to bring to VRAM than a cold load from disk), pinned when `pin` (never evicted to
        make room; a pin is only lifted by unload). Unknown name → model_not_found naming
        `models.<i>`; no room without evicting pinned models → out_of_memory naming them."""
        raise WorkerError("invalid_request", f"(request): the {self.name} backend does not take load requests")

    def unload(self, models: list[str], log_cb: LogCallback | None = None) -> LoadResult:
        """Free `models` from VRAM and RAM and unpin them; names not resident are ignored (so an
        eviction sent to every agent is harmless). Returns what was freed, load_ms 0."""
        raise WorkerError("invalid_request", f"(request): the {self.name} backend does not take unload requests")

    def train(
        self,
        message: dict,
        progress_cb: ProgressCallback,
        checkpoint_cb: CheckpointCallback,
        cancel_event: threading.Event,
        log_cb: LogCallback | None = None,
    ) -> TrainResult:
        """Run one validated `train` message (job_dir, dataset_dir, resume, request): see
        kiln_worker/training.py for the shared checks and file layout. Checkpoints every
        `checkpoint_every` steps (atomically written, then checkpoint_cb); cancel between steps
        raises canceled and leaves the last checkpoint on disk."""
        raise WorkerError("invalid_request", f"(request): training is not supported by the {self.name} backend")

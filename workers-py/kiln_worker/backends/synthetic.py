"""The synthetic backend: a stand-in GPU that behaves like the diffusers backend wherever the
farm can observe it — model load costs, VRAM accounting with LRU eviction, per-step progress,
cancellation between steps, the same errors — and writes deterministic images.

An image depends only on (model, prompt, negative prompt, scheduler, steps, guidance, size,
seed): the same request and seed give byte-identical PNGs in any process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..config import Config, ModelSpec
from ..errors import WorkerError
from ..png import write_png
from ..protocol import scheduler_names
from .base import Backend, GenerateResult, LogCallback, ProgressCallback

log = logging.getLogger("kiln_worker.synthetic")

MAX_SIDE = 2048
MAX_IMAGES = 8
REFERENCE_PIXELS = 1024 * 1024
ACTIVATION_MB_PER_MEGAPIXEL = 1200  # working VRAM of one 1024×1024 image in flight
GRID = 6  # the random colour grid each image is smoothly upscaled from


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Resident:
    spec: ModelSpec
    last_used_at: str | None = None


def activation_mb(width: int, height: int, num_images: int) -> int:
    """Working VRAM a request needs on top of its model: ~1200 MB per 1024² image."""
    return int(round(ACTIVATION_MB_PER_MEGAPIXEL * width * height * num_images / REFERENCE_PIXELS))


def _seed_key(request: dict, seed: int) -> int:
    hp = request["hyperparameters"]
    identity = {
        "model": request["model"]["base"],
        "prompt": request["conditioning"]["prompt"],
        "negative_prompt": request["conditioning"].get("negative_prompt", ""),
        "scheduler": request["scheduler"]["type"],
        "steps": request["scheduler"]["steps"],
        "guidance_scale": float(hp["guidance_scale"]),
        "width": hp["width"],
        "height": hp["height"],
        "seed": seed,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest(), "big")


def _axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and smoothstep weights to stretch n_in samples over n_out pixels."""
    pos = np.linspace(0.0, n_in - 1, n_out, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), n_in - 2)
    t = pos - i0
    return i0, i0 + 1, (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def render_image(request: dict, seed: int) -> np.ndarray:
    """A deterministic H×W×3 uint8 image for this request and seed."""
    hp = request["hyperparameters"]
    width, height = hp["width"], hp["height"]
    rng = np.random.Generator(np.random.PCG64(_seed_key(request, seed)))
    grid = rng.random((GRID, GRID, 3), dtype=np.float32)
    prompt_digest = hashlib.sha256(request["conditioning"]["prompt"].encode("utf-8")).digest()
    tint = np.frombuffer(prompt_digest[:3], dtype=np.uint8).astype(np.float32) / 255.0
    grid = 0.65 * grid + 0.35 * tint
    y0, y1, ty = _axis(height, GRID)
    x0, x1, tx = _axis(width, GRID)
    rows = grid[y0] * (1.0 - ty)[:, None, None] + grid[y1] * ty[:, None, None]  # H × GRID × 3
    image = rows[:, x0] * (1.0 - tx)[None, :, None] + rows[:, x1] * tx[None, :, None]
    return (image * 255.0 + 0.5).astype(np.uint8)


class SyntheticBackend(Backend):
    name = "synthetic"

    def __init__(self, config: Config):
        self._config = config
        self._catalog: dict[str, ModelSpec] = {m.name: m for m in config.synthetic_models}
        self._vram_total = config.synthetic_vram_mb
        self._resident: "OrderedDict[str, _Resident]" = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # state() may be read while a request runs

    # -- interface ---------------------------------------------------------------------------

    def device(self) -> dict:
        return {"name": self._config.synthetic_gpu_name, "vram_total_mb": self._vram_total}

    def capabilities(self) -> dict:
        return {
            "backend": self.name,
            "models": [
                {"name": m.name, "kind": m.kind, "vram_mb": m.vram_mb, "load_ms": self._load_ms(m)}
                for m in self._catalog.values()
            ],
            "schedulers": scheduler_names(),
            "output_formats": ["png"],
            "max_side": MAX_SIDE,
            "max_images": MAX_IMAGES,
        }

    def state(self) -> dict:
        with self._lock:
            resident = [
                {"name": r.spec.name, "location": "vram", "vram_mb": r.spec.vram_mb, "last_used_at": r.last_used_at}
                for r in self._resident.values()
            ]
        return {
            "vram_total_mb": self._vram_total,
            "vram_used_mb": sum(r["vram_mb"] for r in resident),
            "resident": resident,
        }

    def generate(
        self,
        request: dict,
        job_dir: str,
        progress_cb: ProgressCallback,
        cancel_event: threading.Event,
        log_cb: LogCallback | None = None,
    ) -> GenerateResult:
        log_cb = log_cb or (lambda level, message: None)
        hp = request["hyperparameters"]
        width, height, num_images = hp["width"], hp["height"], hp["num_images"]
        self._check_request(request, job_dir)
        spec = self._model(request["model"]["base"])
        need_activation = activation_mb(width, height, num_images)
        if spec.vram_mb > self._vram_total:
            raise WorkerError(
                "out_of_memory",
                f"{spec.name} needs {spec.vram_mb} MB of VRAM; this GPU has {self._vram_total} MB",
            )
        if spec.vram_mb + need_activation > self._vram_total:
            raise WorkerError(
                "out_of_memory",
                f"{spec.name} ({spec.vram_mb} MB) plus {num_images}×{width}×{height} activations "
                f"({need_activation} MB) exceed this GPU's {self._vram_total} MB of VRAM",
            )

        loaded: list[str] = []
        load_started = time.perf_counter()
        if spec.name not in self._resident:
            self._make_room(spec.vram_mb + need_activation, keep=spec.name, log_cb=log_cb)
            self._load(spec, progress_cb, cancel_event)
            loaded.append(spec.name)
        else:
            self._make_room(need_activation, keep=spec.name, log_cb=log_cb)
        model_load_ms = (time.perf_counter() - load_started) * 1000.0
        self._touch(spec.name)

        inference_started = time.perf_counter()
        if self._config.synthetic_stray_print:
            # test hook: what a chatty library does; must end up on stderr, not in the protocol
            print("stray print from a library {not a frame", flush=True)
            os.write(1, b"stray write straight to fd 1\n")
        raise_on = self._config.synthetic_raise_on_prompt
        if raise_on and raise_on in request["conditioning"]["prompt"]:
            raise RuntimeError(f"synthetic fault injected for prompt containing {raise_on!r}")

        steps = request["scheduler"]["steps"]
        step_s = self._config.synthetic_step_ms / 1000.0 * (width * height * num_images) / REFERENCE_PIXELS
        for step in range(1, steps + 1):
            self._check_cancel(cancel_event)
            if step_s > 0 and cancel_event.wait(step_s):
                self._check_cancel(cancel_event)
            progress_cb("running", step, steps)
        self._check_cancel(cancel_event)

        os.makedirs(job_dir, exist_ok=True)
        outputs = []
        for index in range(num_images):
            seed = hp["seed"] + index
            path = os.path.join(os.path.abspath(job_dir), f"{index}.png")
            data = write_png(path, render_image(request, seed))
            outputs.append(
                {
                    "index": index,
                    "path": path,
                    "width": width,
                    "height": height,
                    "seed": seed,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "content_type": "image/png",
                }
            )
        self._touch(spec.name)
        inference_ms = (time.perf_counter() - inference_started) * 1000.0
        return GenerateResult(
            outputs=outputs,
            timings={"model_load_ms": round(model_load_ms, 3), "inference_ms": round(inference_ms, 3)},
            loaded_models=loaded,
        )

    # -- internals ---------------------------------------------------------------------------

    def _load_ms(self, spec: ModelSpec) -> int:
        return int(round(spec.disk_gb * self._config.synthetic_load_ms_per_gb))

    def _check_request(self, request: dict, job_dir: str) -> None:
        """What the JSON Schema cannot say but the API's zod schema does."""
        if not os.path.isabs(job_dir):
            raise WorkerError("invalid_request", f"job_dir: absolute — {job_dir!r} is not an absolute path")
        if not request["conditioning"]["prompt"].strip():
            raise WorkerError("invalid_request", "request.conditioning.prompt: too_small — must not be empty")
        hp = request["hyperparameters"]
        if hp["width"] * hp["height"] > MAX_SIDE * MAX_SIDE:
            raise WorkerError("invalid_request", f"request.hyperparameters.width: too_big — width × height must be at most {MAX_SIDE * MAX_SIDE} pixels")

    def _model(self, name: str) -> ModelSpec:
        spec = self._catalog.get(name)
        if spec is None:
            raise WorkerError("model_not_found", f"model {name!r} is not available on this worker")
        if spec.kind != "base":
            raise WorkerError("invalid_request", f"request.model.base: kind — {name!r} is a {spec.kind} model, not a base model")
        return spec

    def _make_room(self, needed_mb: int, keep: str, log_cb: LogCallback) -> None:
        """Evict least recently used models (never `keep`) until `needed_mb` more is free."""
        with self._lock:
            used = sum(r.spec.vram_mb for r in self._resident.values())
            for name in list(self._resident):
                if self._vram_total - used >= needed_mb:
                    break
                if name == keep:
                    continue
                evicted = self._resident.pop(name)
                used -= evicted.spec.vram_mb
                log.info("evicted %s (%d MB) to make room", name, evicted.spec.vram_mb)
                log_cb("info", f"evicted {name} ({evicted.spec.vram_mb} MB) from VRAM to make room")

    def _load(self, spec: ModelSpec, progress_cb: ProgressCallback, cancel_event: threading.Event) -> None:
        progress_cb("loading_model", 0, 1)
        load_s = self._load_ms(spec) / 1000.0
        if load_s > 0 and cancel_event.wait(load_s):
            self._check_cancel(cancel_event)
        self._check_cancel(cancel_event)
        with self._lock:
            self._resident[spec.name] = _Resident(spec)
        log.info("loaded %s (%d MB) in %.0f ms", spec.name, spec.vram_mb, load_s * 1000)
        progress_cb("loading_model", 1, 1)

    def _touch(self, name: str) -> None:
        with self._lock:
            resident = self._resident.get(name)
            if resident is not None:
                resident.last_used_at = _now_iso()
                self._resident.move_to_end(name)

    @staticmethod
    def _check_cancel(cancel_event: threading.Event) -> None:
        if cancel_event.is_set():
            raise WorkerError("canceled", "canceled by the agent")

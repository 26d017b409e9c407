"""The synthetic backend: a stand-in GPU that behaves like the diffusers backend wherever the
farm can observe it — the same validation and errors, suite residency with load costs and LRU
eviction in simulated VRAM, per-stage progress with the step counts diffusers would run, costs
that grow like the real ones, cancellation between steps — and writes deterministic images.

An image depends on everything that would change a real one (models, scheduler and options,
steps, guidance, size, seed, prompts, LoRAs and weights, ControlNets and their control images,
the init image, strength and mask, the refiner switch, dtype, upscaling): the same request and
seed give byte-identical files in any process, and changing any of those changes the pixels.
Where the real effect is visible (img2img, inpainting, ControlNet structure, upscaling), the
synthetic one is too: outputs are blended from the inputs the way a user would expect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

import numpy as np
from PIL import Image

from .. import images, loras, safetensors_io, training
from ..config import Config, ModelSpec
from ..errors import WorkerError, invalid_request, model_not_found
from ..output import build_metadata, file_digest, image_seed, save_image
from ..previews import Previews, shrink
from ..safety import SyntheticSafetyChecker
from ..schedulers import scheduler_kwargs
from ..tables import controlnet_types, preprocessable
from ..timings import StageTimer
from ..upscale import LANCZOS, lanczos, simulated_model
from ..validation import check_capabilities, check_request, stage_steps
from ..protocol import scheduler_names
from .base import Backend, CheckpointCallback, GenerateResult, LoadResult, LogCallback, ProgressCallback, TrainResult
from .synthetic_training import Run

log = logging.getLogger("kiln_worker.synthetic")

MAX_SIDE = 2048
MAX_IMAGES = 8
REFERENCE_PIXELS = 1024 * 1024
ACTIVATION_MB_PER_MEGAPIXEL = 1200  # working VRAM of one 1024×1024 image in flight (contracts: activationVramMb)
GRID = 6  # the random colour grid each image is smoothly upscaled from

FEATURES_ALWAYS = ("img2img", "inpaint", "upscale", "metadata", "training")
DTYPES = ("fp16", "bf16", "fp32")
PERFORMANCE = ("attention_slicing", "vae_slicing", "vae_tiling", "cpu_offload_model", "cpu_offload_sequential", "channels_last", "compile")

# Relative costs, in units of one base step of the same size (what a real SDXL run shows):
CONTROLNET_STEP_COST = 0.4  # each ControlNet adds ~40% to a denoising step
OFFLOAD_FACTOR = {"none": 1.0, "model": 1.5, "sequential": 4.0}
ATTENTION_SLICING_FACTOR = 1.1
FP32_FACTOR = 2.0
COMPILE_STEPS = 100  # torch.compile's one-time cost per base model, in 1024² steps
UPSCALE_COST = {"resample": 0.05, "model": 0.6}  # per output megapixel, in 1024² steps
SAFETY_COST = 0.3  # per image, in 1024² steps

WHAT = {"base": "base model", "refiner": "refiner", "vae": "VAE", "lora": "LoRA", "controlnet": "ControlNet",
        "upscaler": "upscaler", "safety_checker": "safety checker"}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Resident:
    spec: ModelSpec
    location: str = "vram"  # "vram" (hot) or "ram" (warm: cheaper to bring back than from disk)
    # where a pin holds it: "vram" = never leaves VRAM; "ram" = may move to RAM, never dropped
    pinned_at: str | None = None
    last_used_at: str | None = None


@dataclass
class _Plan:
    """What one request needs: its suite (field → model) and the choices made for it."""

    suite: list[tuple[str, ModelSpec]]
    controlnet_models: list[str]
    upscale: dict | None  # {factor, upscaler, kind} when upscaling
    safety_checker: str | None


def activation_mb(width: int, height: int, num_images: int) -> int:
    """Working VRAM a request needs on top of its models: ~1200 MB per 1024² image."""
    return math.ceil(ACTIVATION_MB_PER_MEGAPIXEL * width * height * num_images / REFERENCE_PIXELS)


def _axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and smoothstep weights to stretch n_in samples over n_out pixels."""
    pos = np.linspace(0.0, n_in - 1, n_out, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), n_in - 2)
    t = pos - i0
    return i0, i0 + 1, (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _colour(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest()[:3], dtype=np.uint8).astype(np.float32) / 255.0


def _identity(request: dict, seed: int, controlnet_models: list[str] | None, digests: dict, lora_digests: dict | None = None) -> dict:
    """Everything that would change a real image, as plain data."""
    hp = request["hyperparameters"]
    sched = request["scheduler"]
    cns = request.get("controlnets") or []
    cn_models = controlnet_models or [c.get("model") for c in cns]
    image = request.get("image")
    ident = {
        "model": request["model"]["base"],
        "refiner": request["model"].get("refiner"),
        "vae": request["model"].get("vae"),
        "prompt": request["conditioning"]["prompt"],
        "negative_prompt": request["conditioning"].get("negative_prompt", ""),
        "scheduler": sched["type"],
        "scheduler_options": scheduler_kwargs(sched),
        "steps": sched["steps"],
        "guidance_scale": float(hp["guidance_scale"]),
        "width": hp["width"],
        "height": hp["height"],
        "seed": seed,
        # a LoRA from a file (trained, or in a LoRA directory) is identified by its bytes too
        "loras": [[l["name"], float(l["weight"])] + ([lora_digests[l["name"]]] if (lora_digests or {}).get(l["name"]) else [])
                  for l in request.get("loras") or []],
        "controlnets": [
            [c["type"], cn_models[i], float(c["conditioning_scale"]), float(c["guidance_start"]), float(c["guidance_end"]),
             bool(c["preprocess"]), digests.get(f"controlnets.{i}")]
            for i, c in enumerate(cns)
        ],
        "init": digests.get("image.init"),
        "mask": digests.get("image.mask"),
        "strength": float(image["strength"]) if image else None,
        "refiner_options": request.get("refiner") if request["model"].get("refiner") else None,
        "dtype": (request.get("performance") or {}).get("dtype", "fp16"),
    }
    # keep the identity of a plain text-to-image request what it was before these features
    return {k: v for k, v in ident.items() if v not in (None, [], {}, "fp16")}


def _seed_key(identity: dict) -> int:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest(), "big")


def render_image(request: dict, seed: int, inputs: dict | None = None, controlnet_models: list[str] | None = None,
                 lora_digests: dict | None = None) -> np.ndarray:
    """A deterministic H×W×3 uint8 image for this request and seed, before upscaling.

    `inputs` holds the loaded input images at width × height: "image.init" and "image.mask"
    (PIL), "controlnets.<i>" (the control image after preprocessing). `lora_digests` maps the
    LoRAs that come from files to their sha256: different weights, different pixels.
    """
    lora_digests = lora_digests or {}
    inputs = inputs or {}
    hp = request["hyperparameters"]
    width, height = hp["width"], hp["height"]
    digests = {k: images.pixel_digest(v) for k, v in inputs.items()}
    rng = np.random.Generator(np.random.PCG64(_seed_key(_identity(request, seed, controlnet_models, digests, lora_digests))))
    grid = rng.random((GRID, GRID, 3), dtype=np.float32)
    grid = 0.65 * grid + 0.35 * _colour(request["conditioning"]["prompt"])
    y0, y1, ty = _axis(height, GRID)
    x0, x1, tx = _axis(width, GRID)
    rows = grid[y0] * (1.0 - ty)[:, None, None] + grid[y1] * ty[:, None, None]  # H × GRID × 3
    out = rows[:, x0] * (1.0 - tx)[None, :, None] + rows[:, x1] * tx[None, :, None]
    for lora in request.get("loras") or []:  # a LoRA pulls the palette toward its style
        a = min(0.3, 0.15 * abs(float(lora["weight"])))
        digest = lora_digests.get(lora["name"])
        out = out * (1.0 - a) + _colour(lora["name"] + (f"@{digest}" if digest else "")) * a
    for i, cn in enumerate(request.get("controlnets") or []):  # the control map shows through
        control = np.asarray(inputs[f"controlnets.{i}"], dtype=np.float32) / 255.0
        a = min(0.6, 0.3 * float(cn["conditioning_scale"]) * (float(cn["guidance_end"]) - float(cn["guidance_start"])))
        out = out * (1.0 - a) + control * a
    pixels = (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    image = request.get("image")
    if image and "image.init" in inputs:
        init = np.asarray(inputs["image.init"], dtype=np.uint8)
        strength = float(image["strength"])  # 0 keeps the init, 1 replaces it
        blended = (init.astype(np.float32) * (1.0 - strength) + pixels.astype(np.float32) * strength + 0.5).astype(np.uint8)
        if "image.mask" in inputs:  # inpainting: only white mask pixels change, blended at the edge as diffusers' are
            pixels = images.composite_unmasked(blended, init, np.asarray(inputs["image.mask"], dtype=np.uint8))
        else:
            pixels = blended
    return pixels


class _Partial:
    """The synthetic current estimate: the first image, shrunk to the preview size, showing
    through seeded noise as the run goes (after `done` of `total` denoising steps, that fraction)."""

    def __init__(self, render, seed: int, total: int, max_size: int):
        self._render = render  # render(0): the first image, H×W×3 uint8 (rendered once, kept for the output)
        self._seed = seed
        self._total = max(1, total)
        self._max_size = max_size
        self._small: np.ndarray | None = None
        self._noise: np.ndarray | None = None

    def at(self, done: int) -> np.ndarray:
        if self._small is None:
            small = shrink(Image.fromarray(self._render(0)), self._max_size)
            self._small = np.asarray(small, dtype=np.float32) / 255.0
            rng = np.random.Generator(np.random.PCG64(self._seed))
            self._noise = rng.random(self._small.shape, dtype=np.float32)
        f = min(1.0, done / self._total)
        return self._noise * (1.0 - f) + self._small * f


class SyntheticBackend(Backend):
    name = "synthetic"

    def __init__(self, config: Config):
        self._config = config
        self._catalog: dict[str, ModelSpec] = {m.name: m for m in config.synthetic_models}
        self._vram_total = config.synthetic_vram_mb
        self._resident: "OrderedDict[str, _Resident]" = OrderedDict()  # least recently used first
        self._ram_total = config.synthetic_ram_mb
        self._lora_files: dict[str, str] = {}  # name → path of every LoRA that comes from a file
        self._file_digests: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) → sha256
        self._compiled: set[str] = set()  # base models torch.compile has already run for
        self._safety = SyntheticSafetyChecker(config.synthetic_nsfw_word)
        self._lock = threading.Lock()  # state() may be read while a request runs

    # -- interface ---------------------------------------------------------------------------

    def device(self) -> dict:
        return {"name": self._config.synthetic_gpu_name, "vram_total_mb": self._vram_total}

    def capabilities(self) -> dict:
        models = self._models()
        kinds = {m.kind for m in models.values()}
        features = [f for f, kind in (("refiner", "refiner"), ("vae", "vae"), ("lora", "lora"), ("controlnet", "controlnet"))
                    if kind in kinds or (f == "lora" and (self._config.synthetic_lora_dir or self._config.lora_dir))]
        features += list(FEATURES_ALWAYS)
        if "safety_checker" in kinds:
            features.append("safety_check")
        order = ["refiner", "vae", "lora", "controlnet", "img2img", "inpaint", "upscale", "safety_check", "metadata", "training"]
        cn_types = {m.controlnet_type for m in models.values() if m.kind == "controlnet"}
        return {
            "backend": self.name,
            "models": [self._model_info(m) for m in models.values()],
            "schedulers": scheduler_names(),
            "output_formats": ["png", "jpeg", "webp"],
            "max_side": MAX_SIDE,
            "max_images": MAX_IMAGES,
            "features": sorted(features, key=order.index),
            "controlnet_types": [t for t in controlnet_types() if t in cn_types],
            "controlnet_preprocessors": preprocessable(),
            "upscalers": sorted(m.name for m in models.values() if m.kind == "upscaler"),
            "dtypes": [d for d in DTYPES if not (d == "bf16" and self._config.synthetic_no_bf16)],
            "performance": list(PERFORMANCE),
        }

    def state(self) -> dict:
        with self._lock:
            resident = [
                {"name": r.spec.name, "location": r.location, "vram_mb": r.spec.vram_mb, "last_used_at": r.last_used_at,
                 "pinned": r.pinned_at is not None}
                for r in self._resident.values()
            ]
        return {
            "vram_total_mb": self._vram_total,
            "vram_used_mb": sum(r["vram_mb"] for r in resident if r["location"] == "vram"),
            "resident": resident,
        }

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
        log_cb = log_cb or (lambda level, message: None)
        hp = request["hyperparameters"]
        width, height, num_images = hp["width"], hp["height"], hp["num_images"]

        # 1. everything that can be wrong with the request, before any cost is paid
        check_request(request, job_dir)
        check_capabilities(request, self.capabilities())
        plan = self._plan(request)
        inputs = self._load_inputs(request, files)
        need_activation = activation_mb(width, height, num_images)
        self._check_fits(plan, need_activation, num_images, width, height)

        # 2. make the whole suite resident
        timer = StageTimer()  # the contracts' per-stage keys, as the diffusers backend reports them
        with timer.stage("model_load"):
            loaded = self._make_resident(plan, need_activation, progress_cb, cancel_event, log_cb)
        model_load_ms = timer.ms("model_load")

        # 3. denoise, refine, upscale, check, encode
        inference_started = time.perf_counter()
        if self._config.synthetic_stray_print:
            # test hook: what a chatty library does; must end up on stderr, not in the protocol
            print("stray print from a library {not a frame", flush=True)
            os.write(1, b"stray write straight to fd 1\n")
        raise_on = self._config.synthetic_raise_on_prompt
        if raise_on and raise_on in request["conditioning"]["prompt"]:
            raise RuntimeError(f"synthetic fault injected for prompt containing {raise_on!r}")

        perf = request.get("performance") or {}
        unit_s = self._config.synthetic_step_ms / 1000.0  # one step of one 1024² image
        pixels = width * height * num_images / REFERENCE_PIXELS
        step_s = unit_s * pixels * self._perf_factor(perf)
        base = request["model"]["base"]
        if perf.get("compile") and base not in self._compiled:
            t = time.perf_counter()
            log_cb("info", f"compiling the UNet of {base} (once per model)")
            self._sleep(unit_s * COMPILE_STEPS, cancel_event)
            self._compiled.add(base)
            timer.record("compile", (time.perf_counter() - t) * 1000.0)

        counts = stage_steps(request)
        n_cn = len(request.get("controlnets") or [])
        lora_digests = self._lora_digests(request)
        first: list[np.ndarray] = []  # image 0, rendered once: for the previews, then as the output

        def render(i: int) -> np.ndarray:
            if i == 0 and first:
                return first[0]
            pixels = render_image(request, image_seed(hp["seed"], i), inputs, plan.controlnet_models, lora_digests)
            if i == 0:
                first.append(pixels)
            return pixels

        partial = _Partial(render, hp["seed"], counts["base"] + counts["refiner"], previews.max_size) if previews else None
        t = time.perf_counter()
        self._denoise("base", counts["base"], step_s * (1.0 + CONTROLNET_STEP_COST * n_cn), progress_cb, cancel_event, previews, partial, 0)
        timer.record("base", (time.perf_counter() - t) * 1000.0)
        if counts["refiner"]:
            t = time.perf_counter()
            self._denoise("refiner", counts["refiner"], step_s, progress_cb, cancel_event, previews, partial, counts["base"])
            timer.record("refiner", (time.perf_counter() - t) * 1000.0)

        rendered = [Image.fromarray(render(i)) for i in range(num_images)]

        if plan.upscale:
            t = time.perf_counter()
            progress_cb("upscale", 0, 1)
            factor = plan.upscale["factor"]
            self._sleep(unit_s * UPSCALE_COST[plan.upscale["kind"]] * pixels * factor * factor, cancel_event)
            resize = simulated_model if plan.upscale["kind"] == "model" else lanczos
            rendered = [resize(img, factor) for img in rendered]
            self._check_cancel(cancel_event)
            progress_cb("upscale", 1, 1)
            timer.record("upscale", (time.perf_counter() - t) * 1000.0)

        verdicts: list[dict | None] = [None] * num_images
        if plan.safety_checker:
            t = time.perf_counter()
            progress_cb("safety", 0, 1)
            self._sleep(unit_s * SAFETY_COST * num_images, cancel_event)
            verdicts = [self._safety.check(request["conditioning"]["prompt"], plan.safety_checker) for _ in rendered]
            progress_cb("safety", 1, 1)
            timer.record("safety", (time.perf_counter() - t) * 1000.0)

        self._check_cancel(cancel_event)
        t = time.perf_counter()
        os.makedirs(job_dir, exist_ok=True)
        out_spec = request["output"]
        written = []
        for index, img in enumerate(rendered):
            seed = image_seed(hp["seed"], index)
            meta = build_metadata(request, seed, controlnet_models=plan.controlnet_models, upscale=plan.upscale)
            path, content_type = save_image(img, os.path.join(os.path.abspath(job_dir), str(index)), out_spec["format"],
                                            out_spec["quality"], meta if out_spec["embed_metadata"] else None)
            written.append((index, seed, img, path, content_type, meta))
        timer.record("encode", (time.perf_counter() - t) * 1000.0)

        stage_timings = timer.as_dict()
        outputs = []
        for index, seed, img, path, content_type, meta in written:
            sha256, size = file_digest(path)
            outputs.append({
                "index": index, "path": path, "width": img.width, "height": img.height, "seed": seed,
                "sha256": sha256, "bytes": size, "content_type": content_type,
                "upscaled": dict(plan.upscale) if plan.upscale else None,
                "safety": verdicts[index],
                "metadata": {**meta, "timings": stage_timings},
            })
        for _, spec in plan.suite:
            self._touch(spec.name)
        inference_ms = (time.perf_counter() - inference_started) * 1000.0
        return GenerateResult(
            outputs=outputs,
            timings={"model_load_ms": round(model_load_ms, 3), "inference_ms": round(inference_ms, 3)},
            loaded_models=loaded,
        )

    # -- the catalog -------------------------------------------------------------------------

    def _models(self) -> dict[str, ModelSpec]:
        """The catalog plus every LoRA in KILN_SYNTHETIC_LORA_DIR (by file stem) and KILN_LORA_DIR
        (by loras.name_from_file), rescanned on every call: the agent adds trained LoRAs there
        while the worker runs."""
        models = dict(self._catalog)
        files = dict(loras.scan(self._config.synthetic_lora_dir, by_stem=True))
        for name, path in loras.scan(self._config.lora_dir).items():
            files.setdefault(name, path)
        for name, path in list(self._lora_files.items()):  # found earlier by exact name (see _lookup)
            if os.path.isfile(path):
                files.setdefault(name, path)
        self._lora_files = {}
        for name, path in files.items():
            if name in models:
                continue
            spec = self._lora_spec(name, path)
            if spec is not None:
                models[name] = spec
                self._lora_files[name] = path
        return models

    @staticmethod
    def _lora_spec(name: str, path: str) -> ModelSpec | None:
        try:
            size = os.path.getsize(path)
        except OSError:
            return None
        return ModelSpec(name, "lora", max(1, math.ceil(size / 2**20)), size / 1e9)

    def _lora_digests(self, request: dict) -> dict[str, str]:
        """sha256 of each file LoRA the request names (cached by path, mtime and size)."""
        out: dict[str, str] = {}
        for lora in request.get("loras") or []:
            path = self._lora_files.get(lora["name"])
            if not path:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (path, st.st_mtime_ns, st.st_size)
            if key not in self._file_digests:
                self._file_digests[key] = file_digest(path)[0]
            out[lora["name"]] = self._file_digests[key]
        return out

    def _model_info(self, m: ModelSpec) -> dict:
        info = {"name": m.name, "kind": m.kind, "vram_mb": m.vram_mb, "load_ms": self._load_ms(m)}
        if m.controlnet_type:
            info["controlnet_type"] = m.controlnet_type
        if m.scale:
            info["scale"] = m.scale
        return info

    def _load_ms(self, spec: ModelSpec) -> int:
        """A cold load from disk."""
        return int(round(spec.disk_gb * self._config.synthetic_load_ms_per_gb))

    def _warm_ms(self, spec: ModelSpec) -> float:
        """Bringing a model warm in host RAM into VRAM: a fraction of the cold load."""
        return self._load_ms(spec) * self._config.synthetic_ram_load_factor

    def _lookup(self, models: dict[str, ModelSpec], name: str, field: str, kind: str) -> ModelSpec:
        spec = models.get(name)
        if spec is None and kind == "lora":  # a trained LoRA the agent fetched since the last scan
            path = loras.find(self._config.lora_dir, name)
            spec = self._lora_spec(name, path) if path else None
            if spec is not None:
                self._lora_files[name] = path
                models[name] = spec
        if spec is None:
            raise model_not_found(field, f"no {WHAT[kind]} named {name!r} on this worker")
        if spec.kind != kind:
            raise invalid_request(field, f"{name!r} is a {WHAT[spec.kind]}, not a {WHAT[kind]}")
        return spec

    def _plan(self, request: dict) -> _Plan:
        """Resolve every model the request names or implies, as the diffusers backend does
        (defaults as the API's fillDefaults chooses them: the first name in sort order)."""
        models = self._models()
        suite: list[tuple[str, ModelSpec]] = [("model.base", self._lookup(models, request["model"]["base"], "model.base", "base"))]
        for key in ("refiner", "vae"):
            if request["model"].get(key):
                suite.append((f"model.{key}", self._lookup(models, request["model"][key], f"model.{key}", key)))
        for i, lora in enumerate(request.get("loras") or []):
            suite.append((f"loras.{i}.name", self._lookup(models, lora["name"], f"loras.{i}.name", "lora")))
        cn_models: list[str] = []
        for i, cn in enumerate(request.get("controlnets") or []):
            field = f"controlnets.{i}.model"
            if cn.get("model"):
                spec = self._lookup(models, cn["model"], field, "controlnet")
                if spec.controlnet_type != cn["type"]:
                    raise invalid_request(field, f"{spec.name!r} is a {spec.controlnet_type} ControlNet, not {cn['type']}")
            else:
                candidates = sorted(m.name for m in models.values() if m.kind == "controlnet" and m.controlnet_type == cn["type"])
                if not candidates:
                    raise model_not_found(f"controlnets.{i}.type", f"no {cn['type']} ControlNet on this worker")
                spec = models[candidates[0]]
            cn_models.append(spec.name)
            suite.append((field, spec))
        post = request.get("postprocess") or {}
        upscale = None
        if post.get("upscale"):
            factor = post["upscale"]["factor"]
            name = post["upscale"].get("upscaler")
            if name is None:
                fitting = sorted(m.name for m in models.values() if m.kind == "upscaler" and (m.scale or factor) == factor)
                name = fitting[0] if fitting else LANCZOS
            if name == LANCZOS:
                upscale = {"factor": factor, "upscaler": LANCZOS, "kind": "resample"}
            else:
                field = "postprocess.upscale.upscaler"
                suite.append((field, self._lookup(models, name, field, "upscaler")))
                upscale = {"factor": factor, "upscaler": name, "kind": "model"}
        checker = None
        if post.get("safety_check"):
            checkers = sorted(m.name for m in models.values() if m.kind == "safety_checker")
            if not checkers:
                raise model_not_found("postprocess.safety_check", "no safety checker model on this worker")
            checker = checkers[0]
            suite.append(("postprocess.safety_check", models[checker]))
        return _Plan(suite, cn_models, upscale, checker)

    @staticmethod
    def _load_inputs(request: dict, files: Mapping[str, str] | None) -> dict:
        hp = request["hyperparameters"]
        size = (hp["width"], hp["height"])
        inputs: dict = {}
        for i, cn in enumerate(request.get("controlnets") or []):
            inputs[f"controlnets.{i}"] = images.control_image(cn, files, size, field=f"controlnets.{i}")
        image = request.get("image")
        if image:
            inputs["image.init"] = images.load_image(images.resolve_file(files, image["init"], "image.init"), size, field="image.init")
            if image.get("mask"):
                inputs["image.mask"] = images.load_mask(images.resolve_file(files, image["mask"], "image.mask"), size, field="image.mask")
        return inputs

    # -- VRAM, RAM and residency ---------------------------------------------------------------
    #
    # Every resident model is in VRAM (hot) or host RAM (warm), least recently used first.
    # Making room in VRAM moves unpinned models to RAM while the simulated host RAM
    # (KILN_SYNTHETIC_RAM_MB) has room for them, else drops them. A model pinned in VRAM never
    # leaves it; one pinned in RAM may move from VRAM to RAM but is never dropped. Bringing a
    # warm model back costs KILN_SYNTHETIC_RAM_LOAD_FACTOR of a cold load.

    def _used(self, location: str) -> int:
        return sum(r.spec.vram_mb for r in self._resident.values() if r.location == location)

    def _pinned_in_vram(self, keep: set[str]) -> list[_Resident]:
        return [r for r in self._resident.values() if r.location == "vram" and r.pinned_at == "vram" and r.spec.name not in keep]

    def _check_fits(self, plan: _Plan, need_activation: int, num_images: int, width: int, height: int) -> None:
        members = list({spec.name: spec for _, spec in plan.suite}.values())
        for spec in members:
            if spec.vram_mb > self._vram_total:
                raise WorkerError("out_of_memory", f"{spec.name} needs {spec.vram_mb} MB of VRAM; this GPU has {self._vram_total} MB")
        suite_mb = sum(spec.vram_mb for spec in members)
        what = members[0].name if len(members) == 1 else f"the suite of {len(members)} models"
        if suite_mb + need_activation > self._vram_total:
            raise WorkerError(
                "out_of_memory",
                f"{what} ({suite_mb} MB) plus {num_images}×{width}×{height} activations "
                f"({need_activation} MB) exceed this GPU's {self._vram_total} MB of VRAM",
            )
        self._check_pinned(suite_mb + need_activation, {spec.name for spec in members}, f"{what} ({suite_mb} MB) plus activations ({need_activation} MB)")

    def _check_pinned(self, needed_mb: int, keep: set[str], what: str) -> None:
        """out_of_memory when `needed_mb` of VRAM can only be had by evicting pinned models."""
        with self._lock:
            pinned = self._pinned_in_vram(keep)
        pinned_mb = sum(r.spec.vram_mb for r in pinned)
        if pinned and needed_mb > self._vram_total - pinned_mb:
            names = ", ".join(f"{r.spec.name} ({r.spec.vram_mb} MB)" for r in pinned)
            raise WorkerError(
                "out_of_memory",
                f"{what} need {needed_mb} MB of VRAM, but pinned models hold {pinned_mb} of this GPU's {self._vram_total} MB "
                f"and are never evicted: {names}; unload them or run this elsewhere",
            )

    def _make_resident(self, plan: _Plan, need_activation: int, progress_cb: ProgressCallback,
                       cancel_event: threading.Event, log_cb: LogCallback) -> list[str]:
        members = list({spec.name: spec for _, spec in plan.suite}.values())
        return self._bring_to_vram(members, need_activation, progress_cb, cancel_event, log_cb)

    def _bring_to_vram(self, members: list[ModelSpec], extra_mb: int, progress_cb: ProgressCallback,
                       cancel_event: threading.Event, log_cb: LogCallback) -> list[str]:
        """Make `members` hot (cold from disk, or warm from RAM), with `extra_mb` free besides; the
        names it had to load."""
        keep = {spec.name for spec in members}
        with self._lock:
            missing = [spec for spec in members if (r := self._resident.get(spec.name)) is None or r.location != "vram"]
        self._make_room(sum(spec.vram_mb for spec in missing) + extra_mb, keep, log_cb)
        for spec in missing:
            self._load(spec, "vram", progress_cb, cancel_event)
        for spec in members:
            self._touch(spec.name)
        return [spec.name for spec in missing]

    def _make_room(self, needed_mb: int, keep: set[str], log_cb: LogCallback) -> None:
        """Evict least recently used models from VRAM (never those in `keep`, never pinned in
        VRAM) until `needed_mb` more is free: to RAM while it has room, else dropped."""
        with self._lock:
            used = self._used("vram")
            for name in list(self._resident):
                if self._vram_total - used >= needed_mb:
                    break
                r = self._resident[name]
                if name in keep or r.location != "vram" or r.pinned_at == "vram":
                    continue
                used -= r.spec.vram_mb
                if r.pinned_at == "ram" or self._used("ram") + r.spec.vram_mb <= self._ram_total:
                    r.location = "ram"
                    message = f"evicted {name} ({r.spec.vram_mb} MB) from VRAM to make room; kept warm in host RAM"
                else:
                    del self._resident[name]
                    message = f"evicted {name} ({r.spec.vram_mb} MB) from VRAM to make room; dropped (no host RAM left to keep it warm)"
                log.info("%s", message)
                log_cb("info", message)

    def _load(self, spec: ModelSpec, location: str, progress_cb: ProgressCallback, cancel_event: threading.Event) -> float:
        """Bring `spec` to `location`, paying what that costs; the simulated ms."""
        with self._lock:
            current = self._resident.get(spec.name)
            where = current.location if current else None
        if where == location:
            return 0.0
        cost_ms = self._warm_ms(spec) if (where == "ram" and location == "vram") else 0.0 if where == "vram" else float(self._load_ms(spec))
        progress_cb("loading_model", 0, 1)
        self._sleep(cost_ms / 1000.0, cancel_event)
        with self._lock:
            current = self._resident.get(spec.name)
            if current is None:
                self._resident[spec.name] = _Resident(spec, location)
            else:
                current.location = location
        how = "from host RAM" if where == "ram" else "from VRAM" if where == "vram" else "from disk"
        log.info("loaded %s (%d MB) into %s %s in %d ms", spec.name, spec.vram_mb, location, how, cost_ms)
        progress_cb("loading_model", 1, 1)
        return cost_ms

    def _touch(self, name: str) -> None:
        with self._lock:
            resident = self._resident.get(name)
            if resident is not None:
                resident.last_used_at = _now_iso()
                self._resident.move_to_end(name)

    # -- cache requests: load and unload -------------------------------------------------------

    def load(self, models: list[str], location: str, pin: bool, progress_cb: ProgressCallback,
             cancel_event: threading.Event, log_cb: LogCallback | None = None) -> LoadResult:
        log_cb = log_cb or (lambda level, message: None)
        catalog = self._models()
        specs: list[ModelSpec] = []
        for i, name in enumerate(models):
            spec = catalog.get(name)
            if spec is None:  # perhaps a trained LoRA the agent fetched since the last scan
                path = loras.find(self._config.lora_dir, name)
                spec = self._lora_spec(name, path) if path else None
                if spec is not None:
                    self._lora_files[name] = path
            if spec is None:
                raise model_not_found(f"models.{i}", f"no model named {name!r} on this worker")
            if spec not in specs:
                specs.append(spec)
        names = {spec.name for spec in specs}
        total_mb = sum(spec.vram_mb for spec in specs)
        started = time.perf_counter()
        if location == "vram":
            for spec in specs:
                if spec.vram_mb > self._vram_total:
                    raise WorkerError("out_of_memory", f"models.{models.index(spec.name)}: {spec.name} needs {spec.vram_mb} MB of VRAM; this GPU has {self._vram_total} MB")
            if total_mb > self._vram_total:
                raise WorkerError("out_of_memory", f"these {len(specs)} models need {total_mb} MB of VRAM together; this GPU has {self._vram_total} MB")
            self._check_pinned(total_mb, names, f"these {len(specs)} models" if len(specs) > 1 else specs[0].name)
            loaded = self._bring_to_vram(specs, 0, progress_cb, cancel_event, log_cb)
        else:
            loaded = self._load_to_ram(specs, progress_cb, cancel_event, log_cb)
        with self._lock:
            for spec in specs:
                r = self._resident[spec.name]
                if pin or (r.pinned_at == "vram" and location == "ram"):
                    r.pinned_at = location  # a load without pin never lifts a pin; unload does
        for spec in specs:
            self._touch(spec.name)
        load_ms = (time.perf_counter() - started) * 1000.0
        log_cb("info", f"{len(specs)} model(s) resident in {location}{' and pinned' if pin else ''}; loaded {len(loaded)} in {load_ms:.0f} ms")
        return LoadResult(loaded, load_ms)

    def _load_to_ram(self, specs: list[ModelSpec], progress_cb: ProgressCallback, cancel_event: threading.Event,
                     log_cb: LogCallback) -> list[str]:
        """Keep `specs` warm in host RAM: cold ones are read from disk, hot ones move out of VRAM."""
        keep = {spec.name for spec in specs}
        with self._lock:
            needed = sum(spec.vram_mb for spec in specs if (r := self._resident.get(spec.name)) is None or r.location != "ram")
            free = self._ram_total - self._used("ram")
            if needed > free:  # drop warm models nobody pinned, least recently used first
                for name in list(self._resident):
                    r = self._resident[name]
                    if free >= needed:
                        break
                    if r.location == "ram" and r.pinned_at is None and name not in keep:
                        del self._resident[name]
                        free += r.spec.vram_mb
                        log_cb("info", f"dropped {name} ({r.spec.vram_mb} MB) from host RAM to make room")
            if needed > free:
                pinned = [r for r in self._resident.values() if r.location == "ram" and r.pinned_at and r.spec.name not in keep]
                held = f"; pinned models hold {sum(r.spec.vram_mb for r in pinned)} MB of it: " + ", ".join(r.spec.name for r in pinned) if pinned else ""
                raise WorkerError("out_of_memory", f"these models need {needed} MB of host RAM; {free} MB of {self._ram_total} MB is free{held}")
            moving = [spec for spec in specs if (r := self._resident.get(spec.name)) is None or r.location != "ram"]
        for spec in moving:
            self._load(spec, "ram", progress_cb, cancel_event)
        return [spec.name for spec in moving]

    def unload(self, models: list[str], log_cb: LogCallback | None = None) -> LoadResult:
        freed: list[str] = []
        with self._lock:
            for name in dict.fromkeys(models):
                r = self._resident.pop(name, None)
                if r is not None:
                    freed.append(name)
                    log.info("unloaded %s (%d MB) from %s%s", name, r.spec.vram_mb, r.location, ", unpinned" if r.pinned_at else "")
        if log_cb and len(freed) < len(set(models)):
            log_cb("info", "not resident, nothing to free: " + ", ".join(n for n in dict.fromkeys(models) if n not in freed))
        return LoadResult(freed, 0.0)

    # -- training ------------------------------------------------------------------------------

    def train(self, message: dict, progress_cb: ProgressCallback, checkpoint_cb: CheckpointCallback,
              cancel_event: threading.Event, log_cb: LogCallback | None = None) -> TrainResult:
        log_cb = log_cb or (lambda level, message: None)
        request = message["request"]
        hp = request["hyperparameters"]
        job_dir = message["job_dir"]

        # 1. everything that can be wrong, before any cost is paid
        training.check_train_message(message, self.capabilities())
        models = self._models()
        base = self._lookup(models, request["base_model"], "base_model", "base")
        out_name = request["output"]["name"]
        if out_name in self._catalog:
            raise invalid_request("output.name", f"{out_name!r} is already a {WHAT[self._catalog[out_name].kind]} on this worker; pick another name")
        items = training.load_dataset(request, message["dataset_dir"])
        need_mb = training.training_vram_mb(request)
        if base.vram_mb + need_mb > self._vram_total:
            raise WorkerError("out_of_memory", f"{base.name} ({base.vram_mb} MB) plus training at {hp['resolution']}² × batch {hp['batch_size']} "
                                               f"({need_mb} MB) exceed this GPU's {self._vram_total} MB of VRAM")
        self._check_pinned(base.vram_mb + need_mb, {base.name}, f"{base.name} plus training ({need_mb} MB)")
        run = Run.of(request, training.dataset_digest(items))
        total = hp["steps"]
        weights = run.initial()
        done = 0
        resumed = training.read_resume(message.get("resume"), {"format": "kiln-synthetic-lora", "base_model": base.name,
                                                                "rank": str(run.rank), "run": run.run_id}, total)
        if isinstance(resumed, tuple) and run.fits(resumed[0]):
            weights, done = resumed
            log_cb("info", f"resuming from the checkpoint of step {done}")
        elif message.get("resume"):
            reason = resumed if isinstance(resumed, str) else "its tensors do not match this run"
            log_cb("warning", f"cannot resume ({reason}); training from step 0")

        # 2. the base model in VRAM, room for training besides
        started = time.perf_counter()
        self._bring_to_vram([base], need_mb, progress_cb, cancel_event, log_cb)
        model_load_ms = (time.perf_counter() - started) * 1000.0

        # 3. train: a step costs KILN_SYNTHETIC_TRAIN_STEP_MS × (resolution/1024)² × batch × accumulation
        started = time.perf_counter()
        step_s = (self._config.synthetic_train_step_ms / 1000.0 * hp["resolution"] ** 2 / REFERENCE_PIXELS
                  * hp["batch_size"] * hp["gradient_accumulation"])
        every = hp["checkpoint_every"]
        for step in range(done + 1, total + 1):
            self._sleep(step_s, cancel_event)
            run.step(weights, step)
            progress_cb("train", step, total, run.loss(step))
            if training.checkpoint_due(step, total, every):
                path = training.checkpoint_path(job_dir, step)
                safetensors_io.write_atomic(path, weights, run.metadata(step))
                sha256, size = file_digest(path)
                checkpoint_cb(step, path, sha256, size)
            self._touch(base.name)
        self._check_cancel(cancel_event)
        path = training.result_path(job_dir, request)
        safetensors_io.write_atomic(path, weights, run.metadata(total))
        sha256, size = file_digest(path)
        train_ms = (time.perf_counter() - started) * 1000.0
        return TrainResult(path, sha256, size, total, run.loss(total),
                           {"model_load_ms": round(model_load_ms, 3), "train_ms": round(train_ms, 3)})

    # -- time ----------------------------------------------------------------------------------

    @staticmethod
    def _perf_factor(perf: dict) -> float:
        factor = OFFLOAD_FACTOR[perf.get("cpu_offload", "none")]
        if perf.get("attention_slicing"):
            factor *= ATTENTION_SLICING_FACTOR
        if perf.get("dtype") == "fp32":
            factor *= FP32_FACTOR
        return factor

    def _denoise(self, stage: str, steps: int, step_s: float, progress_cb: ProgressCallback, cancel_event: threading.Event,
                 previews: Previews | None = None, partial: "_Partial | None" = None, before: int = 0) -> None:
        """`before`: denoising steps of earlier stages (the base's, for the refiner)."""
        for step in range(1, steps + 1):
            self._sleep(step_s, cancel_event)
            progress_cb(stage, step, steps)
            if previews is not None and partial is not None:
                previews.offer(stage, step, steps, lambda: partial.at(before + step))
        self._check_cancel(cancel_event)

    def _sleep(self, seconds: float, cancel_event: threading.Event) -> None:
        """Spend `seconds` as the GPU would, returning early (canceled) when asked to stop."""
        self._check_cancel(cancel_event)
        if seconds > 0 and cancel_event.wait(seconds):
            self._check_cancel(cancel_event)
        self._check_cancel(cancel_event)

    @staticmethod
    def _check_cancel(cancel_event: threading.Event) -> None:
        if cancel_event.is_set():
            raise WorkerError("canceled", "canceled by the agent")

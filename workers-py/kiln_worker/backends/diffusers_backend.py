"""The diffusers backend: Stable Diffusion XL on the GPU (or CPU) this worker drives.

One generate request, in order:
1. Check it (validation.check_request, check_capabilities) and resolve every model it names
   against the catalog (model_not_found / invalid_request naming the field).
2. Make its suite resident (residency.py: LRU eviction to host RAM or out), reporting
   `loading_model` progress per model loaded.
3. Build the pipeline for the mode from the resident base with `from_pipe` (text-to-image,
   img2img, inpaint, each with or without ControlNets), swap in the VAE, scheduler, LoRA adapters
   and performance options, and run it with one CPU generator per image (output.image_seed), reporting
   each denoising step (`base`, then `refiner` for the ensemble of experts). A cancel sets
   `pipe._interrupt`; the images of an interrupted run are discarded.
4. Upscale, safety-check and write each image (output.save_image) with its metadata.

Cache requests: `load` makes models hot (cold from_pretrained, or `.to(device)` of a pipeline kept
warm with `.to("cpu")`) or warm in host RAM (KILN_DIFFUSERS_RAM_CACHE_MB), optionally pinned; a
LoRA is loaded into the base named with it, else the most recently used resident base. `unload`
drops models (and the LoRAs living in them). Pins: see residency.py; generations, loads and
training that would need a pinned model's VRAM fail with out_of_memory naming it.

Training (`train`): diffusers_parts/lora_trainer.py on the resident base pipeline (shared weights,
no second copy); LoRAs the agent put in KILN_LORA_DIR are found by name on every lookup and listed
by every capabilities() call.

torch and diffusers are imported when the backend is constructed, so a worker without them
fails at start with a clear message (BackendUnavailable, exit 3) instead of at the first job.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import threading
import time
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .. import loras, training
from ..config import Config
from ..errors import WorkerError, invalid_request, model_not_found
from ..images import composite_unmasked, control_image, load_image, load_mask, resolve_file
from ..output import build_metadata, file_digest, image_seed, save_image
from ..previews import Previews
from ..protocol import scheduler_names
from ..safety import verdict
from ..schedulers import build_scheduler
from ..tables import controlnet_types, preprocessable
from ..timings import StageTimer
from ..torch_compat import ensure_torchvision_importable
from ..upscale import upscale as run_upscale
from ..validation import check_capabilities, check_request
from . import BackendUnavailable
from .base import Backend, CheckpointCallback, GenerateResult, LoadResult, LogCallback, ProgressCallback, TrainResult
from .diffusers_parts.catalog import ModelEntry, discover, file_params
from .diffusers_parts.residency import RefinerParts, Residency, Resident, adapter_name, load_lora, load_model, move
from .diffusers_parts.settings import DiffusersSettings, SettingsError, load_settings, physical_ram_mb

log = logging.getLogger("kiln_worker.diffusers")

MAX_SIDE = 2048
MAX_IMAGES = 8
FEATURE_ORDER = ("refiner", "vae", "lora", "controlnet", "img2img", "inpaint", "upscale", "safety_check", "metadata", "training")
ACTIVATION_MB_PER_MEGAPIXEL = 1200  # fp16, as the contracts' activationVramMb; doubled at fp32
TAESD_DIR = "taesdxl"  # MODELS_DIR/taesdxl: the tiny autoencoder previews decode latents with, when present
# SDXL latents → RGB in -1..1, a linear fit (ComfyUI's latent_formats.SDXL): rgb = latent · F + b
SDXL_LATENT_RGB_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_LATENT_RGB_BIAS = [0.1084, -0.0175, -0.0011]


class DiffusersConfigError(BackendUnavailable):
    """Bad diffusers backend settings: the worker exits at start naming every bad variable."""


def _import_runtime():
    try:
        ensure_torchvision_importable()  # before diffusers and transformers look for it
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"the diffusers backend needs torch, diffusers and transformers ({exc}); "
            "run `npm run setup:diffusers` (workers-py/requirements-diffusers.txt), or set KILN_BACKEND=synthetic"
        ) from exc
    return torch


def _quiet_loading_bars() -> None:
    """Loading bars are noise in a worker's log (stderr); our own loading_model progress replaces them."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class DiffusersBackend(Backend):
    name = "diffusers"

    def __init__(self, config: Config | None = None, settings: DiffusersSettings | None = None):
        torch = _import_runtime()
        self._config = config or Config(backend="diffusers")
        try:
            self._settings = settings or load_settings()
        except SettingsError as exc:
            raise DiffusersConfigError(str(exc)) from exc
        self._torch = torch
        _quiet_loading_bars()
        self._device = self._pick_device(self._settings.device)
        cuda = self._device.startswith("cuda")
        if cuda:
            props = torch.cuda.get_device_properties(torch.device(self._device))
            self._device_name = props.name
            self._vram_total = int(props.total_memory // (1024 * 1024))
            self._dtypes = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp32"]
            self._default_dtype = "fp16"
        else:
            self._device_name = "cpu"
            self._vram_total = self._settings.cpu_memory_mb
            self._dtypes = ["fp32"]
            self._default_dtype = "fp32"
        ram_budget = self._settings.ram_cache_mb if self._settings.ram_cache_mb is not None else physical_ram_mb() // 2
        self._residency = Residency(self._device, self._vram_total, ram_budget)
        self._catalog: dict[str, ModelEntry] = discover(self._settings.models_dir, self._settings.scan_hf_cache, self._settings.hf_cache_dir)
        self._capabilities = self._build_capabilities()
        self._taesd: Any = False  # the previews' tiny autoencoder: False until looked for, then it or None
        log.info(
            "diffusers backend on %s (%d MB); %d models from %s%s",
            self._device_name, self._vram_total, len(self._catalog), self._settings.models_dir,
            " and the Hugging Face cache" if self._settings.scan_hf_cache else "",
        )

    @staticmethod
    def _pick_device(wanted: str) -> str:
        import torch

        if wanted == "cpu":
            return "cpu"
        if torch.cuda.is_available():
            return "cuda" if wanted == "auto" else wanted
        if wanted == "auto":
            return "cpu"
        raise DiffusersConfigError(f"KILN_DIFFUSERS_DEVICE={wanted!r}: CUDA is not available on this machine")

    # -- interface ---------------------------------------------------------------------------

    def device(self) -> dict:
        return {"name": self._device_name, "vram_total_mb": self._vram_total}

    def capabilities(self) -> dict:
        """The catalog's capabilities plus the LoRAs in KILN_LORA_DIR now (rescanned on every call)."""
        caps = dict(self._capabilities)
        extra = [self._dir_lora(name, path) for name, path in loras.scan(self._config.lora_dir).items() if name not in self._catalog]
        extra = [e for e in extra if e is not None]
        if extra:
            caps["models"] = caps["models"] + [e.info(self._default_dtype) for e in extra]
        if extra or self._config.lora_dir:
            caps["features"] = [f for f in FEATURE_ORDER if f in set(caps["features"]) | {"lora"}]
        return caps

    def state(self) -> dict:
        resident = self._residency.wire()
        return {
            "vram_total_mb": self._vram_total,
            "vram_used_mb": sum(r["vram_mb"] for r in resident if r["location"] == "vram"),
            "resident": resident,
        }

    def _build_capabilities(self) -> dict:
        kinds = {e.kind for e in self._catalog.values()}
        has_base = "base" in kinds
        features = ["metadata", "upscale"]
        if has_base:
            features += ["img2img", "inpaint"]
            features += [k for k in ("refiner", "vae", "lora", "controlnet") if k in kinds]
        if "safety_checker" in kinds:
            features.append("safety_check")
        if has_base:
            features.append("training")
        cn_types = {e.controlnet_type for e in self._catalog.values() if e.kind == "controlnet"}
        perf = ["attention_slicing", "vae_slicing", "vae_tiling", "channels_last"]
        if self._device.startswith("cuda"):
            perf += ["cpu_offload_model", "cpu_offload_sequential", "compile"]
        return {
            "backend": self.name,
            "models": [e.info(self._default_dtype) for e in self._catalog.values()],
            "schedulers": scheduler_names(),
            "output_formats": ["png", "jpeg", "webp"],
            "max_side": MAX_SIDE,
            "max_images": MAX_IMAGES,
            "features": [f for f in FEATURE_ORDER if f in features],
            "controlnet_types": [t for t in controlnet_types() if t in cn_types],
            "controlnet_preprocessors": preprocessable(),
            "upscalers": sorted(e.name for e in self._catalog.values() if e.kind == "upscaler"),
            "dtypes": self._dtypes,
            "performance": perf,
        }

    # -- generate ----------------------------------------------------------------------------

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
        check_request(request, job_dir)
        check_capabilities(request, self._capabilities)
        plan = self._plan(request, files)
        _check_cancel(cancel_event)
        try:
            return self._run(request, plan, job_dir, progress_cb, cancel_event, log_cb, previews)
        except Exception as exc:
            if not is_oom(exc):
                raise
            # free what the failed call held, then everything resident, so the next job starts clean
            del exc
            gc.collect()
            self._residency.evict_all(log_cb)
            raise WorkerError(
                "out_of_memory",
                f"{self._device_name} ran out of memory on {request['hyperparameters']['num_images']}×"
                f"{request['hyperparameters']['width']}×{request['hyperparameters']['height']}; resident models were evicted",
            ) from None

    # -- planning: everything that can fail because of the request, before any model loads ----

    def _dir_lora(self, name: str, path: str) -> ModelEntry | None:
        """A KILN_LORA_DIR file as a catalog entry; its mtime is part of its identity, so a LoRA
        replaced under the same name is reloaded rather than served stale."""
        try:
            st = os.stat(path)
            params, disk = file_params(path)
        except OSError:
            return None
        return ModelEntry(name, "lora", path, True, params, disk, source=f"lora_dir:{st.st_mtime_ns}:{st.st_size}")

    def _find(self, name: str) -> ModelEntry | None:
        """A catalog model, else a LoRA the agent put in KILN_LORA_DIR (looked up now)."""
        entry = self._catalog.get(name)
        if entry is None:
            path = loras.find(self._config.lora_dir, name)
            entry = self._dir_lora(name, path) if path else None
        return entry

    def _entry(self, name: str, kind: str, field: str) -> ModelEntry:
        entry = self._find(name)
        if entry is None:
            raise model_not_found(field, f"{name!r} is not available on this worker")
        if entry.kind != kind:
            raise invalid_request(field, f"{name!r} is a {entry.kind} model, not a {kind} model")
        return entry

    def _plan(self, request: dict, files: Mapping[str, str] | None) -> dict:
        hp = request["hyperparameters"]
        size = (hp["width"], hp["height"])
        perf = request.get("performance") or {}
        dtype = perf.get("dtype", self._default_dtype) if perf else self._default_dtype
        plan: dict[str, Any] = {"dtype": dtype, "perf": perf, "size": size}
        plan["base"] = self._entry(request["model"]["base"], "base", "model.base")
        plan["refiner"] = self._entry(request["model"]["refiner"], "refiner", "model.refiner") if request["model"].get("refiner") else None
        plan["vae"] = self._entry(request["model"]["vae"], "vae", "model.vae") if request["model"].get("vae") else None
        plan["loras"] = [(self._entry(l["name"], "lora", f"loras.{i}.name"), float(l["weight"])) for i, l in enumerate(request.get("loras") or [])]
        cns = []
        for i, cn in enumerate(request.get("controlnets") or []):
            field = f"controlnets.{i}"
            if cn.get("model"):
                entry = self._entry(cn["model"], "controlnet", f"{field}.model")
                if entry.controlnet_type != cn["type"]:
                    raise invalid_request(f"{field}.model", f"{entry.name!r} is a {entry.controlnet_type} ControlNet, not {cn['type']}")
            else:
                choices = sorted(n for n, e in self._catalog.items() if e.kind == "controlnet" and e.controlnet_type == cn["type"])
                if not choices:
                    raise model_not_found(f"{field}.type", f"no {cn['type']} ControlNet on this worker")
                entry = self._catalog[choices[0]]
            cns.append((entry, control_image(cn, files, size, field=field), cn))
        plan["controlnets"] = cns
        image = request.get("image")
        plan["init"] = plan["mask"] = None
        if image:
            plan["init"] = load_image(resolve_file(files, image["init"], "image.init"), size, field="image.init")
            if image.get("mask"):
                plan["mask"] = load_mask(resolve_file(files, image["mask"], "image.mask"), size)
        post = request.get("postprocess") or {}
        up = post.get("upscale")
        plan["upscale"] = up
        if up and up.get("upscaler") and up["upscaler"] != "lanczos":
            self._entry(up["upscaler"], "upscaler", "postprocess.upscale.upscaler")
        plan["safety"] = None
        if post.get("safety_check"):
            checkers = sorted(n for n, e in self._catalog.items() if e.kind == "safety_checker")
            if not checkers:
                raise invalid_request("postprocess.safety_check", "no safety checker on this worker")
            plan["safety"] = self._catalog[checkers[0]]
        return plan

    # -- residency ---------------------------------------------------------------------------

    def _activation_mb(self, request: dict, dtype: str) -> int:
        hp = request["hyperparameters"]
        mb = ACTIVATION_MB_PER_MEGAPIXEL * hp["width"] * hp["height"] * hp["num_images"] / (1024 * 1024)
        return math.ceil(mb * (2 if dtype == "fp32" else 1))

    def _ensure(self, plan: dict, request: dict, progress_cb, cancel_event, log_cb) -> list[str]:
        """Make the plan's models resident at its dtype; return the ones that had to be loaded."""
        dtype = plan["dtype"]
        offload = plan["perf"].get("cpu_offload", "none") != "none"
        target = "cpu" if offload else self._device
        suite: list[ModelEntry] = [plan["base"]]
        suite += [e for e in (plan["refiner"], plan["vae"]) if e is not None]
        suite += [e for e, _, _ in plan["controlnets"]]
        if plan["safety"] is not None:
            suite.append(plan["safety"])
        lora_entries = [e for e, _ in plan["loras"]]
        names = {e.name for e in suite + lora_entries}
        suite_mb = sum(e.vram_mb(dtype) for e in suite + lora_entries)
        self._residency.check_fits(suite_mb, self._activation_mb(request, dtype), offload)
        if not offload:
            what = suite[0].name if len(names) == 1 else f"the suite of {len(names)} models"
            self._check_pinned(suite_mb + self._activation_mb(request, dtype), names, f"{what} ({suite_mb} MB) plus activations ({self._activation_mb(request, dtype)} MB)")
        loaded: list[str] = []
        for entry in suite + lora_entries:
            _check_cancel(cancel_event)
            r = self._residency.get(entry.name)
            if r is not None and r.entry != entry:  # a KILN_LORA_DIR file replaced under the same name
                self._residency.drop(entry.name, log_cb, "its file changed")
                r = None
            if r is not None and r.dtype != dtype:
                self._residency.drop(entry.name, log_cb, f"reloading at {dtype}")
                r = None
            if r is not None and r.location == ("ram" if offload else "vram"):
                continue
            size = entry.vram_mb(dtype) + (sum(c.vram_mb for c in self._residency.loras_of(entry.name)) if r else 0)
            if not offload:
                self._residency.make_room(size + self._activation_mb(request, dtype), names, log_cb)
            progress_cb("loading_model", 0, 1)
            started = time.perf_counter()
            if r is not None:  # warm in RAM (or offloaded), move it
                move(r.obj, target)
                self._residency.set_location([entry.name], "ram" if offload else "vram")
                how = "from host RAM"
            elif entry.kind == "lora":
                base = self._residency.get(plan["base"].name)
                adapter = load_lora(base.obj, entry)
                self._residency.add(Resident(entry, base.obj, dtype, entry.vram_mb(dtype), base.location, parent=base.entry.name, extras={"adapter": adapter}))
                how = "from disk"
            else:
                base = self._residency.get(plan["base"].name)
                obj = load_model(entry, dtype, target, base.obj if base is not None else None)
                resident = Resident(entry, obj, dtype, entry.vram_mb(dtype), "ram" if offload else "vram")
                if entry.kind == "base":
                    resident.extras["scheduler_config"] = dict(obj.scheduler.config)
                    resident.extras["unet"] = obj.unet
                self._residency.add(resident)
                how = "from disk"
            loaded.append(entry.name)
            ms = (time.perf_counter() - started) * 1000
            log.info("loaded %s %s in %.0f ms", entry.name, how, ms)
            log_cb("info", f"loaded {entry.name} {how} in {ms:.0f} ms")
            progress_cb("loading_model", 1, 1)
        self._residency.touch([e.name for e in suite + lora_entries])
        return loaded

    # -- running -----------------------------------------------------------------------------

    def _pipeline(self, plan: dict, request: dict):
        """The pipeline object for this request's mode, sharing the resident base's modules."""
        import diffusers

        torch = self._torch
        base_r = self._residency.get(plan["base"].name)
        base = base_r.obj
        perf = plan["perf"]
        overrides: dict[str, Any] = {}
        if plan["vae"] is not None:
            overrides["vae"] = self._residency.get(plan["vae"].name).obj
        unet = base_r.extras["unet"]
        if perf.get("compile"):
            if "compiled_unet" not in base_r.extras:
                base_r.extras["compiled_unet"] = torch.compile(unet)
            unet = base_r.extras["compiled_unet"]
        overrides["unet"] = unet
        cns = [self._residency.get(e.name).obj for e, _, _ in plan["controlnets"]]
        mode = "inpaint" if plan["mask"] is not None else "img2img" if plan["init"] is not None else "txt2img"
        if cns:
            cls = {
                "txt2img": diffusers.StableDiffusionXLControlNetPipeline,
                "img2img": diffusers.StableDiffusionXLControlNetImg2ImgPipeline,
                "inpaint": diffusers.StableDiffusionXLControlNetInpaintPipeline,
            }[mode]
            overrides["controlnet"] = cns[0] if len(cns) == 1 else cns
        else:
            cls = {
                "txt2img": diffusers.StableDiffusionXLPipeline,
                "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
                "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
            }[mode]
        # from_pipe casts to its dtype argument (float32 when absent): always pass the resident one
        pipe = base if cls is type(base) and not overrides.keys() - {"unet"} and unet is base.unet else cls.from_pipe(base, dtype=base.dtype, **overrides)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = build_scheduler(request["scheduler"], base_r.extras["scheduler_config"])
        self._apply_loras(base, plan)
        self._apply_performance(pipe, perf)
        return pipe, mode

    def _apply_loras(self, base, plan: dict) -> None:
        if not plan["loras"]:
            if self._residency.loras_of(plan["base"].name):
                base.disable_lora()
            return
        base.enable_lora()
        base.set_adapters([adapter_name(e.name) for e, _ in plan["loras"]], adapter_weights=[w for _, w in plan["loras"]])

    def _apply_performance(self, pipe, perf: dict) -> None:
        """Options are set both ways on every request: modules are shared across requests."""
        torch = self._torch
        if perf.get("attention_slicing"):
            pipe.enable_attention_slicing()
        else:
            pipe.disable_attention_slicing()
        (pipe.vae.enable_slicing if perf.get("vae_slicing") else pipe.vae.disable_slicing)()
        (pipe.vae.enable_tiling if perf.get("vae_tiling") else pipe.vae.disable_tiling)()
        fmt = torch.channels_last if perf.get("channels_last") else torch.contiguous_format
        pipe.unet.to(memory_format=fmt)
        offload = perf.get("cpu_offload", "none")
        if offload == "model":
            pipe.enable_model_cpu_offload(device=self._device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self._device)

    def _run(self, request: dict, plan: dict, job_dir: str, progress_cb, cancel_event, log_cb, previews: Previews | None = None) -> GenerateResult:
        torch = self._torch
        timer = StageTimer()  # the contracts' per-stage keys, as the synthetic backend reports them
        with timer.stage("model_load"):
            loaded = self._ensure(plan, request, progress_cb, cancel_event, log_cb)
        model_load_ms = timer.ms("model_load")
        _check_cancel(cancel_event)

        infer_started = time.perf_counter()
        hp = request["hyperparameters"]
        n, seed = hp["num_images"], hp["seed"]
        pipe, mode = self._pipeline(plan, request)
        offload = plan["perf"].get("cpu_offload", "none") != "none"
        try:
            kwargs: dict[str, Any] = {
                "prompt": request["conditioning"]["prompt"],
                "negative_prompt": request["conditioning"].get("negative_prompt") or None,
                "guidance_scale": float(hp["guidance_scale"]),
                "num_inference_steps": request["scheduler"]["steps"],
                "num_images_per_prompt": n,
                "generator": [torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(n)],
                "output_type": "pil",
            }
            if mode == "txt2img":
                kwargs.update(width=hp["width"], height=hp["height"])
            else:
                kwargs.update(image=plan["init"], strength=float(request["image"]["strength"]))
            if mode == "inpaint":
                kwargs.update(mask_image=plan["mask"], width=hp["width"], height=hp["height"])
            if plan["controlnets"]:
                specs = [c for _, _, c in plan["controlnets"]]
                images = [img for _, img, _ in plan["controlnets"]]
                one = len(specs) == 1
                key = "image" if mode == "txt2img" else "control_image"
                kwargs[key] = images[0] if one else images
                kwargs["controlnet_conditioning_scale"] = float(specs[0]["conditioning_scale"]) if one else [float(c["conditioning_scale"]) for c in specs]
                kwargs["control_guidance_start"] = float(specs[0]["guidance_start"]) if one else [float(c["guidance_start"]) for c in specs]
                kwargs["control_guidance_end"] = float(specs[0]["guidance_end"]) if one else [float(c["guidance_end"]) for c in specs]
            refiner = plan["refiner"]
            if refiner is not None:
                switch = float((request.get("refiner") or {}).get("denoising_switch", 0.8))
                kwargs.update(denoising_end=switch, output_type="latent")
            with timer.stage("base"), torch.inference_mode():
                out = pipe(**kwargs, callback_on_step_end=_stepper("base", progress_cb, cancel_event, previews, self._preview_image))
            _check_cancel(cancel_event)
            images = out.images
            if mode == "inpaint":  # the VAE round trip changed every pixel: put the unmasked ones back
                init = np.asarray(plan["init"].convert("RGB"), dtype=np.uint8)
                mask = np.asarray(plan["mask"], dtype=np.uint8)
                images = [Image.fromarray(composite_unmasked(np.asarray(img.convert("RGB"), dtype=np.uint8), init, mask)) for img in images]
            if refiner is not None:
                with timer.stage("refiner"):
                    images = self._refine(request, plan, pipe, images, switch, progress_cb, cancel_event, previews)
                _check_cancel(cancel_event)
        finally:
            if offload:
                pipe.remove_all_hooks()
                for m in pipe.components.values():
                    if isinstance(m, torch.nn.Module):
                        m.to("cpu")
                self._residency.set_location([e.name for e in self._suite_names(plan)], "ram")

        outputs = self._finish(request, plan, images, job_dir, progress_cb, cancel_event, timer)
        inference_ms = (time.perf_counter() - infer_started) * 1000
        self._residency.touch([e.name for e in self._suite_names(plan)])
        return GenerateResult(
            outputs=outputs,
            timings={"model_load_ms": round(model_load_ms, 3), "inference_ms": round(inference_ms, 3)},
            loaded_models=loaded,
        )

    # -- previews ----------------------------------------------------------------------------

    def _preview_image(self, pipe, latents, max_size: int) -> np.ndarray:
        """The first image's current estimate as H×W×3 floats in 0..1, from the step's latents:
        decoded by the tiny autoencoder in MODELS_DIR/taesdxl when there is one, else by SDXL's
        linear latent-to-RGB approximation (one pixel per latent: an eighth of the image side).
        The tiny autoencoder decodes latents scaled down to the preview's size first: its cost
        grows with the pixels it makes (1024² on a CPU: seconds; at 256²: a sixteenth of that)."""
        torch = self._torch
        x = latents[:1].detach()
        sched = pipe.scheduler
        if float(getattr(sched, "init_noise_sigma", 1.0) or 1.0) > 1.0:
            # a sigma scheduler (Euler, Heun, LMS, KDPM2) holds x0 + σ·ε: scaled back to about unit
            # variance, as the UNet sees it; late in the run, when σ is small, that is about x0
            sigmas, index = getattr(sched, "sigmas", None), getattr(sched, "step_index", None)
            if sigmas is not None and index is not None and index < len(sigmas):
                x = x / (float(sigmas[index]) ** 2 + 1.0) ** 0.5
        with torch.inference_mode():
            taesd = self._tiny_autoencoder()
            if taesd is not None:
                if taesd.device != x.device or taesd.dtype != x.dtype:
                    taesd.to(x.device, x.dtype)
                up = taesd.config.upsampling_scaling_factor ** (len(taesd.config.decoder_block_out_channels) - 1)
                h, w = x.shape[-2:]
                shrink = max(1.0, max(h, w) * up / max_size)
                if shrink > 1.0:
                    size = (max(1, round(h / shrink)), max(1, round(w / shrink)))
                    x = torch.nn.functional.interpolate(x.float(), size=size, mode="area").to(x.dtype)
                rgb = taesd.decode(x).sample[0].float().permute(1, 2, 0)  # -1..1
            else:
                factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32, device=x.device)
                bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=x.device)
                rgb = x[0].float().permute(1, 2, 0) @ factors + bias
            return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).cpu().numpy()

    def _tiny_autoencoder(self):
        """MODELS_DIR/taesdxl (diffusers' AutoencoderTiny, e.g. madebyollin/taesdxl), loaded on
        first use and kept (about 10 MB); None when there is none or it does not load."""
        if self._taesd is False:
            path = os.path.join(self._settings.models_dir, TAESD_DIR)
            self._taesd = None
            if os.path.isfile(os.path.join(path, "config.json")):
                try:
                    from diffusers import AutoencoderTiny

                    self._taesd = AutoencoderTiny.from_pretrained(path).eval()
                    log.info("previews: decoding latents with the tiny autoencoder in %s", path)
                except Exception as exc:
                    log.warning("previews: cannot load %s (%s); using the linear latent-to-RGB approximation", path, exc)
        return self._taesd

    @staticmethod
    def _suite_names(plan: dict) -> list[ModelEntry]:
        out = [plan["base"]] + [e for e in (plan["refiner"], plan["vae"], plan["safety"]) if e is not None]
        return out + [e for e, _, _ in plan["controlnets"]] + [e for e, _ in plan["loras"]]

    def _refine(self, request, plan, base_pipe, latents, switch, progress_cb, cancel_event, previews: Previews | None = None):
        import diffusers

        torch = self._torch
        parts: RefinerParts = self._residency.get(plan["refiner"].name).obj
        hp = request["hyperparameters"]
        n, seed = hp["num_images"], hp["seed"]
        refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=base_pipe.vae,
            text_encoder=None,
            text_encoder_2=base_pipe.text_encoder_2,
            tokenizer=None,
            tokenizer_2=parts.tokenizer_2,
            unet=parts.unet,
            scheduler=build_scheduler(request["scheduler"], dict(parts.scheduler.config)),
            requires_aesthetics_score=parts.requires_aesthetics_score,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        refiner.set_progress_bar_config(disable=True)
        self._apply_performance(refiner, {k: v for k, v in plan["perf"].items() if k not in ("compile",)})
        steps = (request.get("refiner") or {}).get("steps") or request["scheduler"]["steps"]
        schedule_steps = refiner_schedule_steps(refiner.scheduler, steps, switch)
        try:
            with torch.inference_mode():
                out = refiner(
                    prompt=request["conditioning"]["prompt"],
                    negative_prompt=request["conditioning"].get("negative_prompt") or None,
                    guidance_scale=float(hp["guidance_scale"]),
                    num_inference_steps=schedule_steps,
                    denoising_start=switch,
                    image=latents,
                    num_images_per_prompt=n,
                    generator=[torch.Generator("cpu").manual_seed(image_seed(seed, i)) for i in range(n)],
                    output_type="pil",
                    callback_on_step_end=_stepper("refiner", progress_cb, cancel_event, previews, self._preview_image),
                )
        finally:
            if plan["perf"].get("cpu_offload", "none") != "none":
                refiner.remove_all_hooks()
                parts.unet.to("cpu")
        return out.images

    def _finish(self, request, plan, images, job_dir, progress_cb, cancel_event, timer: StageTimer) -> list[dict]:
        """Upscale, safety-check and write every image; return the WorkerOutputs."""
        hp = request["hyperparameters"]
        out_opts = request.get("output") or {}
        fmt = out_opts.get("format", "png")
        quality = int(out_opts.get("quality", 90))
        embed = out_opts.get("embed_metadata", True)
        os.makedirs(job_dir, exist_ok=True)
        up = plan["upscale"]
        infos: list[dict | None] = [None] * len(images)
        if up:
            progress_cb("upscale", 0, 1)
            models = {e.name: e.path for e in self._catalog.values() if e.kind == "upscaler"}
            with timer.stage("upscale"):
                for i, img in enumerate(images):
                    _check_cancel(cancel_event)
                    images[i], infos[i] = run_upscale(img, int(up["factor"]), up.get("upscaler"), models)
            progress_cb("upscale", 1, 1)
        verdicts: list[dict | None] = [None] * len(images)
        if plan["safety"] is not None:
            progress_cb("safety", 0, 1)
            with timer.stage("safety"):
                verdicts = self._safety(plan["safety"], images)
            progress_cb("safety", 1, 1)
        _check_cancel(cancel_event)
        models = {"base": plan["base"].name}
        if plan["refiner"] is not None:
            models["refiner"] = plan["refiner"].name
        if plan["vae"] is not None:
            models["vae"] = plan["vae"].name
        cn_models = [e.name for e, _, _ in plan["controlnets"]]
        written = []
        encode_started = time.perf_counter()
        for i, img in enumerate(images):
            seed = image_seed(hp["seed"], i)
            meta = build_metadata(request, seed, models, None, controlnet_models=cn_models, upscale=infos[i])
            path, content_type = save_image(img, os.path.join(os.path.abspath(job_dir), str(i)), fmt, quality, meta if embed else None)
            written.append((i, seed, img, path, content_type, meta))
        timer.record("encode", (time.perf_counter() - encode_started) * 1000)
        timings = timer.as_dict()
        outputs = []
        for i, seed, img, path, content_type, meta in written:
            sha, nbytes = file_digest(path)
            outputs.append(
                {
                    "index": i,
                    "path": path,
                    "width": img.width,
                    "height": img.height,
                    "seed": seed,
                    "sha256": sha,
                    "bytes": nbytes,
                    "content_type": content_type,
                    "upscaled": infos[i],
                    "safety": verdicts[i],
                    "metadata": {**meta, "timings": timings},
                }
            )
        return outputs

    def _safety(self, entry: ModelEntry, images: list) -> list[dict]:
        import numpy as np

        torch = self._torch
        parts = self._residency.get(entry.name).obj
        param = next(parts.checker.parameters())
        clip_input = parts.processor(images=images, return_tensors="pt").pixel_values.to(param.device, param.dtype)
        arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images])
        with torch.inference_mode():
            # the checker blacks out what it flags; the verdict is reported, the image kept (safety.py)
            _, flags = parts.checker(images=arrays.copy(), clip_input=clip_input)
        return [verdict(bool(f), entry.name) for f in flags]

    # -- pins ----------------------------------------------------------------------------------

    def _check_pinned(self, needed_mb: int, keep: set[str], what: str) -> None:
        """out_of_memory when `needed_mb` of VRAM can only be had by evicting pinned models."""
        pinned = self._residency.pinned_in_vram(keep)
        pinned = [r for r in pinned if r.parent is None or r.parent not in keep]
        pinned_mb = sum(r.vram_mb for r in pinned)
        if pinned and needed_mb > self._vram_total - pinned_mb:
            names = ", ".join(f"{r.entry.name} ({r.vram_mb} MB)" for r in pinned)
            raise WorkerError(
                "out_of_memory",
                f"{what} need {needed_mb} MB of VRAM, but pinned models hold {pinned_mb} of this GPU's {self._vram_total} MB "
                f"and are never evicted: {names}; unload them or run this elsewhere",
            )

    # -- cache requests: load and unload --------------------------------------------------------

    def _bring(self, entry: ModelEntry, location: str, base: ModelEntry | None, log_cb: LogCallback) -> str | None:
        """Put one model at `location` ("vram" or "ram"): cold (from_pretrained) or moved (.to).
        Returns how ("from disk", "from host RAM", "out of VRAM"), None when it was already there."""
        dtype = self._default_dtype
        target = self._device if location == "vram" else "cpu"
        r = self._residency.get(entry.name)
        if r is not None and (r.entry != entry or r.dtype != dtype):
            self._residency.drop(entry.name, log_cb, "reloading")
            r = None
        if entry.kind == "lora":
            if r is not None:
                return None  # lives in its base, wherever that is
            base_r = self._residency.get(base.name)
            adapter = load_lora(base_r.obj, entry)
            self._residency.add(Resident(entry, base_r.obj, dtype, entry.vram_mb(dtype), base_r.location, parent=base.name, extras={"adapter": adapter}))
            return "from disk"
        if r is not None:
            if r.location == location:
                return None
            move(r.obj, target)
            self._residency.set_location([entry.name], location)
            if location == "ram":
                self._residency.empty_cache()
            return "from host RAM" if location == "vram" else "out of VRAM"
        base_r = self._residency.get(base.name) if base is not None and base.name != entry.name else None
        obj = load_model(entry, dtype, target, base_r.obj if base_r is not None else None)
        resident = Resident(entry, obj, dtype, entry.vram_mb(dtype), location)
        if entry.kind == "base":
            resident.extras["scheduler_config"] = dict(obj.scheduler.config)
            resident.extras["unet"] = obj.unet
        self._residency.add(resident)
        return "from disk"

    def _size_with_loras(self, name: str, dtype: str) -> int:
        r = self._residency.get(name)
        return (r.vram_mb + sum(c.vram_mb for c in self._residency.loras_of(name))) if r else 0

    def load(self, models: list[str], location: str, pin: bool, progress_cb: ProgressCallback,
             cancel_event: threading.Event, log_cb: LogCallback | None = None) -> LoadResult:
        log_cb = log_cb or (lambda level, message: None)
        dtype = self._default_dtype
        entries: list[ModelEntry] = []
        for i, name in enumerate(models):
            entry = self._find(name)
            if entry is None:
                raise model_not_found(f"models.{i}", f"no model named {name!r} on this worker")
            if entry not in entries:
                entries.append(entry)
        # a LoRA lives inside a base pipeline: the base named with it, else the last one used
        bases = [e for e in entries if e.kind == "base"]
        lora_base: ModelEntry | None = bases[-1] if bases else None
        if lora_base is None:
            resident_bases = [r for r in self._residency.all() if r.entry.kind == "base"]
            lora_base = resident_bases[-1].entry if resident_bases else None
        for i, e in enumerate(entries):
            if e.kind == "lora" and lora_base is None:
                raise invalid_request(f"models.{models.index(e.name)}", f"{e.name!r} is a LoRA: it is loaded into a base model; name one with it")
        # bases first, so their LoRAs have somewhere to go
        entries.sort(key=lambda e: {"base": 0, "lora": 2}.get(e.kind, 1))
        names = {e.name for e in entries}
        started = time.perf_counter()
        if location == "vram":
            for e in entries:
                if e.vram_mb(dtype) > self._vram_total:
                    raise WorkerError("out_of_memory", f"models.{models.index(e.name)}: {e.name} needs {e.vram_mb(dtype)} MB of VRAM; this GPU has {self._vram_total} MB")
            total_mb = sum(e.vram_mb(dtype) for e in entries)
            if total_mb > self._vram_total:
                raise WorkerError("out_of_memory", f"these {len(entries)} models need {total_mb} MB of VRAM together; this GPU has {self._vram_total} MB")
            self._check_pinned(total_mb, names, f"these {len(entries)} models" if len(entries) > 1 else entries[0].name)
            missing = sum(e.vram_mb(dtype) for e in entries if (r := self._residency.get(e.name)) is None or r.location != "vram")
            self._residency.make_room(missing, names | ({lora_base.name} if lora_base else set()), log_cb)
        else:
            self._room_in_ram(entries, names, log_cb)
        moved: list[str] = []
        for e in entries:
            _check_cancel(cancel_event)
            r = self._residency.get(e.name)
            if r is not None and (r.location == location or e.kind == "lora") and r.entry == e:
                continue
            progress_cb("loading_model", 0, 1)
            t0 = time.perf_counter()
            how = self._bring(e, location, lora_base, log_cb)
            ms = (time.perf_counter() - t0) * 1000
            progress_cb("loading_model", 1, 1)
            if how:
                moved.append(e.name)
                log.info("loaded %s into %s %s in %.0f ms", e.name, location, how, ms)
                log_cb("info", f"loaded {e.name} into {location} {how} in {ms:.0f} ms")
        for e in entries:
            r = self._residency.get(e.name)
            if r is not None and (pin or (r.pinned_at == "vram" and location == "ram")):
                r.pinned_at = location  # a load without pin never lifts a pin; unload does
        self._residency.touch([e.name for e in entries])
        load_ms = (time.perf_counter() - started) * 1000
        log_cb("info", f"{len(entries)} model(s) resident in {location}{' and pinned' if pin else ''}; moved {len(moved)} in {load_ms:.0f} ms")
        return LoadResult(moved, load_ms)

    def _room_in_ram(self, entries: list[ModelEntry], keep: set[str], log_cb: LogCallback) -> None:
        """Host RAM for `entries` (KILN_DIFFUSERS_RAM_CACHE_MB): drop unpinned warm models, LRU first."""
        dtype = self._default_dtype
        budget = self._residency.ram_budget_mb
        needed = sum(e.vram_mb(dtype) for e in entries if e.kind != "lora" and ((r := self._residency.get(e.name)) is None or r.location != "ram"))
        free = budget - self._residency.used_mb("ram")
        if needed <= free:
            return
        for r in self._residency.all():
            if free >= needed:
                break
            if r.location == "ram" and r.parent is None and not r.pinned and r.entry.name not in keep:
                free += self._size_with_loras(r.entry.name, dtype)
                self._residency.drop(r.entry.name, log_cb, "to make room in host RAM")
        if needed > free:
            pinned = [r for r in self._residency.all() if r.location == "ram" and r.pinned and r.entry.name not in keep]
            held = (f"; pinned models hold {sum(r.vram_mb for r in pinned)} MB of it: " + ", ".join(r.entry.name for r in pinned)) if pinned else ""
            raise WorkerError("out_of_memory", f"these models need {needed} MB of host RAM; {max(free, 0)} MB of {budget} MB is free{held}")

    def unload(self, models: list[str], log_cb: LogCallback | None = None) -> LoadResult:
        freed: list[str] = []
        for name in dict.fromkeys(models):
            r = self._residency.get(name)
            if r is None:
                continue
            children = [c.entry.name for c in self._residency.loras_of(name)]
            self._residency.drop(name, log_cb, "unload")
            freed += [name] + [c for c in children if c not in freed]
        gc.collect()
        self._residency.empty_cache()
        if log_cb and len(freed) < len(set(models)):
            missing = [n for n in dict.fromkeys(models) if n not in freed]
            if missing:
                log_cb("info", "not resident, nothing to free: " + ", ".join(missing))
        return LoadResult(freed, 0.0)

    # -- training ------------------------------------------------------------------------------

    def train(self, message: dict, progress_cb: ProgressCallback, checkpoint_cb: CheckpointCallback,
              cancel_event: threading.Event, log_cb: LogCallback | None = None) -> TrainResult:
        from .diffusers_parts.lora_trainer import FORMAT, LoraTrainer, RunSpec, save_lora

        log_cb = log_cb or (lambda level, message: None)
        request = message["request"]
        hp = request["hyperparameters"]
        job_dir = message["job_dir"]
        dtype = self._default_dtype

        # 1. everything that can be wrong, before any cost is paid
        training.check_train_message(message, self.capabilities())
        base = self._entry(request["base_model"], "base", "base_model")
        out_name = request["output"]["name"]
        if out_name in self._catalog:
            raise invalid_request("output.name", f"{out_name!r} is already a {self._catalog[out_name].kind} model on this worker; pick another name")
        items = training.load_dataset(request, message["dataset_dir"])
        need_mb = training.training_vram_mb(request)
        base_mb = base.vram_mb(dtype)
        if base_mb + need_mb > self._vram_total:
            raise WorkerError("out_of_memory", f"{base.name} ({base_mb} MB) plus training at {hp['resolution']}² × batch {hp['batch_size']} "
                                               f"({need_mb} MB) exceed this device's {self._vram_total} MB")
        self._check_pinned(base_mb + need_mb, {base.name}, f"{base.name} plus training ({need_mb} MB)")
        spec = RunSpec.of(request, training.dataset_digest(items))
        total = hp["steps"]
        resumed = training.read_resume(message.get("resume"), spec.resume_keys(), total)
        _check_cancel(cancel_event)

        # 2. the base pipeline in VRAM (shared with generation: no second copy), room for training besides
        started = time.perf_counter()
        r = self._residency.get(base.name)
        if r is not None and r.dtype != dtype:
            self._residency.drop(base.name, log_cb, f"reloading at {dtype}")
            r = None
        if r is None or r.location != "vram":
            self._residency.make_room(base_mb + need_mb, {base.name}, log_cb)
            progress_cb("loading_model", 0, 1)
            how = self._bring(base, "vram", None, log_cb)
            progress_cb("loading_model", 1, 1)
            log_cb("info", f"loaded {base.name} {how} for training")
        else:
            self._residency.make_room(need_mb, {base.name}, log_cb)
        self._residency.touch([base.name])
        base_r = self._residency.get(base.name)
        model_load_ms = (time.perf_counter() - started) * 1000

        # 3. train
        started = time.perf_counter()
        trainer = None
        try:
            trainer = LoraTrainer(base_r.obj, base_r.extras["scheduler_config"], spec, items, self._device, log_cb)
            done = 0
            if isinstance(resumed, tuple):
                try:
                    trainer.load_state_dict(resumed[0])
                    done = resumed[1]
                    log_cb("info", f"resuming from the checkpoint of step {done}")
                except Exception as exc:
                    log_cb("warning", f"cannot resume ({exc}); training from step 0")
                    trainer.close()
                    trainer = LoraTrainer(base_r.obj, base_r.extras["scheduler_config"], spec, items, self._device, log_cb)
            elif message.get("resume"):
                log_cb("warning", f"cannot resume ({resumed}); training from step 0")

            def metadata(step: int) -> dict[str, str]:
                return {"format": "pt", "lora_adapter_metadata": trainer.adapter_metadata(), "kiln_format": FORMAT,
                        "base_model": spec.base_model, "name": spec.name, "rank": str(spec.rank), "alpha": repr(spec.alpha),
                        "step": str(step), "run": spec.run_id}

            every = hp["checkpoint_every"]
            loss = float("nan")
            for step in range(done + 1, total + 1):
                _check_cancel(cancel_event)
                loss = trainer.step(step, cancel_event)
                progress_cb("train", step, total, loss)
                if training.checkpoint_due(step, total, every):
                    path = training.checkpoint_path(job_dir, step)
                    save_lora(path, trainer.state_dict(), metadata(step))
                    sha256, size = file_digest(path)
                    checkpoint_cb(step, path, sha256, size)
                self._residency.touch([base.name])
            _check_cancel(cancel_event)
            if done >= total:  # resumed at the last step: nothing left to run, no loss measured
                loss = 0.0
            path = training.result_path(job_dir, request)
            save_lora(path, trainer.state_dict(), metadata(total))
            sha256, size = file_digest(path)
        except Exception as exc:
            if isinstance(exc, WorkerError) or not is_oom(exc):
                raise
            del exc
            raise WorkerError("out_of_memory", f"{self._device_name} ran out of memory training at {hp['resolution']}² × batch {hp['batch_size']}") from None
        finally:
            if trainer is not None:
                trainer.close()
            trainer = None
            gc.collect()
            self._residency.empty_cache()
        train_ms = (time.perf_counter() - started) * 1000
        return TrainResult(path, sha256, size, total, loss, {"model_load_ms": round(model_load_ms, 3), "train_ms": round(train_ms, 3)})


def _stepper(stage: str, progress_cb: ProgressCallback, cancel_event: threading.Event, previews: Previews | None = None,
             preview_image=None):
    """callback_on_step_end: progress per denoising step, a preview when one is due, then the
    cancel check.

    A cancel raises WorkerError("canceled") out of the pipeline call itself: the remaining steps,
    the VAE decode and the post-processing never run (setting `pipe._interrupt` only skips the
    steps; diffusers still decodes). Progress counts scheduler steps: a second-order scheduler
    (Heun, KDPM2) runs two model evaluations per step, and reports one step for both.
    """
    reported = 0

    def on_step_end(pipe, i, t, kwargs):
        nonlocal reported
        order = int(getattr(pipe.scheduler, "order", 1) or 1)
        total = math.ceil(int(getattr(pipe, "_num_timesteps", 0) or 0) / order)
        step = math.ceil((i + 1) / order)
        if step > reported:
            reported = step
            progress_cb(stage, step, max(total, step))
            if previews is not None and "latents" in kwargs:
                previews.offer(stage, step, max(total, step), lambda: preview_image(pipe, kwargs["latents"], previews.max_size))
        _check_cancel(cancel_event)
        return kwargs

    return on_step_end


_REFINER_STEPS_CACHE: dict[tuple, int] = {}


def refiner_schedule_steps(scheduler: Any, steps: int, switch: float) -> int:
    """The num_inference_steps that makes the SDXL img2img pipeline, started at
    `denoising_start=switch`, run `steps` steps.

    diffusers (StableDiffusionXLImg2ImgPipeline.get_timesteps) builds the whole schedule for
    num_inference_steps, then keeps only the timesteps below (1 − switch) × num_train_timesteps
    (for a second-order scheduler, rounded up to an odd count of evaluations): passing `steps`
    itself runs about steps × (1 − switch) of them. The kept part grows with the schedule's length,
    so a bisection finds the shortest schedule that keeps `steps`; where no length keeps exactly
    that many (SDXL's "leading" spacing at 30 steps from 0.8 keeps 29 or 34), the closest, fewer
    on a tie. Cached per scheduler config, steps and switch.
    """
    key = (type(scheduler).__name__, json.dumps(dict(scheduler.config), sort_keys=True, default=str), steps, round(switch, 6))
    if key in _REFINER_STEPS_CACHE:
        return _REFINER_STEPS_CACHE[key]
    probe = type(scheduler).from_config(scheduler.config)
    train = int(probe.config.num_train_timesteps)
    cutoff = int(round(train - switch * train))
    order = int(getattr(probe, "order", 1) or 1)

    def runs(n: int) -> int:
        probe.set_timesteps(n, device="cpu")
        count = int((probe.timesteps < cutoff).sum().item())
        if order == 2 and count % 2 == 0:
            count += 1
        return math.ceil(count / order)

    lo, hi = 1, max(steps, math.ceil(steps / max(1e-3, 1.0 - switch))) * 4 + 10
    if runs(hi) < steps:
        best = hi
    else:
        while lo < hi:  # the shortest schedule that keeps at least `steps`
            mid = (lo + hi) // 2
            if runs(mid) >= steps:
                hi = mid
            else:
                lo = mid + 1
        got = runs(lo)
        best = lo if got == steps or lo == 1 or abs(got - steps) < abs(runs(lo - 1) - steps) else lo - 1
    _REFINER_STEPS_CACHE[key] = best
    return best


def _check_cancel(cancel_event: threading.Event) -> None:
    if cancel_event.is_set():
        raise WorkerError("canceled", "canceled by the agent")

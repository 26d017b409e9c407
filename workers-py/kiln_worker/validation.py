"""Request checks every backend runs before touching a model: the rules the JSON Schema cannot
express (the contracts' superRefine, checked again here as defence in depth) and the ones that
depend on this worker (features, dtypes, performance options). Fields are named relative to the
request, as the API names them.

Also `stage_steps`: how many denoising steps each stage runs, so both backends report the same
progress totals.
"""

from __future__ import annotations

import os

from .errors import WorkerError, invalid_request
from .schedulers import validate_scheduler
from .tables import preprocessable

MAX_PIXELS = 2048 * 2048
MAX_UPSCALED_SIDE = 8192

# request performance options → the capability names that advertise them
PERFORMANCE_FLAGS = ("attention_slicing", "vae_slicing", "vae_tiling", "channels_last", "compile")
CPU_OFFLOAD = {"model": "cpu_offload_model", "sequential": "cpu_offload_sequential"}


def stage_steps(request: dict) -> dict[str, int]:
    """{"base": N, "refiner": M}: the denoising steps each stage runs (M is 0 without a refiner).

    - text-to-image: N = scheduler.steps;
    - img2img / inpaint: N = int(steps × strength), as diffusers runs it;
    - with a refiner: the base runs round(steps × denoising_switch) steps (diffusers'
      denoising_end), the refiner M = refiner.steps (default scheduler.steps) steps over the rest
      of the schedule.
    """
    steps = request["scheduler"]["steps"]
    image = request.get("image")
    if image:
        return {"base": int(steps * image["strength"]), "refiner": 0}
    if request["model"].get("refiner"):
        ref = request.get("refiner") or {}
        switch = ref.get("denoising_switch", 0.8)
        return {"base": max(1, int(round(steps * switch))), "refiner": ref.get("steps", steps)}
    return {"base": steps, "refiner": 0}


def check_request(request: dict, job_dir: str) -> None:
    """Raise invalid_request for what the schema admits but the contracts forbid."""
    if not os.path.isabs(job_dir):
        raise WorkerError("invalid_request", f"job_dir: absolute — {job_dir!r} is not an absolute path")
    if not request["conditioning"]["prompt"].strip():
        raise invalid_request("conditioning.prompt", "too_small — must not be empty")
    hp = request["hyperparameters"]
    if hp["width"] * hp["height"] > MAX_PIXELS:
        raise invalid_request("hyperparameters.width", f"too_big — width × height must be at most {MAX_PIXELS} pixels")
    validate_scheduler(request["scheduler"])
    if request.get("refiner") and not request["model"].get("refiner"):
        raise invalid_request("refiner", "set model.refiner to use refiner options")
    if request["model"].get("refiner") and (request.get("controlnets") or request.get("image")):
        raise invalid_request("model.refiner", "the refiner runs with text-to-image only, not with controlnets or image")
    names = [l["name"] for l in request.get("loras") or []]
    if len(set(names)) != len(names):
        raise invalid_request("loras", "must not name a LoRA twice")
    for i, cn in enumerate(request.get("controlnets") or []):
        if cn["guidance_start"] >= cn["guidance_end"]:
            raise invalid_request(f"controlnets.{i}.guidance_end", "must be greater than guidance_start")
        if cn["preprocess"] and cn["type"] not in preprocessable():
            raise invalid_request(
                f"controlnets.{i}.preprocess",
                f"the worker preprocesses {', '.join(preprocessable())} only; send an already processed {cn['type']} map",
            )
    up = (request.get("postprocess") or {}).get("upscale")
    if up and max(hp["width"], hp["height"]) * up["factor"] > MAX_UPSCALED_SIDE:
        raise invalid_request("postprocess.upscale.factor", f"the upscaled image may be at most {MAX_UPSCALED_SIDE} pixels on a side")
    image = request.get("image")
    if image and stage_steps(request)["base"] < 1:
        raise invalid_request(
            "image.strength",
            f"{request['scheduler']['steps']} steps × strength {image['strength']:g} runs no denoising step; raise either",
        )


def required_features(request: dict) -> list[str]:
    """The capability features a request uses (WorkerCapabilities.features)."""
    out = []
    if request["model"].get("refiner"):
        out.append("refiner")
    if request["model"].get("vae"):
        out.append("vae")
    if request.get("loras"):
        out.append("lora")
    if request.get("controlnets"):
        out.append("controlnet")
    image = request.get("image")
    if image:
        out.append("inpaint" if image.get("mask") else "img2img")
    post = request.get("postprocess") or {}
    if post.get("upscale"):
        out.append("upscale")
    if post.get("safety_check"):
        out.append("safety_check")
    return out


def check_capabilities(request: dict, capabilities: dict) -> None:
    """Raise invalid_request when the request needs a feature, dtype or performance option this
    worker does not advertise."""
    for feature in required_features(request):
        if feature not in capabilities["features"]:
            raise invalid_request(_feature_field(feature), f"this worker does not support {feature}")
    perf = request.get("performance")
    if not perf:
        return
    if perf["dtype"] not in capabilities["dtypes"]:
        raise invalid_request("performance.dtype", f"{perf['dtype']} is not supported here (this worker runs {', '.join(capabilities['dtypes'])})")
    for flag in PERFORMANCE_FLAGS:
        if perf[flag] and flag not in capabilities["performance"]:
            raise invalid_request(f"performance.{flag}", "not supported by this worker")
    offload = CPU_OFFLOAD.get(perf["cpu_offload"])
    if offload and offload not in capabilities["performance"]:
        raise invalid_request("performance.cpu_offload", f"{perf['cpu_offload']} offload is not supported by this worker")


def _feature_field(feature: str) -> str:
    return {
        "refiner": "model.refiner",
        "vae": "model.vae",
        "lora": "loras",
        "controlnet": "controlnets",
        "img2img": "image",
        "inpaint": "image.mask",
        "upscale": "postprocess.upscale",
        "safety_check": "postprocess.safety_check",
    }.get(feature, feature)

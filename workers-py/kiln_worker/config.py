"""The worker's configuration, read from the environment once at start.

Every bad variable is collected and reported together (ConfigError), so one restart fixes them all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping

BACKENDS = ("synthetic", "diffusers")
MODEL_KINDS = ("base", "refiner", "vae", "lora", "controlnet", "upscaler", "safety_checker")
CONTROLNET_TYPES = ("canny", "depth", "openpose", "lineart", "scribble", "normal", "seg")


@dataclass(frozen=True)
class ModelSpec:
    """A model the synthetic backend knows: its VRAM when loaded and its size on disk."""

    name: str
    kind: str
    vram_mb: int
    disk_gb: float
    controlnet_type: str | None = None  # kind controlnet: which control maps it takes
    scale: int | None = None  # kind upscaler: its native factor


# Realistic fp16 sizes, so placement sees the same load and eviction costs as on a real GPU.
DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", "base", 7000, 6.9),
    ModelSpec("stabilityai/stable-diffusion-xl-refiner-1.0", "refiner", 6100, 6.1),
    ModelSpec("stabilityai/sdxl-turbo", "base", 7000, 6.9),
    ModelSpec("RunDiffusion/Juggernaut-XL-v9", "base", 7000, 6.6),
    ModelSpec("playgroundai/playground-v2.5-1024px-aesthetic", "base", 7000, 6.9),
    ModelSpec("madebyollin/sdxl-vae-fp16-fix", "vae", 170, 0.17),
    ModelSpec("kiln/lora-pixel-art", "lora", 180, 0.17),
    ModelSpec("kiln/lora-watercolor", "lora", 90, 0.09),
    ModelSpec("diffusers/controlnet-canny-sdxl-1.0", "controlnet", 2500, 2.5, controlnet_type="canny"),
    ModelSpec("diffusers/controlnet-depth-sdxl-1.0", "controlnet", 2500, 2.5, controlnet_type="depth"),
    ModelSpec("thibaud/controlnet-openpose-sdxl-1.0", "controlnet", 2500, 5.0, controlnet_type="openpose"),
    ModelSpec("xinsir/controlnet-lineart-sdxl-1.0", "controlnet", 2500, 2.5, controlnet_type="lineart"),
    ModelSpec("xinsir/controlnet-scribble-sdxl-1.0", "controlnet", 2500, 2.5, controlnet_type="scribble"),
    ModelSpec("kiln/controlnet-normal-sdxl-1.0", "controlnet", 2500, 2.5, controlnet_type="normal"),
    ModelSpec("kiln/controlnet-seg-sdxl-1.0", "controlnet", 2500, 2.5, controlnet_type="seg"),
    ModelSpec("ai-forever/Real-ESRGAN-x4", "upscaler", 70, 0.07, scale=4),
    ModelSpec("CompVis/stable-diffusion-safety-checker", "safety_checker", 1200, 1.2),
)


@dataclass(frozen=True)
class Config:
    backend: str = "synthetic"
    synthetic_step_ms: float = 50.0
    synthetic_load_ms_per_gb: float = 400.0
    synthetic_vram_mb: int = 24576
    synthetic_gpu_name: str = "Synthetic GPU"
    synthetic_models: tuple[ModelSpec, ...] = DEFAULT_MODELS
    synthetic_lora_dir: str | None = None  # every *.safetensors there is one more LoRA, named by its stem
    lora_dir: str | None = None  # KILN_LORA_DIR: trained LoRAs the agent fetched, <name with / → -->.safetensors
    synthetic_ram_mb: int = 65536  # simulated host RAM for warm models
    synthetic_ram_load_factor: float = 0.15  # RAM → VRAM costs this fraction of a cold load
    synthetic_train_step_ms: float = 50.0  # one training step at 1024², batch 1
    synthetic_nsfw_word: str = "nsfw-test"  # the synthetic safety checker flags prompts containing it
    synthetic_no_bf16: bool = False  # advertise no bf16, like a pre-Ampere GPU
    # test-only fault hooks (see README): never set them in production
    synthetic_stray_print: bool = False
    synthetic_raise_on_prompt: str | None = None


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("invalid worker configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def _number(env: Mapping[str, str], name: str, default: float, problems: list[str], *, integer: bool = False, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        problems.append(f"{name}={raw!r}: must be {'an integer' if integer else 'a number'}")
        return default
    if value != value or value in (float("inf"), float("-inf")) or value < minimum:
        problems.append(f"{name}={raw!r}: must be a finite number >= {minimum:g}")
        return default
    return value


def _models(raw: str, problems: list[str]) -> tuple[ModelSpec, ...]:
    name = "KILN_SYNTHETIC_MODELS"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        problems.append(f"{name}: not JSON ({exc})")
        return DEFAULT_MODELS
    if not isinstance(data, list) or not data:
        problems.append(f"{name}: must be a non-empty JSON list of {{name, kind, vram_mb, disk_gb[, controlnet_type][, scale]}}")
        return DEFAULT_MODELS
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object")
            continue
        extra = set(item) - {"name", "kind", "vram_mb", "disk_gb", "controlnet_type", "scale"}
        if extra:
            problems.append(f"{where}: unknown keys {sorted(extra)}")
        n, kind, vram, disk = item.get("name"), item.get("kind"), item.get("vram_mb"), item.get("disk_gb")
        ok = True
        if not isinstance(n, str) or not n:
            problems.append(f"{where}.name: must be a non-empty string")
            ok = False
        elif n in seen:
            problems.append(f"{where}.name: {n!r} is listed twice")
            ok = False
        if kind not in MODEL_KINDS:
            problems.append(f"{where}.kind: must be one of {', '.join(MODEL_KINDS)}")
            ok = False
        if not isinstance(vram, int) or isinstance(vram, bool) or vram < 0:
            problems.append(f"{where}.vram_mb: must be an integer >= 0")
            ok = False
        if not isinstance(disk, (int, float)) or isinstance(disk, bool) or disk < 0:
            problems.append(f"{where}.disk_gb: must be a number >= 0")
            ok = False
        cn_type, scale = item.get("controlnet_type"), item.get("scale")
        if kind == "controlnet" and cn_type not in CONTROLNET_TYPES:
            problems.append(f"{where}.controlnet_type: a controlnet needs one of {', '.join(CONTROLNET_TYPES)}")
            ok = False
        elif kind != "controlnet" and cn_type is not None:
            problems.append(f"{where}.controlnet_type: only for kind controlnet")
            ok = False
        if kind == "upscaler" and scale not in (2, 4):
            problems.append(f"{where}.scale: an upscaler needs its native factor, 2 or 4")
            ok = False
        elif kind != "upscaler" and scale is not None:
            problems.append(f"{where}.scale: only for kind upscaler")
            ok = False
        if ok:
            seen.add(n)
            specs.append(ModelSpec(n, kind, vram, float(disk), cn_type, scale))
    return tuple(specs)


def load_config(env: Mapping[str, str]) -> Config:
    """Parse the environment; raise ConfigError naming every bad variable."""
    problems: list[str] = []
    backend = env.get("KILN_BACKEND", "synthetic").strip() or "synthetic"
    if backend not in BACKENDS:
        problems.append(f"KILN_BACKEND={backend!r}: must be one of {', '.join(BACKENDS)}")
    step_ms = _number(env, "KILN_SYNTHETIC_STEP_MS", 50.0, problems)
    load_ms_per_gb = _number(env, "KILN_SYNTHETIC_LOAD_MS_PER_GB", 400.0, problems)
    vram_mb = int(_number(env, "KILN_SYNTHETIC_VRAM_MB", 24576, problems, integer=True, minimum=1))
    gpu_name = env.get("KILN_SYNTHETIC_GPU_NAME", "").strip() or "Synthetic GPU"
    raw_models = env.get("KILN_SYNTHETIC_MODELS", "").strip()
    models = _models(raw_models, problems) if raw_models else DEFAULT_MODELS
    stray = env.get("KILN_SYNTHETIC_STRAY_PRINT", "").strip()
    if stray not in ("", "0", "1"):
        problems.append(f"KILN_SYNTHETIC_STRAY_PRINT={stray!r}: must be 0 or 1")
    raise_on = env.get("KILN_SYNTHETIC_RAISE_ON_PROMPT") or None
    lora_dir = env.get("KILN_SYNTHETIC_LORA_DIR", "").strip() or None
    if lora_dir is not None and not os.path.isdir(lora_dir):
        problems.append(f"KILN_SYNTHETIC_LORA_DIR={lora_dir!r}: not a directory")
    shared_lora_dir = env.get("KILN_LORA_DIR", "").strip() or None
    if shared_lora_dir is not None and os.path.exists(shared_lora_dir) and not os.path.isdir(shared_lora_dir):
        problems.append(f"KILN_LORA_DIR={shared_lora_dir!r}: exists but is not a directory")
    ram_mb = int(_number(env, "KILN_SYNTHETIC_RAM_MB", 65536, problems, integer=True))
    ram_factor = _number(env, "KILN_SYNTHETIC_RAM_LOAD_FACTOR", 0.15, problems)
    if ram_factor > 1:
        problems.append(f"KILN_SYNTHETIC_RAM_LOAD_FACTOR={env['KILN_SYNTHETIC_RAM_LOAD_FACTOR']!r}: must be between 0 and 1 (a fraction of a cold load)")
    train_step_ms = _number(env, "KILN_SYNTHETIC_TRAIN_STEP_MS", 50.0, problems)
    nsfw_word = env.get("KILN_SYNTHETIC_NSFW_WORD", "").strip() or "nsfw-test"
    no_bf16 = env.get("KILN_SYNTHETIC_NO_BF16", "").strip()
    if no_bf16 not in ("", "0", "1"):
        problems.append(f"KILN_SYNTHETIC_NO_BF16={no_bf16!r}: must be 0 or 1")
    if problems:
        raise ConfigError(problems)
    return Config(
        backend=backend,
        synthetic_step_ms=step_ms,
        synthetic_load_ms_per_gb=load_ms_per_gb,
        synthetic_vram_mb=vram_mb,
        synthetic_gpu_name=gpu_name,
        synthetic_models=models,
        synthetic_stray_print=stray == "1",
        synthetic_raise_on_prompt=raise_on,
        synthetic_lora_dir=lora_dir,
        lora_dir=shared_lora_dir,
        synthetic_ram_mb=ram_mb,
        synthetic_ram_load_factor=ram_factor,
        synthetic_train_step_ms=train_step_ms,
        synthetic_nsfw_word=nsfw_word,
        synthetic_no_bf16=no_bf16 == "1",
    )

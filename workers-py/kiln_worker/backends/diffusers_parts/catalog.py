"""What models this worker has on disk, found without touching the network.

Two sources, MODELS_DIR first (a name found there hides the same name in the HF cache):

- `MODELS_DIR/<kind>/<name>/` (a diffusers folder) or `MODELS_DIR/<kind>/<name>.safetensors` (a
  single file), kind ∈ base, refiner, vae, lora, controlnet/<type>, upscaler, safety_checker.
  `--` in a name stands for `/` (`stabilityai--stable-diffusion-xl-base-1.0`). Single-file
  checkpoints need a staged diffusers config (a folder without weights) in
  `MODELS_DIR/configs/<kind>/` (a single-file VAE may also use `configs/base/vae`).
- Repositories in the local Hugging Face cache (`huggingface_hub.scan_cache_dir`), classified by
  `model_index.json` `_class_name` or `config.json`.

Sizes come from the safetensors headers (exact parameter counts), so the VRAM estimate holds at
any dtype; `.bin`/`.pth` files are assumed fp32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field

from ...tables import controlnet_types

log = logging.getLogger("kiln_worker.diffusers.catalog")

KINDS = ("base", "refiner", "vae", "lora", "controlnet", "upscaler", "safety_checker")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
LOAD_BYTES_PER_MS = 1_000_000  # ~1 GB/s from local disk
# a single-file refiner keeps only its UNet (text_encoder_2 and VAE are shared with the base)
UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class ModelEntry:
    name: str  # as requests name it
    kind: str
    path: str  # a diffusers folder or a single file
    single_file: bool
    params: int  # parameters that end up resident (the UNet only, for a refiner)
    disk_bytes: int  # bytes read to load it
    controlnet_type: str | None = None
    scale: int | None = None
    config: str | None = None  # staged diffusers config folder for single files
    config_subfolder: str | None = None
    variant: str | None = None  # "fp16" when the folder only has variant weights
    source: str = "models_dir"
    extra: dict = field(default_factory=dict, compare=False)

    def vram_mb(self, dtype: str) -> int:
        return max(1, math.ceil(self.params * DTYPE_BYTES[dtype] / (1024 * 1024)))

    def load_ms(self) -> int:
        return max(1, round(self.disk_bytes / LOAD_BYTES_PER_MS))

    def info(self, dtype: str) -> dict:
        """ModelInfo for the capabilities."""
        out = {"name": self.name, "kind": self.kind, "vram_mb": self.vram_mb(dtype), "load_ms": self.load_ms()}
        if self.controlnet_type:
            out["controlnet_type"] = self.controlnet_type
        if self.scale:
            out["scale"] = self.scale
        return out


# -- weight files ------------------------------------------------------------------------------


def safetensors_params(path: str, prefix: str | None = None) -> tuple[int, int]:
    """(parameters, bytes) of the tensors in a safetensors file (only keys under `prefix`)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 200 * 1024 * 1024:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    params = nbytes = 0
    for key, meta in header.items():
        if key == "__metadata__" or (prefix and not key.startswith(prefix)):
            continue
        params += math.prod(meta["shape"])
        nbytes += meta["data_offsets"][1] - meta["data_offsets"][0]
    return params, nbytes


def file_params(path: str, prefix: str | None = None) -> tuple[int, int]:
    """(parameters, disk bytes) of one weight file."""
    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        try:
            params, nbytes = safetensors_params(path, prefix)
            return params, size if prefix is None else nbytes
        except (OSError, ValueError, KeyError, struct.error) as exc:
            log.warning("cannot read the safetensors header of %s (%s); estimating from its size", path, exc)
    per_param = 2 if ".fp16." in os.path.basename(path) else 4
    return size // per_param, size


def _variant_of(filename: str) -> str | None:
    """`diffusion_pytorch_model.fp16.safetensors` → fp16; sharded `x.fp16-00001-of-00002.safetensors` too."""
    parts = filename.split(".")
    if len(parts) == 3:
        return parts[1].split("-")[0]
    return None


def folder_weights(folder: str) -> tuple[list[str], str | None]:
    """The weight files a from_pretrained of `folder` (one component) reads, and the variant it needs."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, n)))
    except OSError:
        return [], None
    for suffix in (".safetensors", ".bin"):
        plain = [n for n in names if n.endswith(suffix) and _variant_of(n) is None]
        if plain:
            return [os.path.join(folder, n) for n in plain], None
    for suffix in (".safetensors", ".bin"):
        fp16 = [n for n in names if n.endswith(suffix) and _variant_of(n) == "fp16"]
        if fp16:
            return [os.path.join(folder, n) for n in fp16], "fp16"
    return [], None


def _sum(files: list[str]) -> tuple[int, int]:
    params = disk = 0
    for f in files:
        p, d = file_params(f)
        params += p
        disk += d
    return params, disk


def pipeline_stats(folder: str, components: list[str] | None = None) -> tuple[int, int, str | None]:
    """(params, disk bytes, variant) over a pipeline folder's components (all, or those named)."""
    params = disk = 0
    variant = None
    subdirs = components or sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    for sub in subdirs:
        files, v = folder_weights(os.path.join(folder, sub))
        p, d = _sum(files)
        params += p
        disk += d
        variant = variant or v
    return params, disk, variant


# -- MODELS_DIR --------------------------------------------------------------------------------


def display_name(stem: str) -> str:
    return stem.replace("--", "/")


_SCALE = re.compile(r"(?:^|[^0-9a-z])(?:x([248])|([248])x)(?:[^0-9a-z]|$)", re.IGNORECASE)


def guess_scale(name: str) -> int | None:
    """An upscaler's native factor from its conventional name (4x-UltraSharp, RealESRGAN_x4plus)."""
    m = _SCALE.search(name) or re.search(r"x([248])", name, re.IGNORECASE)
    if not m:
        return None
    return int(next(g for g in m.groups() if g))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _config_dir(models_dir: str, kind: str) -> tuple[str | None, str | None]:
    """(config folder, subfolder) staged for single-file checkpoints of `kind`."""
    own = os.path.join(models_dir, "configs", kind)
    if os.path.isdir(own):
        return own, None
    if kind == "vae" and os.path.isdir(os.path.join(models_dir, "configs", "base", "vae")):
        return os.path.join(models_dir, "configs", "base"), "vae"
    if kind == "controlnet" and os.path.isdir(os.path.join(models_dir, "configs", "controlnet")):
        return os.path.join(models_dir, "configs", "controlnet"), None
    return None, None


def _entry(models_dir: str, kind: str, path: str, name: str, controlnet_type: str | None = None) -> ModelEntry | None:
    """One MODELS_DIR item as a ModelEntry, or None (logged) when it is not loadable."""
    is_file = os.path.isfile(path)
    if is_file and not path.endswith(WEIGHT_SUFFIXES):
        return None
    if is_file:
        if kind in ("lora", "upscaler"):
            params, disk = file_params(path)
            return ModelEntry(name, kind, path, True, params, disk, scale=guess_scale(name) if kind == "upscaler" else None)
        config, sub = _config_dir(models_dir, kind)
        if config is None:
            log.warning("skipping %s: a single-file %s needs a staged diffusers config in %s", path, kind, os.path.join(models_dir, "configs", kind))
            return None
        prefix = UNET_PREFIX if kind == "refiner" else None
        params, disk = file_params(path, prefix)
        if kind == "refiner":
            disk = os.path.getsize(path)
        return ModelEntry(name, kind, path, True, params, disk, controlnet_type=controlnet_type, config=config, config_subfolder=sub)
    # a diffusers folder
    if kind in ("base", "refiner"):
        index = _read_json(os.path.join(path, "model_index.json"))
        if index is None:
            log.warning("skipping %s: a %s folder needs a model_index.json", path, kind)
            return None
        params, disk, variant = pipeline_stats(path)
        if kind == "refiner":
            params, _, _ = pipeline_stats(path, ["unet"])
        if params == 0:
            log.warning("skipping %s: no weight files", path)
            return None
        return ModelEntry(name, kind, path, False, params, disk, variant=variant)
    if kind == "lora":
        files = [n for n in sorted(os.listdir(path)) if n.endswith(".safetensors")]
        if not files:
            log.warning("skipping %s: a LoRA folder needs a .safetensors file", path)
            return None
        preferred = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else files[0]
        params, disk = file_params(os.path.join(path, preferred))
        return ModelEntry(name, kind, path, False, params, disk, extra={"weight_name": preferred})
    if kind == "upscaler":
        files, _ = folder_weights(path)
        if not files:
            log.warning("skipping %s: no weight file", path)
            return None
        params, disk = _sum(files)
        return ModelEntry(name, kind, files[0], True, params, disk, scale=guess_scale(name))
    # vae, controlnet, safety_checker: one model folder
    if _read_json(os.path.join(path, "config.json")) is None:
        log.warning("skipping %s: a %s folder needs a config.json", path, kind)
        return None
    files, variant = folder_weights(path)
    params, disk = _sum(files)
    if params == 0:
        log.warning("skipping %s: no weight files", path)
        return None
    return ModelEntry(name, kind, path, False, params, disk, controlnet_type=controlnet_type, variant=variant)


def _items(folder: str) -> list[tuple[str, str]]:
    """(path, name) of the models in one kind folder."""
    out = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for n in names:
        if n.startswith("."):
            continue
        path = os.path.join(folder, n)
        if os.path.isdir(path):
            out.append((path, display_name(n)))
        elif n.endswith(WEIGHT_SUFFIXES):
            out.append((path, display_name(os.path.splitext(n)[0])))
    return out


def scan_models_dir(models_dir: str) -> list[ModelEntry]:
    entries: list[ModelEntry] = []
    if not os.path.isdir(models_dir):
        log.info("MODELS_DIR %s does not exist; only the Hugging Face cache is scanned", models_dir)
        return entries
    for kind in KINDS:
        folder = os.path.join(models_dir, kind)
        if kind == "controlnet":
            known = set(controlnet_types())
            for sub in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if sub not in known:
                    log.warning("skipping %s: %r is not a ControlNet type (%s)", os.path.join(folder, sub), sub, ", ".join(sorted(known)))
                    continue
                for path, name in _items(os.path.join(folder, sub)):
                    e = _safe_entry(models_dir, kind, path, name, sub)
                    if e:
                        entries.append(e)
            continue
        for path, name in _items(folder):
            e = _safe_entry(models_dir, kind, path, name)
            if e:
                entries.append(e)
    return entries


def _safe_entry(models_dir: str, kind: str, path: str, name: str, controlnet_type: str | None = None) -> ModelEntry | None:
    try:
        return _entry(models_dir, kind, path, name, controlnet_type)
    except OSError as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


# -- Hugging Face cache ------------------------------------------------------------------------

_PIPELINE_KINDS = {"StableDiffusionXLPipeline": "base", "StableDiffusionXLImg2ImgPipeline": "refiner"}


def _controlnet_type_from_name(repo_id: str) -> str | None:
    lowered = repo_id.lower()
    for t in controlnet_types():
        if re.search(rf"(?:^|[^a-z]){t}(?:[^a-z]|$)", lowered):
            return t
    return None


def classify_snapshot(repo_id: str, folder: str) -> ModelEntry | None:
    """A cached repository snapshot as a ModelEntry (None when it is not an SDXL piece we use)."""
    index = _read_json(os.path.join(folder, "model_index.json"))
    if index is not None:
        kind = _PIPELINE_KINDS.get(index.get("_class_name", ""))
        if kind == "refiner" and index.get("text_encoder", [None])[0] is not None:
            kind = "base"  # an img2img pipeline with both encoders is a base model saved for img2img
        if kind is None:
            return None
        params, disk, variant = pipeline_stats(folder, [k for k in index if not k.startswith("_") and os.path.isdir(os.path.join(folder, k))])
        if kind == "refiner":
            params, _, _ = pipeline_stats(folder, ["unet"])
        return ModelEntry(repo_id, kind, folder, False, params, disk, variant=variant, source="hf_cache") if params else None
    config = _read_json(os.path.join(folder, "config.json"))
    if config is not None:
        cls = config.get("_class_name", "")
        archs = config.get("architectures") or []
        if cls == "AutoencoderKL":
            kind, cn_type = "vae", None
        elif cls == "ControlNetModel":
            kind, cn_type = "controlnet", _controlnet_type_from_name(repo_id)
            if cn_type is None:
                log.info("skipping cached ControlNet %s: its type is not in its name", repo_id)
                return None
        elif "StableDiffusionSafetyChecker" in archs:
            kind, cn_type = "safety_checker", None
        else:
            return None
        files, variant = folder_weights(folder)
        params, disk = _sum(files)
        return ModelEntry(repo_id, kind, folder, False, params, disk, controlnet_type=cn_type, variant=variant, source="hf_cache") if params else None
    lora = os.path.join(folder, "pytorch_lora_weights.safetensors")
    if os.path.isfile(lora):
        params, disk = file_params(lora)
        return ModelEntry(repo_id, "lora", folder, False, params, disk, source="hf_cache", extra={"weight_name": "pytorch_lora_weights.safetensors"})
    return None


def scan_hf_cache(cache_dir: str | None = None) -> list[ModelEntry]:
    """SDXL pieces in the local HF cache (HF_HUB_CACHE, or `cache_dir`)."""
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    except Exception as exc:  # a broken cache must not stop the worker
        log.warning("cannot scan the Hugging Face cache: %s", exc)
        return []
    entries = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        try:
            entry = classify_snapshot(repo.repo_id, str(revisions[0].snapshot_path))
        except OSError as exc:
            log.warning("skipping cached %s: %s", repo.repo_id, exc)
            continue
        if entry:
            entries.append(entry)
    return entries


def discover(models_dir: str, hf_cache: bool, hf_cache_dir: str | None = None) -> dict[str, ModelEntry]:
    """Every usable model by name; MODELS_DIR wins over the HF cache."""
    found: dict[str, ModelEntry] = {}
    for e in scan_models_dir(models_dir) + (scan_hf_cache(hf_cache_dir) if hf_cache else []):
        if e.name in found:
            log.info("%s: using %s, ignoring %s", e.name, found[e.name].path, e.path)
            continue
        found[e.name] = e
    return found

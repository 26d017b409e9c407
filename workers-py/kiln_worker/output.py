"""Output files: PNG, JPEG or WebP, with the generation's parameters embedded, byte-identical for
the same pixels and metadata (which is why no timing or timestamp is ever embedded).

- PNG: a `parameters` text chunk in the AUTOMATIC1111 layout (prompt, `Negative prompt:`, then
  one `Steps: …, Sampler: …` line) that image tools already read, and a `kiln` chunk with the
  full metadata as compact, key-sorted JSON.
- JPEG and WebP: the same JSON in EXIF UserComment (ASCII-escaped, so it is plain ASCII).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
from PIL import Image

from .png import encode_png, write_atomically
from .schedulers import display_name, scheduler_kwargs

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_ASCII_PREFIX = b"ASCII\0\0\0"  # EXIF 2.3 character-code prefix of UserComment
SEED_SPACE = 2**32  # seeds are 0..2**32 - 1, as the API accepts them


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request: seed + index, wrapping past 2**32 - 1 to 0, so every
    image's seed (the one it was made with and reported on its output) is one the API accepts."""
    return (seed + index) % SEED_SPACE


def metadata_json(metadata: dict) -> str:
    """The canonical JSON of the metadata: sorted keys, no spaces, ASCII only."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _fmt_number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def parameters_text(metadata: dict) -> str:
    """The AUTOMATIC1111 `parameters` text for the metadata from build_metadata."""
    sched = metadata.get("scheduler") or {}
    fields = [
        ("Steps", sched.get("steps")),
        ("Sampler", display_name(sched) if sched.get("type") else None),
        ("CFG scale", metadata.get("guidance_scale")),
        ("Seed", metadata.get("seed")),
        ("Size", "{width}x{height}".format(**metadata["size"]) if metadata.get("size") else None),
        ("Model", (metadata.get("models") or {}).get("base")),
        ("VAE", (metadata.get("models") or {}).get("vae")),
        ("Refiner", (metadata.get("models") or {}).get("refiner")),
        ("Refiner switch at", (metadata.get("refiner") or {}).get("denoising_switch")),
        ("Denoising strength", metadata.get("strength")),
        ("Lora", ", ".join(f"{l['name']}:{_fmt_number(l['weight'])}" for l in metadata.get("loras") or []) or None),
        ("ControlNet", ", ".join(f"{c['type']}:{c['model']}:{_fmt_number(c['conditioning_scale'])}" for c in metadata.get("controlnets") or []) or None),
        ("Upscale", "x{factor} {upscaler}".format(**metadata["upscale"]) if metadata.get("upscale") else None),
    ]
    line = ", ".join(f"{k}: {_fmt_value(v)}" for k, v in fields if v is not None)
    text = metadata.get("prompt", "")
    if metadata.get("negative_prompt"):
        text += f"\nNegative prompt: {metadata['negative_prompt']}"
    return f"{text}\n{line}"


def _fmt_value(v) -> str:
    s = _fmt_number(v)
    # A1111 quotes values that contain its separators
    return json.dumps(s, ensure_ascii=False) if ("," in s or ":" in s or "\n" in s) and not isinstance(v, (int, float)) else s


def exif_bytes(metadata: dict) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _ASCII_PREFIX + metadata_json(metadata).encode("ascii")
    return exif.tobytes()


def read_metadata(path: str) -> dict | None:
    """The embedded `kiln` metadata of a file written by save_image, or None."""
    with Image.open(path) as img:
        if img.format == "PNG":
            text = img.text.get("kiln") if hasattr(img, "text") else None
            return json.loads(text) if text else None
        raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(_ASCII_PREFIX):
        return json.loads(raw[len(_ASCII_PREFIX):].decode("ascii"))
    return None


def encode_image(img: Image.Image, fmt: str, quality: int = 90, metadata: dict | None = None) -> bytes:
    """The file bytes of `img` in `fmt`; deterministic for the same pixels, quality and metadata."""
    if fmt == "png":
        if img.mode not in ("RGB", "RGBA", "L"):
            img = img.convert("RGB")
        text = {"parameters": parameters_text(metadata), "kiln": metadata_json(metadata)} if metadata else None
        return encode_png(np.asarray(img), text)
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"unknown output format {fmt!r}")
    buf = io.BytesIO()
    options = {"quality": int(quality)}
    if metadata:
        options["exif"] = exif_bytes(metadata)
    if fmt == "jpeg":
        img.convert("RGB").save(buf, "JPEG", optimize=False, **options)
    else:
        img.convert("RGB").save(buf, "WEBP", method=4, **options)
    return buf.getvalue()


def save_image(img: Image.Image, path_without_ext: str, fmt: str, quality: int = 90, metadata: dict | None = None) -> tuple[str, str]:
    """Write `<path_without_ext>.<png|jpg|webp>` atomically; return (path, content_type)."""
    path = f"{path_without_ext}.{EXTENSIONS[fmt]}"
    write_atomically(path, encode_image(img, fmt, quality, metadata))
    return path, CONTENT_TYPES[fmt]


def file_digest(path: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a written output."""
    with open(path, "rb") as f:
        data = f.read()
    return hashlib.sha256(data).hexdigest(), len(data)


def build_metadata(
    request: dict,
    seed: int,
    models: dict | None = None,
    loras: list[dict] | None = None,
    *,
    controlnet_models: list[str] | None = None,
    upscale: dict | None = None,
) -> dict:
    """What is embedded in each file: everything that shaped its pixels, nothing that varies by run.

    `models` ({base, refiner, vae}) and `loras` ([{name, weight}]) default to the request's;
    `controlnet_models` gives the ControlNet model each spec resolved to (a spec may omit it);
    `upscale` is the Upscaled record ({factor, upscaler, kind}) when the image was upscaled.
    """
    hp = request["hyperparameters"]
    sched = request["scheduler"]
    models = models if models is not None else request["model"]
    loras = loras if loras is not None else request.get("loras") or []
    meta: dict = {
        "generator": "kiln",
        "prompt": request["conditioning"]["prompt"],
        "negative_prompt": request["conditioning"].get("negative_prompt", ""),
        "seed": seed,
        "scheduler": {"type": sched["type"], "steps": sched["steps"], **scheduler_kwargs(sched)},
        "guidance_scale": hp["guidance_scale"],
        "size": {"width": hp["width"], "height": hp["height"]},
        "models": {k: models[k] for k in ("base", "refiner", "vae") if models.get(k)},
        "loras": [{"name": l["name"], "weight": l["weight"]} for l in loras],
    }
    if request.get("refiner") and models.get("refiner"):
        ref = request["refiner"]
        meta["refiner"] = {"denoising_switch": ref["denoising_switch"], "steps": ref.get("steps", sched["steps"])}
    cns = request.get("controlnets") or []
    if cns:
        resolved = controlnet_models or [c.get("model") for c in cns]
        meta["controlnets"] = [
            {
                "type": c["type"],
                "model": resolved[i],
                "conditioning_scale": c["conditioning_scale"],
                "guidance_start": c["guidance_start"],
                "guidance_end": c["guidance_end"],
                "preprocess": c["preprocess"],
            }
            for i, c in enumerate(cns)
        ]
    image = request.get("image")
    if image:
        meta["strength"] = image["strength"]
        meta["inpaint"] = bool(image.get("mask"))
    perf = request.get("performance")
    if perf and perf.get("dtype", "fp16") != "fp16":
        meta["dtype"] = perf["dtype"]
    if upscale:
        meta["upscale"] = dict(upscale)
    return meta

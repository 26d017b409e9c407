"""Input images: the files the agent downloaded (the request names them by s3_key; `files` maps
each key to a local path). Every decode failure is the request's fault, reported as
invalid_request naming the field, never as a crash.

Images are resized to the generation size with LANCZOS, masks are binarised (white = repaint),
and a canny control map is computed with OpenCV when a ControlNet asks for preprocessing.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Mapping

import numpy as np
from PIL import Image, ImageOps

from .errors import invalid_request
from .tables import preprocessable

Size = tuple[int, int]  # (width, height)


def resolve_file(files: Mapping[str, str] | None, ref: dict, field: str) -> str:
    """The local path of an image reference `{s3_key}`; invalid_request when the agent gave none."""
    key = ref.get("s3_key")
    path = (files or {}).get(key) if isinstance(key, str) else None
    if not path:
        raise invalid_request(f"{field}.s3_key", f"no local file for {key!r} in the generate message's files")
    return path


def _open(path: str, field: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                probe.verify()  # catches truncated and corrupt files without decoding them all
            img = Image.open(path)
            img.load()
    except FileNotFoundError:
        raise invalid_request(field, f"the input file {path!r} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise invalid_request(field, f"not a decodable image ({exc.__class__.__name__}: {exc})") from None
    try:
        return ImageOps.exif_transpose(img)  # what the client sees is what we condition on
    except Exception:  # a broken orientation tag is not worth failing the request for
        return img


def load_image(path: str, size: Size | None = None, mode: str = "RGB", field: str = "image") -> Image.Image:
    """Decode, verify and convert `path`; resize to `size` (w, h) with LANCZOS when given."""
    img = _open(path, field)
    if img.mode != mode:
        if mode == "RGB" and (img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)):
            # composite on white so transparent areas do not turn black
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            img = img.convert(mode)
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.LANCZOS)
    return img


def load_mask(path: str, size: Size, field: str = "image.mask") -> Image.Image:
    """An L-mode mask of `size`: 255 where the image is repainted (white ≥ 128), 0 elsewhere."""
    mask = load_image(path, size, mode="L", field=field)
    return mask.point(lambda v: 255 if v >= 128 else 0)


INPAINT_FEATHER_PX = 8


def composite_unmasked(generated: np.ndarray, init: np.ndarray, mask: np.ndarray, feather_px: int = INPAINT_FEATHER_PX) -> np.ndarray:
    """Inpainting's paste-back: the source everywhere the (binarised) mask is black, the generated
    pixels inside it, blended over the first `feather_px` pixels inside the mask's edge.

    The blend weight of a masked pixel is min(1, d / feather_px), d its Euclidean distance to the
    nearest unmasked pixel (OpenCV's distance transform), so the edge has no seam while no pixel
    outside the mask changes: a model's VAE round trip would otherwise alter the whole image.
    Both backends composite with this function. `generated`, `init`: H×W×3 uint8; `mask`: H×W,
    ≥ 128 where the image is repainted.
    """
    import cv2

    inside = (np.asarray(mask) >= 128).astype(np.uint8)
    if feather_px <= 0:
        alpha = inside.astype(np.float32)
    else:
        alpha = np.minimum(cv2.distanceTransform(inside, cv2.DIST_L2, 3) / float(feather_px), 1.0).astype(np.float32)
    alpha = alpha[:, :, None]
    out = init.astype(np.float32) * (1.0 - alpha) + generated.astype(np.float32) * alpha
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    keep = inside == 0
    out[keep] = init[keep]  # exactly the source, whatever the float arithmetic did
    return out


def canny(img: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """The canny edge map of `img` as an RGB image (edges white), as SDXL canny ControlNets expect."""
    import cv2

    grey = np.asarray(img.convert("L"))
    edges = cv2.Canny(grey, low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def control_image(spec: dict, files: Mapping[str, str] | None, size: Size, field: str = "controlnets.0") -> Image.Image:
    """The control image of one ControlNet spec at `size`, preprocessed when it asks for it."""
    path = resolve_file(files, spec["image"], f"{field}.image")
    img = load_image(path, size, field=f"{field}.image")
    if spec.get("preprocess"):
        if spec["type"] != "canny":
            raise invalid_request(
                f"{field}.preprocess",
                f"the worker preprocesses {', '.join(preprocessable())} only; send an already processed {spec['type']} map",
            )
        img = canny(img)
    return img


def pixel_digest(img: Image.Image) -> str:
    """sha256 of the decoded pixels (mode and size included): the same picture in any file format agrees."""
    h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()

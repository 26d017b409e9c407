"""Live previews (`output.previews`): a small image of the first image's current estimate after
every n-th denoising step of each stage (base, refiner), sent as a `preview` frame right after
that step's progress frame. The agent passes them on to live followers; nothing stores them.

Previews must cost little and never break a generation: a backend offers a way to make the
image, called only when a preview is due; an error making or encoding one is logged (once per
request, to the request's log) and that preview skipped. The image is shrunk to `max_size` on
its long side (never enlarged) and encoded as WebP, at a lower quality if it would not fit the
protocol's bound (the contracts' PREVIEW_LIMITS.maxBytes, read from the generated schema).
"""

from __future__ import annotations

import base64
import io
import logging
import time
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

from .protocol import load_schema

log = logging.getLogger("kiln_worker.previews")

CONTENT_TYPE = "image/webp"
QUALITIES = (70, 50, 30)  # tried in turn until the preview fits the bound

ImageMaker = Callable[[], "Image.Image | np.ndarray"]


@lru_cache(maxsize=None)
def max_bytes() -> int:
    """The largest encoded preview the protocol carries (its base64 `data` bound, decoded)."""
    branch = next(b for b in load_schema("worker-to-agent")["oneOf"] if b["properties"]["type"].get("const") == "preview")
    return branch["properties"]["data"]["maxLength"] // 4 * 3


def to_image(pixels: "Image.Image | np.ndarray") -> Image.Image:
    """A PIL RGB image from one, or from an H×W×3 array (uint8, or floats in 0..1)."""
    if isinstance(pixels, Image.Image):
        return pixels.convert("RGB")
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def shrink(img: Image.Image, max_size: int) -> Image.Image:
    """`img` with its long side at most `max_size`, aspect kept; never enlarged."""
    w, h = img.size
    scale = max_size / max(w, h)
    if scale >= 1.0:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR, reducing_gap=2.0)


def encode(img: Image.Image, limit: int) -> bytes | None:
    """WebP bytes of `img` that fit `limit`, or None when even the lowest quality does not."""
    for quality in QUALITIES:
        buf = io.BytesIO()
        img.save(buf, "WEBP", quality=quality, method=0)  # method 0: the fastest encoder
        data = buf.getvalue()
        if len(data) <= limit:
            return data
    return None


class Previews:
    """The previews of one generate request. `offer()` is called after each denoising step."""

    def __init__(self, every_n_steps: int, max_size: int, send: Callable[[dict], None], log_cb: Callable[[str, str], None] | None = None):
        self.every = every_n_steps
        self.max_size = max_size
        self._send = send
        self._log_cb = log_cb or (lambda level, message: None)
        self.sent = 0
        self.skipped = 0
        self.spent_ms = 0.0  # making and encoding, what previews cost the generation

    @classmethod
    def of(cls, request: dict, send: Callable[[dict], None], log_cb: Callable[[str, str], None] | None = None) -> "Previews | None":
        """The request's previews, or None when it asks for none."""
        spec = (request.get("output") or {}).get("previews")
        if not spec:
            return None
        return cls(int(spec["every_n_steps"]), int(spec.get("max_size", 256)), send, log_cb)

    def due(self, step: int) -> bool:
        return step >= 1 and step % self.every == 0

    def offer(self, stage: str, step: int, total: int, make: ImageMaker) -> None:
        """Sends a preview of `make()` if one is due at this step; never raises."""
        if not self.due(step):
            return
        started = time.perf_counter()
        try:
            img = shrink(to_image(make()), self.max_size)
            data = encode(img, max_bytes())
            if data is None:
                raise ValueError(f"a {img.width}×{img.height} preview does not fit in {max_bytes()} bytes")
            frame = {"type": "preview", "stage": stage, "step": step, "total": total, "width": img.width, "height": img.height,
                     "content_type": CONTENT_TYPE, "data": base64.b64encode(data).decode("ascii")}
        except Exception as exc:  # a preview is never worth a failed generation
            self.skipped += 1
            log.warning("preview at %s step %d skipped: %s", stage, step, exc, exc_info=self.skipped == 1)
            if self.skipped == 1:
                self._log_cb("warning", f"preview at {stage} step {step} skipped ({type(exc).__name__}: {exc}); later failures are not reported")
            return
        finally:
            self.spent_ms += (time.perf_counter() - started) * 1000.0
        self._send(frame)
        self.sent += 1

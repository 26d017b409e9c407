"""Upscaling after generation: a super-resolution model through spandrel when one is named and
loadable (spandrel is optional, part of the GPU setup only), else LANCZOS resampling.

Every result says what ran: {"factor", "upscaler", "kind": "model" | "resample"}.
"""

from __future__ import annotations

from typing import Any, Mapping

from PIL import Image, ImageFilter

from .torch_compat import ensure_torchvision_importable

LANCZOS = "lanczos"


def lanczos(img: Image.Image, factor: int) -> Image.Image:
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.LANCZOS)


def simulated_model(img: Image.Image, factor: int) -> Image.Image:
    """What the synthetic backend does for a model upscaler: LANCZOS, a fixed unsharp mask and a
    faint fixed texture (the "detail" a super-resolution model adds), so the pixels are
    deterministic and always differ from plain resampling."""
    import numpy as np

    sharp = lanczos(img, factor).filter(ImageFilter.UnsharpMask(radius=2, percent=120, threshold=0))
    arr = np.asarray(sharp.convert("RGB"), dtype=np.int16)
    yy, xx = np.mgrid[0 : arr.shape[0], 0 : arr.shape[1]]
    texture = ((xx + 2 * yy) % 3 - 1).astype(np.int16)[:, :, None]  # -1, 0, +1
    return Image.fromarray(np.clip(arr + texture, 0, 255).astype(np.uint8))


def spandrel_available() -> bool:
    try:
        ensure_torchvision_importable()  # spandrel imports torchvision
        import spandrel  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(path: str) -> Any:
    """A spandrel ImageModelDescriptor for the weights at `path` (eval mode, on CPU)."""
    import spandrel

    return spandrel.ModelLoader().load_from_file(path).eval()


def _run_model(descriptor: Any, img: Image.Image, factor: int) -> Image.Image:
    import numpy as np
    import torch

    param = next(descriptor.model.parameters())
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        y = descriptor(x.to(device=param.device, dtype=param.dtype))
    out = (y[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255.0 + 0.5).astype("uint8")
    result = Image.fromarray(out)
    target = (img.width * factor, img.height * factor)
    # a ×4 model serves a ×2 request: run it, then resample down to the size asked for
    return result if result.size == target else result.resize(target, Image.Resampling.LANCZOS)


def upscale(img: Image.Image, factor: int, upscaler: str | None, models: Mapping[str, Any] | None = None) -> tuple[Image.Image, dict]:
    """Upscale `img` by `factor`.

    `models` maps upscaler names to a weights path or an already loaded spandrel descriptor;
    when `upscaler` is among them and spandrel is importable, the model runs, otherwise LANCZOS.
    """
    entry = (models or {}).get(upscaler) if upscaler and upscaler != LANCZOS else None
    if entry is not None and spandrel_available():
        descriptor = load_model(entry) if isinstance(entry, str) else entry
        return _run_model(descriptor, img, factor), {"factor": factor, "upscaler": upscaler, "kind": "model"}
    return lanczos(img, factor), {"factor": factor, "upscaler": LANCZOS, "kind": "resample"}

"""Previews (kiln_worker/previews.py): due steps, size, the protocol's byte bound, and that a
preview that cannot be made is skipped and reported once, never raised into the generation."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from kiln_worker.previews import Previews, encode, max_bytes, shrink
from kiln_worker.protocol import validation_problems


def collect(every: int = 2, max_size: int = 64):
    frames, logs = [], []
    p = Previews(every, max_size, frames.append, lambda level, message: logs.append((level, message)))
    return p, frames, logs


def test_none_unless_the_request_asks():
    assert Previews.of({"output": {"format": "png"}}, lambda f: None) is None
    p = Previews.of({"output": {"previews": {"every_n_steps": 3, "max_size": 100}}}, lambda f: None)
    assert (p.every, p.max_size) == (3, 100)


def test_a_preview_every_nth_step_shrunk_to_max_size_and_valid_on_the_wire():
    p, frames, _ = collect(every=2, max_size=64)
    made = []
    for step in range(1, 6):
        p.offer("base", step, 5, lambda: made.append(step) or np.full((96, 128, 3), 0.5, np.float32))
    assert made == [2, 4]  # the image is only made when a preview is due
    assert [(f["stage"], f["step"], f["total"], f["width"], f["height"]) for f in frames] == [("base", 2, 5, 64, 48), ("base", 4, 5, 64, 48)]
    for f in frames:
        assert not validation_problems("worker-to-agent", {"v": 1, "id": "gen-1", **f})
        img = Image.open(io.BytesIO(base64.b64decode(f["data"])))
        assert img.format == "WEBP" and img.size == (64, 48)
    assert p.sent == 2 and p.skipped == 0 and p.spent_ms > 0


def test_never_enlarged():
    assert shrink(Image.new("RGB", (40, 20)), 256).size == (40, 20)
    assert shrink(Image.new("RGB", (1024, 512)), 256).size == (256, 128)


def test_a_preview_that_cannot_be_made_is_skipped_and_reported_once():
    p, frames, logs = collect(every=1)

    def broken():
        raise RuntimeError("latents on a lost device")

    for step in (1, 2, 3):
        p.offer("refiner", step, 3, broken)  # never raises
    p.offer("refiner", 3, 3, lambda: Image.new("RGB", (32, 32), "red"))
    assert p.skipped == 3 and len(frames) == 1
    assert logs == [("warning", "preview at refiner step 1 skipped (RuntimeError: latents on a lost device); later failures are not reported")]


def test_noise_that_does_not_fit_the_bound_at_any_quality_is_refused():
    noise = Image.fromarray((np.random.RandomState(0).rand(512, 512, 3) * 255).astype(np.uint8))
    data = encode(noise, max_bytes())
    assert data is None or len(data) <= max_bytes()
    assert encode(noise, 1000) is None
    assert len(encode(Image.new("RGB", (512, 512), "gray"), max_bytes())) < 2000

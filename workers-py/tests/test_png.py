import hashlib
import os
import time

import numpy as np
import pytest

from kiln_worker import png
from pngdecode import chunks, decode


def test_round_trips_rgb_pixels_exactly():
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    data = png.encode_png(pixels)
    assert data.startswith(png.SIGNATURE)
    assert [kind for kind, _ in chunks(data)] == [b"IHDR", b"IDAT", b"IEND"]
    assert np.array_equal(decode(data), pixels)


@pytest.mark.parametrize("shape", [(5, 9), (5, 9, 1), (4, 6, 4)])
def test_round_trips_grey_and_rgba(shape):
    pixels = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = decode(png.encode_png(pixels))
    assert np.array_equal(decoded.reshape(pixels.shape), pixels)


def test_same_pixels_give_identical_bytes():
    pixels = np.random.default_rng(3).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    assert png.encode_png(pixels) == png.encode_png(pixels.copy())


def test_ihdr_reports_width_then_height():
    data = png.encode_png(np.zeros((24, 40, 3), dtype=np.uint8))
    assert png.read_png_size(data) == (40, 24)
    with pytest.raises(ValueError):
        png.read_png_size(b"GIF89a" + b"\0" * 30)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((0, 4, 3), dtype=np.uint8)])
def test_rejects_what_it_cannot_encode(bad):
    with pytest.raises(ValueError):
        png.encode_png(bad)


def test_write_png_is_atomic_and_returns_the_file_bytes(tmp_path):
    pixels = np.full((8, 8, 3), 200, dtype=np.uint8)
    path = tmp_path / "0.png"
    data = png.write_png(str(path), pixels)
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["0.png"], "no temp file left behind"


def test_encodes_a_1024_square_quickly():
    from kiln_worker.backends.synthetic import render_image

    request = {
        "model": {"base": "m"}, "scheduler": {"type": "DDIMScheduler", "steps": 30},
        "hyperparameters": {"guidance_scale": 5, "seed": 1, "width": 1024, "height": 1024, "num_images": 1},
        "conditioning": {"prompt": "speed"},
    }
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data = png.encode_png(render_image(request, 1))
        best = min(best, time.perf_counter() - start)
    assert png.read_png_size(data) == (1024, 1024)
    # the brief is "well under 100 ms"; the bound is loose so a busy CI box does not flake
    assert best < 0.25, f"render + encode of 1024×1024 took {best * 1000:.0f} ms"
    assert len(data) < 3 * 1024 * 1024 // 4, "a smooth image should compress to well under its raw size"
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(png.encode_png(render_image(request, 1))).hexdigest()

"""Upscaling with a real ESRGAN-family network through spandrel: a tiny randomly initialised
Real-ESRGAN RRDBNet saved as safetensors with Real-ESRGAN's own key names (built in the test, no
download). Skipped where the diffusers extras (which bring spandrel) are not installed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import import_diffusers_or_skip

import_diffusers_or_skip()

from diffusers_support.tiny_sdxl import build_tiny_esrgan  # noqa: E402
from kiln_worker.upscale import lanczos, load_model, spandrel_available, upscale  # noqa: E402


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    return build_tiny_esrgan(tmp_path_factory.mktemp("esrgan"))


@pytest.fixture(scope="module")
def picture():
    rng = np.random.RandomState(3)
    return Image.fromarray((rng.rand(24, 20, 3) * 255).astype("uint8"))


def test_spandrel_recognises_the_file_as_a_4x_esrgan(esrgan):
    assert spandrel_available()
    descriptor = load_model(esrgan)
    assert descriptor.architecture.id == "ESRGAN" and descriptor.scale == 4
    assert descriptor.input_channels == 3 and descriptor.output_channels == 3


def test_the_model_upscales_by_4_and_differs_from_lanczos(esrgan, picture):
    out, info = upscale(picture, 4, "tiny-esrgan-x4", {"tiny-esrgan-x4": esrgan})
    assert info == {"factor": 4, "upscaler": "tiny-esrgan-x4", "kind": "model"}
    assert out.size == (80, 96) and out.mode == "RGB"
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(lanczos(picture, 4), dtype=np.int16)).mean() > 5
    again, _ = upscale(picture, 4, "tiny-esrgan-x4", {"tiny-esrgan-x4": load_model(esrgan)})  # a loaded descriptor works too
    assert np.array_equal(np.asarray(again), np.asarray(out))


def test_a_4x_model_serves_a_2x_request_and_unknown_names_resample(esrgan, picture):
    out, info = upscale(picture, 2, "tiny-esrgan-x4", {"tiny-esrgan-x4": esrgan})
    assert out.size == (40, 48) and info["kind"] == "model"
    out, info = upscale(picture, 2, "nobody-x2", {"tiny-esrgan-x4": esrgan})
    assert out.size == (40, 48) and info == {"factor": 2, "upscaler": "lanczos", "kind": "resample"}
    assert os.path.getsize(esrgan) < 2 * 2**20

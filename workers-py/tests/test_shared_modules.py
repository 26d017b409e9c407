"""The modules both backends share: tables, schedulers, images, output files, upscale, safety,
request checks."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from kiln_worker import images, output, safety, schedulers, tables, upscale, validation
from kiln_worker.errors import WorkerError
from conftest import generate_message


def _request(**overrides) -> dict:
    return generate_message("g", "/tmp/x", **overrides)["request"]


def _write(tmp_path, name, img: Image.Image, fmt="PNG") -> str:
    path = str(tmp_path / name)
    img.save(path, fmt)
    return path


def _gradient(w=96, h=64) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 255 // w), (y * 255 // h), (x * 0 + 40)], axis=-1).astype(np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = 255  # a white block: edges for canny
    return Image.fromarray(arr)


# -- tables and schedulers --------------------------------------------------------------------

def test_tables_come_from_the_generated_file():
    assert "EulerDiscreteScheduler" in tables.schedulers()
    assert tables.scheduler_aliases()["DPM++ 2M Karras"] == {"type": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert tables.controlnet_types() == ["canny", "depth", "openpose", "lineart", "scribble", "normal", "seg"]
    assert tables.preprocessable() == ["canny"]


@pytest.mark.parametrize("spec, field", [
    ({"type": "DDIMScheduler", "steps": 5, "use_karras_sigmas": True}, "scheduler.use_karras_sigmas"),
    ({"type": "EulerDiscreteScheduler", "steps": 5, "algorithm_type": "dpmsolver++"}, "scheduler.algorithm_type"),
    ({"type": "DPMSolverSinglestepScheduler", "steps": 5, "algorithm_type": "sde-dpmsolver"}, "scheduler.algorithm_type"),
    ({"type": "DPMSolverSinglestepScheduler", "steps": 5, "timestep_spacing": "trailing"}, "scheduler.timestep_spacing"),
    ({"type": "HeunDiscreteScheduler", "steps": 5, "solver_order": 2}, "scheduler.solver_order"),
    ({"type": "NoSuchScheduler", "steps": 5}, "scheduler.type"),
])
def test_scheduler_options_the_table_rules_out_are_invalid(spec, field):
    with pytest.raises(WorkerError) as info:
        schedulers.validate_scheduler(spec)
    assert info.value.code == "invalid_request" and info.value.message.startswith(field + ":")


def test_scheduler_kwargs_are_only_the_options_given():
    spec = {"type": "DPMSolverMultistepScheduler", "steps": 30, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}
    schedulers.validate_scheduler(spec)
    assert schedulers.scheduler_kwargs(spec) == {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}
    assert schedulers.scheduler_kwargs({"type": "DDIMScheduler", "steps": 3}) == {}
    assert schedulers.display_name(spec) == "DPM++ 2M SDE Karras"
    assert schedulers.display_name({"type": "EulerAncestralDiscreteScheduler", "steps": 3}) == "Euler a"


# -- images -----------------------------------------------------------------------------------

def test_load_image_resizes_with_lanczos_and_converts(tmp_path):
    src = _gradient(96, 64)
    path = _write(tmp_path, "a.png", src.convert("RGBA"))
    img = images.load_image(path, (48, 32))
    assert img.mode == "RGB" and img.size == (48, 32)
    assert np.array_equal(np.asarray(img), np.asarray(src.resize((48, 32), Image.Resampling.LANCZOS)))


def test_corrupt_and_missing_images_are_invalid_requests_naming_the_field(tmp_path):
    good = _write(tmp_path, "a.png", _gradient())
    data = open(good, "rb").read()
    truncated = tmp_path / "t.png"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "g.jpg"
    garbage.write_bytes(b"definitely not an image")
    for path in (str(truncated), str(garbage), str(tmp_path / "missing.png")):
        with pytest.raises(WorkerError) as info:
            images.load_image(path, field="image.init")
        assert info.value.code == "invalid_request" and info.value.message.startswith("image.init:"), info.value
    with pytest.raises(WorkerError) as info:
        images.resolve_file({}, {"s3_key": "in/a.png"}, "image.init")
    assert info.value.code == "invalid_request" and "image.init.s3_key" in info.value.message


def test_mask_is_binary_at_the_requested_size(tmp_path):
    grey = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (10, 1)))
    mask = images.load_mask(_write(tmp_path, "m.png", grey), (256, 10))
    arr = np.asarray(mask)
    assert mask.mode == "L" and mask.size == (256, 10)
    assert set(np.unique(arr)) == {0, 255}
    assert (arr[:, :128] == 0).all() and (arr[:, 128:] == 255).all()


def test_canny_matches_opencv_and_control_image_preprocesses(tmp_path):
    src = _gradient(96, 64)
    edges = images.canny(src)
    expected = cv2.Canny(np.asarray(src.convert("L")), 100, 200)
    assert edges.mode == "RGB" and np.array_equal(np.asarray(edges)[:, :, 0], expected)
    assert expected.any() and set(np.unique(expected)) <= {0, 255}
    files = {"cn/a.png": _write(tmp_path, "c.png", src)}
    spec = {"type": "canny", "image": {"s3_key": "cn/a.png"}, "preprocess": True}
    assert np.array_equal(np.asarray(images.control_image(spec, files, (96, 64))), np.asarray(edges))
    plain = images.control_image({**spec, "preprocess": False}, files, (96, 64))
    assert np.array_equal(np.asarray(plain), np.asarray(src))


# -- output files -----------------------------------------------------------------------------

def test_png_carries_parameters_and_kiln_chunks_and_is_deterministic(tmp_path):
    req = _request(prompt="a café at night", scheduler={"type": "DPMSolverMultistepScheduler", "steps": 20, "use_karras_sigmas": True},
                   loras=[{"name": "kiln/lora-pixel-art", "weight": 0.5}])
    meta = output.build_metadata(req, 7)
    img = _gradient()
    path, ctype = output.save_image(img, str(tmp_path / "0"), "png", 90, meta)
    assert path.endswith("/0.png") and ctype == "image/png"
    again, _ = output.save_image(img, str(tmp_path / "1"), "png", 90, meta)
    assert open(path, "rb").read() == open(again, "rb").read()
    with Image.open(path) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(img))
        params = decoded.text["parameters"]
        assert json.loads(decoded.text["kiln"]) == meta
    assert params.startswith("a café at night\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 7, Size: 256x256")
    assert "kiln/lora-pixel-art:0.5" in params
    assert output.read_metadata(path) == meta
    assert "timings" not in meta


@pytest.mark.parametrize("fmt, ctype", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_jpeg_and_webp_carry_the_metadata_in_exif(tmp_path, fmt, ctype):
    meta = output.build_metadata(_request(), 3)
    path, got = output.save_image(_gradient(), str(tmp_path / "0"), fmt, 80, meta)
    assert got == ctype
    with Image.open(path) as decoded:
        assert decoded.format == fmt.upper() and decoded.size == (96, 64)
    assert output.read_metadata(path) == meta
    again, _ = output.save_image(_gradient(), str(tmp_path / "1"), fmt, 80, meta)
    assert open(path, "rb").read() == open(again, "rb").read()
    lower, _ = output.save_image(_gradient(), str(tmp_path / "2"), fmt, 30, meta)
    assert open(path, "rb").read() != open(lower, "rb").read()


def test_metadata_names_everything_that_shaped_the_image():
    req = _request(model={"base": "b", "refiner": "r", "vae": "v"}, refiner={"denoising_switch": 0.7, "steps": 9},
                   postprocess={"upscale": {"factor": 2}, "safety_check": False})
    meta = output.build_metadata(req, 11, upscale={"factor": 2, "upscaler": "lanczos", "kind": "resample"})
    assert meta["models"] == {"base": "b", "refiner": "r", "vae": "v"}
    assert meta["refiner"] == {"denoising_switch": 0.7, "steps": 9}
    assert meta["scheduler"] == {"type": "EulerDiscreteScheduler", "steps": 4}
    assert meta["size"] == {"width": 256, "height": 256} and meta["seed"] == 11
    assert meta["upscale"]["upscaler"] == "lanczos"


# -- upscale and safety -----------------------------------------------------------------------

def test_upscale_without_a_model_is_lanczos():
    img, info = upscale.upscale(_gradient(), 2, None)
    assert img.size == (192, 128) and info == {"factor": 2, "upscaler": "lanczos", "kind": "resample"}
    img, info = upscale.upscale(_gradient(), 4, "ai-forever/Real-ESRGAN-x4", {})
    assert img.size == (384, 256) and info["kind"] == "resample"
    sim = upscale.simulated_model(_gradient(), 2)
    assert sim.size == (192, 128) and not np.array_equal(np.asarray(sim), np.asarray(upscale.lanczos(_gradient(), 2)))


def test_synthetic_safety_checker_flags_the_marker_word():
    checker = safety.SyntheticSafetyChecker("nsfw-test")
    assert checker.check("a cat, NSFW-TEST please") == {"checked": True, "nsfw": True, "checker": "synthetic"}
    assert checker.check("a cat") == {"checked": True, "nsfw": False, "checker": "synthetic"}


# -- request checks ---------------------------------------------------------------------------

def test_stage_steps_follow_diffusers():
    assert validation.stage_steps(_request(steps=30)) == {"base": 30, "refiner": 0}
    ref = _request(steps=30, model={"base": "b", "refiner": "r"}, refiner={"denoising_switch": 0.8})
    assert validation.stage_steps(ref) == {"base": 24, "refiner": 30}
    ref["refiner"]["steps"] = 10
    assert validation.stage_steps(ref) == {"base": 24, "refiner": 10}
    img = _request(steps=30, image={"init": {"s3_key": "a.png"}, "strength": 0.3})
    assert validation.stage_steps(img) == {"base": 9, "refiner": 0}


@pytest.mark.parametrize("overrides, field", [
    ({"refiner": {"denoising_switch": 0.8}}, "refiner"),
    ({"model": {"base": "b", "refiner": "r"}, "image": {"init": {"s3_key": "a.png"}, "strength": 0.5}}, "model.refiner"),
    ({"loras": [{"name": "x", "weight": 1}, {"name": "x", "weight": 0.5}]}, "loras"),
    ({"controlnets": [{"type": "canny", "image": {"s3_key": "a.png"}, "conditioning_scale": 1, "guidance_start": 0.5,
                       "guidance_end": 0.5, "preprocess": False}]}, "controlnets.0.guidance_end"),
    ({"controlnets": [{"type": "depth", "image": {"s3_key": "a.png"}, "conditioning_scale": 1, "guidance_start": 0,
                       "guidance_end": 1, "preprocess": True}]}, "controlnets.0.preprocess"),
    ({"steps": 2, "image": {"init": {"s3_key": "a.png"}, "strength": 0.3}}, "image.strength"),
    ({"scheduler": {"type": "DDIMScheduler", "steps": 4, "use_karras_sigmas": True}}, "scheduler.use_karras_sigmas"),
])
def test_check_request_rejects_what_the_contracts_forbid(overrides, field):
    with pytest.raises(WorkerError) as info:
        validation.check_request(_request(**overrides), "/tmp/x")
    assert info.value.code == "invalid_request" and info.value.message.startswith(field + ":"), info.value.message


def test_check_capabilities_names_the_unsupported_option():
    caps = {"features": ["lora"], "dtypes": ["fp16", "fp32"], "performance": ["attention_slicing"]}
    perf = {"dtype": "bf16", "attention_slicing": False, "vae_slicing": False, "vae_tiling": False,
            "cpu_offload": "none", "channels_last": False, "compile": False}
    with pytest.raises(WorkerError, match=r"^performance\.dtype: bf16"):
        validation.check_capabilities(_request(performance=perf), caps)
    with pytest.raises(WorkerError, match=r"^performance\.cpu_offload:"):
        validation.check_capabilities(_request(performance={**perf, "dtype": "fp16", "cpu_offload": "model"}), caps)
    with pytest.raises(WorkerError, match=r"^model\.vae:"):
        validation.check_capabilities(_request(model={"base": "b", "vae": "v"}), caps)
    validation.check_capabilities(_request(performance={**perf, "dtype": "fp32", "attention_slicing": True}), caps)

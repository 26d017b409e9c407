"""The synthetic backend in-process: residency, eviction, errors, determinism."""

import sys
import threading

import numpy as np
import pytest

from kiln_worker.backends import BackendUnavailable, load_backend
from kiln_worker.backends.synthetic import activation_mb, render_image
from kiln_worker.config import Config, ModelSpec
from kiln_worker.errors import WorkerError
from conftest import generate_message

MODELS = (
    ModelSpec("m/a", "base", 1000, 1.0),
    ModelSpec("m/b", "base", 1000, 1.0),
    ModelSpec("m/c", "base", 1000, 1.0),
    ModelSpec("m/refiner", "refiner", 500, 0.5),
)


def backend(vram_mb=2500, ram_mb=65536, **kw):
    config = Config(synthetic_step_ms=0, synthetic_load_ms_per_gb=0, synthetic_vram_mb=vram_mb, synthetic_ram_mb=ram_mb, synthetic_models=MODELS, **kw)
    return load_backend("synthetic", config)


def run(b, model, tmp_path, cancel=None, progress=None, **kw):
    kw.setdefault("width", 64)
    kw.setdefault("height", 64)
    request = generate_message("g", str(tmp_path), model=model, **kw)["request"]
    return b.generate(request, str(tmp_path), progress or (lambda *a: None), cancel or threading.Event())


def test_load_ms_is_disk_size_times_cost_per_gb():
    b = load_backend("synthetic", Config(synthetic_load_ms_per_gb=400))
    models = {m["name"]: m for m in b.capabilities()["models"]}
    assert models["stabilityai/stable-diffusion-xl-base-1.0"] == {
        "name": "stabilityai/stable-diffusion-xl-base-1.0", "kind": "base", "vram_mb": 7000, "load_ms": 2760}
    assert models["madebyollin/sdxl-vae-fp16-fix"]["kind"] == "vae"


def test_lru_eviction_keeps_the_most_recently_used(tmp_path):
    b = backend()
    assert run(b, "m/a", tmp_path).loaded_models == ["m/a"]
    assert run(b, "m/b", tmp_path).loaded_models == ["m/b"]
    assert run(b, "m/a", tmp_path).loaded_models == []  # a is now the most recently used
    assert run(b, "m/c", tmp_path).loaded_models == ["m/c"]  # evicts b, not a
    state = b.state()
    assert [(r["name"], r["location"]) for r in state["resident"]] == [("m/b", "ram"), ("m/a", "vram"), ("m/c", "vram")]
    assert state["vram_used_mb"] == 2000  # b is warm in host RAM, not counted in VRAM
    assert all(r["last_used_at"].endswith("Z") and r["pinned"] is False for r in state["resident"])
    assert run(b, "m/b", tmp_path).loaded_models == ["m/b"]  # back from RAM (evicts a, the least recent)
    assert [(r["name"], r["location"]) for r in b.state()["resident"]] == [("m/a", "ram"), ("m/c", "vram"), ("m/b", "vram")]


def test_eviction_drops_models_when_host_ram_is_full(tmp_path):
    b = backend(ram_mb=0)
    for name in ("m/a", "m/b", "m/c"):
        run(b, name, tmp_path)
    assert [(r["name"], r["location"]) for r in b.state()["resident"]] == [("m/b", "vram"), ("m/c", "vram")]


def test_activation_memory_can_force_eviction_and_oom():
    assert activation_mb(1024, 1024, 1) == 1200
    assert activation_mb(1024, 1024, 2) == 2400
    assert activation_mb(512, 512, 1) == 300


def test_activations_too_big_for_the_gpu_are_out_of_memory(tmp_path):
    b = backend(vram_mb=2000)
    with pytest.raises(WorkerError) as info:
        run(b, "m/a", tmp_path, width=1024, height=1024, num_images=1)  # 1000 + 1200 > 2000
    assert info.value.code == "out_of_memory" and info.value.retryable
    assert b.state()["resident"] == []


def test_model_bigger_than_the_gpu_is_out_of_memory(tmp_path):
    b = backend(vram_mb=900)
    with pytest.raises(WorkerError) as info:
        run(b, "m/a", tmp_path)
    assert info.value.code == "out_of_memory"
    assert "1000 MB" in info.value.message and "900 MB" in info.value.message


def test_unknown_model_and_wrong_kind(tmp_path):
    b = backend()
    with pytest.raises(WorkerError) as info:
        run(b, "m/nope", tmp_path)
    assert (info.value.code, info.value.retryable) == ("model_not_found", False)
    with pytest.raises(WorkerError) as info:
        run(b, "m/refiner", tmp_path)
    assert info.value.code == "invalid_request" and "refiner" in info.value.message


def test_cancel_before_first_step_writes_nothing(tmp_path):
    b = backend()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(WorkerError) as info:
        run(b, "m/a", tmp_path, cancel=cancel)
    assert info.value.code == "canceled"
    assert not list(tmp_path.glob("*.png"))


def test_what_the_schema_cannot_check(tmp_path):
    b = backend()
    with pytest.raises(WorkerError, match="job_dir"):
        b.generate(generate_message("g", "rel")["request"], "relative/dir", lambda *a: None, threading.Event())
    with pytest.raises(WorkerError, match="prompt"):
        run(b, "m/a", tmp_path, prompt="   ")


def test_progress_reports_every_step(tmp_path):
    seen = []
    run(backend(), "m/a", tmp_path, steps=5, progress=lambda *a: seen.append(a))
    assert seen == [("loading_model", 0, 1), ("loading_model", 1, 1)] + [("base", i, 5) for i in range(1, 6)]


def test_images_depend_on_every_input_that_shapes_them():
    base = generate_message("g", "/tmp", width=96, height=64)["request"]
    image = render_image(base, 1)
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render_image(base, 1))
    variants = [render_image(base, 2)]
    for path, value in [(("conditioning", "prompt"), "other"), (("conditioning", "negative_prompt"), "other"),
                        (("scheduler", "type"), "DDIMScheduler"), (("scheduler", "steps"), 5),
                        (("hyperparameters", "guidance_scale"), 7.5), (("model", "base"), "other/model")]:
        changed = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        changed[path[0]][path[1]] = value
        variants.append(render_image(changed, 1))
    for other in variants:
        assert not np.array_equal(image, other)


def test_diffusers_without_its_libraries_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed, wherever it is
    with pytest.raises(BackendUnavailable, match="diffusers"):
        load_backend("diffusers")

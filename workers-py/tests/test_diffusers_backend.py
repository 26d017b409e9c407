"""The diffusers backend on a tiny random SDXL suite (base, refiner, a LoRA, canny and depth
ControlNets) staged in a MODELS_DIR built by the test, fully offline, on CPU.

Driven directly (DiffusersBackend.generate) and through a real `python -m kiln_worker` process
with KILN_BACKEND=diffusers, the way a gpu-agent does. Skipped where diffusers is not installed.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

import pytest

from conftest import import_diffusers_or_skip  # noqa: E402

import_diffusers_or_skip()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kiln_worker.backends.diffusers_backend import DiffusersBackend  # noqa: E402
from kiln_worker.backends.diffusers_parts.settings import DiffusersSettings  # noqa: E402
from kiln_worker.errors import WorkerError  # noqa: E402
from kiln_worker.output import read_metadata  # noqa: E402
from kiln_worker.tables import scheduler_aliases, schedulers  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import generate_message  # noqa: E402
from diffusers_support.tiny_sdxl import build_tiny_controlnet, build_tiny_lora, build_tiny_refiner, build_tiny_sdxl  # noqa: E402

BASE = "kiln/tiny-sdxl"
REFINER = "kiln/tiny-refiner"
LORA = "tiny-style"
SIDE = 64


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    stage, models = root / "stage", root / "models"
    for sub in ("base", "refiner", "lora", "controlnet/canny", "controlnet/depth"):
        (models / sub).mkdir(parents=True)
    base = str(models / "base" / "kiln--tiny-sdxl")
    shutil.move(build_tiny_sdxl(stage), base)
    shutil.move(build_tiny_refiner(stage), models / "refiner" / "kiln--tiny-refiner")
    shutil.move(build_tiny_lora(stage, base), models / "lora" / f"{LORA}.safetensors")
    shutil.move(build_tiny_controlnet(stage, base, seed=0), models / "controlnet" / "canny" / "tiny-canny")
    shutil.move(build_tiny_controlnet(stage, base, seed=1), models / "controlnet" / "depth" / "tiny-depth")
    return str(models)


@pytest.fixture(scope="module")
def backend(models_dir):
    return DiffusersBackend(settings=DiffusersSettings(models_dir=models_dir, scan_hf_cache=False))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input images as the agent stages them: files named by s3_key."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(96, 80, 3) * 255).astype("uint8")).save(d / "init.png")  # resized to 64×64
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(d / "mask.png")
    edges = Image.new("RGB", (SIDE, SIDE), "black")
    edges.paste((255, 255, 255), (8, 8, 56, 24))
    edges.save(d / "shapes.png")
    Image.fromarray(np.tile(np.linspace(0, 255, SIDE, dtype="uint8"), (SIDE, 1))).convert("RGB").save(d / "depth.png")
    return {k: str(d / f"{k}.png") for k in ("init", "mask", "shapes", "depth")}


def request(**overrides) -> dict:
    model = overrides.pop("model", BASE)
    msg = generate_message("r", "/tmp/unused", model=model, steps=2, width=SIDE, height=SIDE, seed=42, **overrides)
    return msg["request"]


class Run:
    def __init__(self, backend, req, job_dir, files=None, cancel_at=None):
        self.progress: list[tuple[str, int, int]] = []
        self.cancel = threading.Event()

        def on_progress(stage, step, total):
            self.progress.append((stage, step, total))
            if cancel_at and (stage, step) == cancel_at:
                self.cancel.set()

        self.result = backend.generate(req, str(job_dir), on_progress, self.cancel, None, files=files or {})

    def pixels(self, i=0) -> np.ndarray:
        return np.asarray(Image.open(self.result.outputs[i]["path"]).convert("RGB"), dtype=np.int16)


def run(backend, req, job_dir, **kw) -> Run:
    return Run(backend, req, job_dir, **kw)


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape != b.shape or int(np.abs(a - b).max()) > 2


# -- capabilities ------------------------------------------------------------------------------


def test_capabilities_list_the_staged_models_and_only_possible_features(backend):
    caps = backend.capabilities()
    models = {m["name"]: m for m in caps["models"]}
    assert {n: m["kind"] for n, m in models.items()} == {
        BASE: "base", REFINER: "refiner", LORA: "lora", "tiny-canny": "controlnet", "tiny-depth": "controlnet"}
    assert models["tiny-canny"]["controlnet_type"] == "canny" and models["tiny-depth"]["controlnet_type"] == "depth"
    assert all(m["vram_mb"] >= 1 and m["load_ms"] >= 1 for m in models.values())
    assert caps["features"] == ["refiner", "lora", "controlnet", "img2img", "inpaint", "upscale", "metadata", "training"]
    assert caps["controlnet_types"] == ["canny", "depth"] and caps["controlnet_preprocessors"] == ["canny"]
    assert caps["dtypes"] == ["fp32"]  # CPU: no fp16, no bf16
    assert caps["performance"] == ["attention_slicing", "vae_slicing", "vae_tiling", "channels_last"]
    assert caps["schedulers"] == schedulers()
    assert backend.device() == {"name": "cpu", "vram_total_mb": 8192}


# -- generation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(backend, tmp_path_factory):
    """A plain 2-step text-to-image run, the baseline the feature tests compare against."""
    return run(backend, request(), tmp_path_factory.mktemp("plain"))


def test_text_to_image_writes_pngs_with_progress_metadata_and_residency(backend, plain, tmp_path):
    [out] = plain.result.outputs
    assert out["width"] == SIDE and out["height"] == SIDE and out["seed"] == 42 and out["content_type"] == "image/png"
    assert Image.open(out["path"]).size == (SIDE, SIDE)
    assert read_metadata(out["path"])["models"] == {"base": BASE}
    assert set(out["metadata"]["timings"]) == {"model_load_ms", "base_ms", "encode_ms"}
    assert [p for p in plain.progress if p[0] == "base"] == [("base", 1, 2), ("base", 2, 2)]
    resident = {r["name"]: r for r in backend.state()["resident"]}
    assert resident[BASE]["location"] == "vram" and resident[BASE]["last_used_at"]

    # same request and seed → identical pixels; the base is already resident
    again = run(backend, request(), tmp_path)
    assert again.result.loaded_models == [] and not [p for p in again.progress if p[0] == "loading_model"]
    assert np.array_equal(again.pixels(), plain.pixels())


def test_num_images_uses_a_generator_per_image(backend, plain, tmp_path):
    two = run(backend, request(hyperparameters={"guidance_scale": 5, "seed": 42, "width": SIDE, "height": SIDE, "num_images": 2}), tmp_path)
    a, b = two.result.outputs
    assert (a["seed"], b["seed"]) == (42, 43) and a["sha256"] != b["sha256"]
    assert int(np.abs(two.pixels(0) - plain.pixels()).max()) <= 2  # image 0 is the single-image run


def test_seeds_past_the_maximum_wrap_to_zero(backend, tmp_path):
    hp = {"guidance_scale": 5, "width": SIDE, "height": SIDE}
    two = run(backend, request(hyperparameters={**hp, "seed": 2**32 - 1, "num_images": 2}), tmp_path / "two")
    assert [o["seed"] for o in two.result.outputs] == [2**32 - 1, 0]
    assert read_metadata(two.result.outputs[1]["path"])["seed"] == 0
    zero = run(backend, request(hyperparameters={**hp, "seed": 0, "num_images": 1}), tmp_path / "zero")
    assert int(np.abs(two.pixels(1) - zero.pixels()).max()) <= 2  # image 1 was made with seed 0


def test_img2img_and_inpaint(backend, plain, inputs, tmp_path):
    files = {"in/init.png": inputs["init"], "in/mask.png": inputs["mask"]}
    img2img = run(backend, request(image={"init": {"s3_key": "in/init.png"}, "strength": 1.0}), tmp_path / "a", files=files)
    assert Image.open(img2img.result.outputs[0]["path"]).size == (SIDE, SIDE)
    assert [p for p in img2img.progress if p[0] == "base"][-1] == ("base", 2, 2)
    assert differs(img2img.pixels(), plain.pixels())
    inpaint = run(backend, request(image={"init": {"s3_key": "in/init.png"}, "mask": {"s3_key": "in/mask.png"}, "strength": 1.0}), tmp_path / "b", files=files)
    assert Image.open(inpaint.result.outputs[0]["path"]).size == (SIDE, SIDE)
    assert read_metadata(inpaint.result.outputs[0]["path"])["inpaint"] is True
    assert differs(inpaint.pixels(), img2img.pixels())


def test_base_plus_refiner_ensemble(backend, plain, tmp_path):
    refined = run(backend, request(model={"base": BASE, "refiner": REFINER}, scheduler={"type": "EulerDiscreteScheduler", "steps": 4},
                                   refiner={"denoising_switch": 0.5, "steps": 4}), tmp_path)
    stages = [p[0] for p in refined.progress]
    assert "base" in stages and "refiner" in stages and stages.index("refiner") > stages.index("base")
    assert REFINER in refined.result.loaded_models
    assert refined.result.outputs[0]["metadata"]["models"] == {"base": BASE, "refiner": REFINER}
    assert differs(refined.pixels(), plain.pixels())


def test_lora_changes_the_image_and_is_disabled_when_not_asked(backend, plain, tmp_path):
    with_lora = run(backend, request(loras=[{"name": LORA, "weight": 1.0}]), tmp_path / "a")
    assert LORA in with_lora.result.loaded_models and differs(with_lora.pixels(), plain.pixels())
    assert {r["name"] for r in backend.state()["resident"]} >= {BASE, LORA}
    without = run(backend, request(), tmp_path / "b")
    assert without.result.loaded_models == [] and int(np.abs(without.pixels() - plain.pixels()).max()) <= 1
    half = run(backend, request(loras=[{"name": LORA, "weight": 0.5}]), tmp_path / "c")
    assert half.result.loaded_models == [] and differs(half.pixels(), with_lora.pixels())


def test_two_controlnets_with_canny_preprocessing(backend, plain, inputs, tmp_path):
    files = {"c/shapes.png": inputs["shapes"], "c/depth.png": inputs["depth"]}
    cns = [
        {"type": "canny", "image": {"s3_key": "c/shapes.png"}, "conditioning_scale": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "preprocess": True},
        {"type": "depth", "model": "tiny-depth", "image": {"s3_key": "c/depth.png"}, "conditioning_scale": 0.5, "guidance_start": 0.0, "guidance_end": 0.5, "preprocess": False},
    ]
    both = run(backend, request(controlnets=cns), tmp_path / "a", files=files)
    assert set(both.result.loaded_models) >= {"tiny-canny", "tiny-depth"}
    meta = both.result.outputs[0]["metadata"]["controlnets"]
    assert [c["model"] for c in meta] == ["tiny-canny", "tiny-depth"]  # the canny one chosen by type
    assert differs(both.pixels(), plain.pixels())
    one = run(backend, request(controlnets=cns[1:]), tmp_path / "b", files=files)
    assert differs(one.pixels(), both.pixels())


SCHEDULER_SPECS = [{"type": s} for s in schedulers()] + [
    {"type": implied["type"], **{k: v for k, v in implied.items() if k != "type"}}
    for alias, implied in scheduler_aliases().items() if alias in ("DPM++ 2M Karras", "DPM++ 2M SDE Karras")
]


@pytest.mark.parametrize("spec", SCHEDULER_SPECS, ids=lambda s: "+".join(f"{v}" for v in s.values()))
def test_every_scheduler_runs(backend, spec, tmp_path):
    r = run(backend, request(scheduler={**spec, "steps": 3}), tmp_path)
    assert Image.open(r.result.outputs[0]["path"]).size == (SIDE, SIDE)
    assert r.progress[-1][0] == "base" and r.progress[-1][1] == r.progress[-1][2]
    assert r.result.outputs[0]["metadata"]["scheduler"] == {**spec, "steps": 3}


def test_output_formats_and_upscale(backend, tmp_path):
    r = run(backend, request(output={"format": "webp", "quality": 80, "embed_metadata": True},
                             postprocess={"upscale": {"factor": 2}, "safety_check": False}), tmp_path)
    [out] = r.result.outputs
    assert out["content_type"] == "image/webp" and out["path"].endswith(".webp")
    assert (out["width"], out["height"]) == (128, 128) and Image.open(out["path"]).size == (128, 128)
    assert out["upscaled"] == {"factor": 2, "upscaler": "lanczos", "kind": "resample"}
    assert ("upscale", 1, 1) in r.progress


# -- errors ------------------------------------------------------------------------------------


def error_of(backend, req, tmp_path, files=None) -> WorkerError:
    with pytest.raises(WorkerError) as info:
        run(backend, req, tmp_path, files=files)
    return info.value


def test_request_errors_name_the_field(backend, tmp_path):
    fp16 = error_of(backend, request(performance={"dtype": "fp16", "attention_slicing": False, "vae_slicing": False, "vae_tiling": False,
                                                   "cpu_offload": "none", "channels_last": False, "compile": False}), tmp_path)
    assert fp16.code == "invalid_request" and fp16.message.startswith("performance.dtype")
    unknown = error_of(backend, request(model={"base": "nobody/nothing"}), tmp_path)
    assert unknown.code == "model_not_found" and unknown.message.startswith("model.base")
    wrong_kind = error_of(backend, request(model={"base": REFINER}), tmp_path)
    assert wrong_kind.code == "invalid_request" and wrong_kind.message.startswith("model.base")
    lora = error_of(backend, request(loras=[{"name": "tiny-canny", "weight": 1}]), tmp_path)
    assert lora.code == "invalid_request" and lora.message.startswith("loras.0.name")
    safety = error_of(backend, request(postprocess={"safety_check": True}), tmp_path)
    assert safety.code == "invalid_request" and safety.message.startswith("postprocess.safety_check")


def test_cancel_mid_run_then_the_next_request_runs(backend, plain, tmp_path):
    canceled = Run.__new__(Run)
    with pytest.raises(WorkerError) as info:
        Run.__init__(canceled, backend, request(scheduler={"type": "EulerDiscreteScheduler", "steps": 20}), tmp_path / "a", cancel_at=("base", 2))
    assert info.value.code == "canceled"
    assert [p for p in canceled.progress if p[0] == "base"] == [("base", 1, 20), ("base", 2, 20)]
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")
    after = run(backend, request(), tmp_path / "b")
    assert np.array_equal(after.pixels(), plain.pixels())


def test_out_of_memory_evicts_and_leaves_the_worker_usable(backend, plain, tmp_path, monkeypatch):
    import diffusers

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "__call__", oom)
    err = error_of(backend, request(), tmp_path / "a")
    assert err.code == "out_of_memory" and err.retryable
    assert backend.state()["resident"] == []  # CPU worker: evicted means unloaded
    monkeypatch.undo()
    after = run(backend, request(), tmp_path / "b")
    assert after.result.loaded_models == [BASE] and np.array_equal(after.pixels(), plain.pixels())


# -- through a real worker process -------------------------------------------------------------


def test_worker_process_round_trip_cancel_and_next(spawn, models_dir, tmp_path):
    from pngdecode import decode

    worker = spawn({"KILN_BACKEND": "diffusers", "MODELS_DIR": models_dir, "KILN_DIFFUSERS_HF_CACHE": "0", "HF_HUB_OFFLINE": "1"})
    ready = worker.hello()  # every frame is checked against worker-to-agent.json by WorkerProcess
    assert ready["device"] == {"name": "cpu", "vram_total_mb": 8192}
    caps = ready["capabilities"]
    assert caps["backend"] == "diffusers" and {m["name"] for m in caps["models"]} == {BASE, REFINER, LORA, "tiny-canny", "tiny-depth"}
    assert "controlnet" in caps["features"] and "lora" in caps["features"] and "refiner" in caps["features"]

    msg = generate_message("g1", str(tmp_path / "g1"), model=BASE, steps=2, width=SIDE, height=96, num_images=2)
    before, result = worker.run(msg, timeout=120)
    assert result["type"] == "result", result
    progress = [(m["stage"], m["step"], m["total"]) for m in before if m["type"] == "progress"]
    assert progress[:2] == [("loading_model", 0, 1), ("loading_model", 1, 1)] and progress[-1] == ("base", 2, 2)
    assert result["loaded_models"] == [BASE]
    for out in result["outputs"]:
        with open(out["path"], "rb") as f:
            assert decode(f.read()).shape == (96, SIDE, 3)

    slow = generate_message("g2", str(tmp_path / "g2"), model=BASE, steps=150, width=SIDE, height=SIDE)
    worker.send(slow)
    while True:
        m = worker.recv(60)
        if m["type"] == "progress" and m["id"] == "g2" and m["stage"] == "base":
            break
    worker.send({"v": 1, "type": "cancel", "id": "g2"})
    _, final = worker.until_final("g2", timeout=60)
    assert final["type"] == "error" and final["error"]["code"] == "canceled"

    _, after = worker.run(generate_message("g3", str(tmp_path / "g3"), model=BASE, steps=2, width=SIDE, height=SIDE), timeout=60)
    assert after["type"] == "result" and after["loaded_models"] == []


# -- the Hugging Face cache --------------------------------------------------------------------


def test_hf_cache_models_are_found_offline_and_a_vae_swaps_in(models_dir, plain, tmp_path):
    """A VAE repository in a (hand-made) HF cache is listed and used for model.vae."""
    snapshot = tmp_path / "hub" / "models--kiln--tiny-vae" / "snapshots" / ("a" * 40)
    shutil.copytree(os.path.join(models_dir, "base", "kiln--tiny-sdxl", "vae"), snapshot)
    (tmp_path / "hub" / "models--kiln--tiny-vae" / "refs").mkdir()
    (tmp_path / "hub" / "models--kiln--tiny-vae" / "refs" / "main").write_text("a" * 40)
    backend = DiffusersBackend(settings=DiffusersSettings(models_dir=models_dir, hf_cache_dir=str(tmp_path / "hub")))
    caps = backend.capabilities()
    assert {"name": "kiln/tiny-vae", "kind": "vae"}.items() <= next(m for m in caps["models"] if m["name"] == "kiln/tiny-vae").items()
    assert "vae" in caps["features"]
    r = run(backend, request(model={"base": BASE, "vae": "kiln/tiny-vae"}), tmp_path / "out")
    assert r.result.loaded_models == [BASE, "kiln/tiny-vae"]
    assert r.result.outputs[0]["metadata"]["models"] == {"base": BASE, "vae": "kiln/tiny-vae"}
    assert int(np.abs(r.pixels() - plain.pixels()).max()) <= 2  # the same weights as the base's own VAE

"""Backend conformance: what a client or the gpu-agent can observe is the same on every backend.

Each test runs once per backend, through a real `python -m kiln_worker` process (every frame is
checked against worker-to-agent.json by WorkerProcess), with the same model names on both:

- `synthetic`: always, its catalog (KILN_SYNTHETIC_MODELS) naming the models below;
- `diffusers`: a tiny random SDXL suite (base, a second base, refiner, LoRA, canny ControlNet,
  Real-ESRGAN-layout ×4 upscaler, safety checker) built offline into a MODELS_DIR, on CPU,
  wherever diffusers is importable (skipped elsewhere; KILN_REQUIRE_DIFFUSERS=1 fails instead).

Asserted once for both: protocol messages and their order; stage names and step counts per stage
(base, refiner, img2img strength, upscale, safety, training); the contracts' timing keys and the
embedded metadata; outputs' count, size, format; inpainting keeps unmasked pixels, img2img follows
strength; the same error codes for the same bad requests; residency after load, unload, pins and
eviction; cancel latency, nothing decoded after a cancel and the models kept; training
checkpoints and resume. What the synthetic backend cannot mirror (pixels, real timings) is not
compared.

Cases added with the fixes of issue 9 (each failed on the diffusers backend before its fix):
`test_refiner_runs_the_steps_asked_for` (1), `test_timings_use_the_contracts_keys` (2),
`test_inpaint_keeps_unmasked_pixels` (3), `test_cancel_stops_before_decoding` (4).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import WorkerProcess, generate_message, import_diffusers_or_skip
from kiln_worker import loras
from kiln_worker.output import read_metadata
from kiln_worker.previews import max_bytes as preview_max_bytes
from kiln_worker.protocol import validation_problems
from kiln_worker.tables import stage_timing_keys

sys.path.insert(0, os.path.dirname(__file__))

BASE = "kiln/tiny-sdxl"
BASE_B = "kiln/tiny-sdxl-b"
REFINER = "kiln/tiny-refiner"
LORA = "tiny-style"
CANNY = "tiny-canny"
UPSCALER = "tiny-esrgan-x4"
SAFETY = "kiln/tiny-safety-checker"
SIDE = 64
FINAL = {"result", "loaded", "trained", "error", "ready", "bye"}

# the synthetic catalog: the same names and kinds as the diffusers MODELS_DIR below
SYNTHETIC_MODELS = [
    {"name": BASE, "kind": "base", "vram_mb": 40, "disk_gb": 0.04},
    {"name": BASE_B, "kind": "base", "vram_mb": 40, "disk_gb": 0.04},
    {"name": REFINER, "kind": "refiner", "vram_mb": 20, "disk_gb": 0.02},
    {"name": LORA, "kind": "lora", "vram_mb": 1, "disk_gb": 0.001},
    {"name": CANNY, "kind": "controlnet", "vram_mb": 20, "disk_gb": 0.02, "controlnet_type": "canny"},
    {"name": UPSCALER, "kind": "upscaler", "vram_mb": 1, "disk_gb": 0.001, "scale": 4},
    {"name": SAFETY, "kind": "safety_checker", "vram_mb": 1, "disk_gb": 0.001},
]
FEATURES = ["refiner", "lora", "controlnet", "img2img", "inpaint", "upscale", "safety_check", "metadata", "training"]


def build_models_dir(root: Path) -> str:
    """The tiny random suite under the names above, laid out as MODELS_DIR expects."""
    from diffusers_support.tiny_sdxl import (build_tiny_controlnet, build_tiny_esrgan, build_tiny_lora, build_tiny_refiner,
                                             build_tiny_safety_checker, build_tiny_sdxl)

    stage, models = root / "stage", root / "models"
    for sub in ("base", "refiner", "lora", "controlnet/canny", "upscaler", "safety_checker"):
        (models / sub).mkdir(parents=True)
    base = str(models / "base" / "kiln--tiny-sdxl")
    shutil.move(build_tiny_sdxl(stage), base)
    shutil.copytree(base, models / "base" / "kiln--tiny-sdxl-b")
    shutil.move(build_tiny_refiner(stage), models / "refiner" / "kiln--tiny-refiner")
    shutil.move(build_tiny_lora(stage, base), models / "lora" / f"{LORA}.safetensors")
    shutil.move(build_tiny_controlnet(stage, base), models / "controlnet" / "canny" / CANNY)
    shutil.move(build_tiny_esrgan(stage), models / "upscaler" / f"{UPSCALER}.safetensors")
    shutil.move(build_tiny_safety_checker(stage), models / "safety_checker" / "kiln--tiny-safety-checker")
    return str(models)


class Backend:
    """One backend under test: how to start a worker for it, and one long-lived worker."""

    def __init__(self, name: str, env: dict[str, str], root: Path):
        self.name = name
        self.env = env
        self.root = root
        self._worker: WorkerProcess | None = None
        self.started: list[WorkerProcess] = []
        self._n = 0

    def spawn(self, **extra: str) -> WorkerProcess:
        worker = WorkerProcess({**self.env, **extra})
        self.started.append(worker)
        return worker

    @staticmethod
    def hello(worker: WorkerProcess) -> dict:
        """`ready`, waiting as long as importing torch and diffusers takes on a busy machine."""
        worker.send({"v": 1, "type": "hello", "id": "hello-1", "agent_id": "agent-test", "gpu_id": "0"})
        _, ready = worker.until_final("hello-1", timeout=180)
        assert ready["type"] == "ready", ready
        return ready

    @property
    def worker(self) -> WorkerProcess:
        """The shared worker (started and greeted once); tests that need a fresh state spawn their own."""
        if self._worker is None or self._worker.proc.poll() is not None:
            self._worker = self.spawn()
            self.hello(self._worker)
        return self._worker

    def job_dir(self) -> str:
        self._n += 1
        return str(self.root / "jobs" / f"j{self._n}")

    def stop(self) -> None:
        for w in self.started:
            w.stop()


@pytest.fixture(scope="module", params=["synthetic", "diffusers"])
def backend(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "synthetic":
        env = {"KILN_BACKEND": "synthetic", "KILN_SYNTHETIC_MODELS": json.dumps(SYNTHETIC_MODELS),
               "KILN_SYNTHETIC_STEP_MS": "20", "KILN_SYNTHETIC_LOAD_MS_PER_GB": "50", "KILN_SYNTHETIC_VRAM_MB": "8192",
               "KILN_SYNTHETIC_NO_BF16": "1", "KILN_SYNTHETIC_TRAIN_STEP_MS": "20"}
    else:
        import_diffusers_or_skip()
        env = {"KILN_BACKEND": "diffusers", "MODELS_DIR": build_models_dir(root), "KILN_DIFFUSERS_HF_CACHE": "0",
               "HF_HUB_OFFLINE": "1", "KILN_DIFFUSERS_DEVICE": "cpu"}
    b = Backend(request.param, env, root)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input images as the agent stages them, by s3_key."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(96, 80, 3) * 255).astype("uint8")).save(d / "init.png")  # resized to 64×64
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(d / "mask.png")
    edges = Image.new("RGB", (SIDE, SIDE), "black")
    edges.paste((255, 255, 255), (8, 8, 56, 24))
    edges.save(d / "shapes.png")
    return {f"in/{k}.png": str(d / f"{k}.png") for k in ("init", "mask", "shapes")}


def gen(b: Backend, rid: str, *, steps: int = 4, **overrides) -> dict:
    overrides.setdefault("model", BASE)
    return generate_message(rid, b.job_dir(), steps=steps, width=overrides.pop("width", SIDE), height=overrides.pop("height", SIDE),
                            seed=overrides.pop("seed", 42), **overrides)


def run(b: Backend, msg: dict, worker: WorkerProcess | None = None, timeout: float = 600) -> tuple[list[dict], dict]:
    return (worker or b.worker).run(msg, timeout=timeout)


def ok(b: Backend, msg: dict, worker: WorkerProcess | None = None) -> tuple[list[dict], dict]:
    before, final = run(b, msg, worker)
    assert final["type"] in ("result", "loaded", "trained"), final
    return before, final


def progress(before: list[dict], stage: str | None = None) -> list[tuple]:
    return [(m["stage"], m["step"], m["total"]) for m in before if m["type"] == "progress" and (stage is None or m["stage"] == stage)]


def stage_totals(before: list[dict]) -> dict[str, int]:
    """Steps run per denoising stage, as a progress bar would show them (the last total, and the
    steps must count 1..total)."""
    out = {}
    for stage in ("base", "refiner"):
        p = progress(before, stage)
        if p:
            assert [s for _, s, _ in p] == list(range(1, len(p) + 1)), f"{stage} steps: {p}"
            assert {t for _, _, t in p} == {len(p)}, f"{stage} totals: {p}"
            out[stage] = len(p)
    return out


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# -- handshake and protocol --------------------------------------------------------------------


def test_ready_advertises_the_same_models_and_features(backend):
    ready = backend.hello(backend.worker)
    caps = ready["capabilities"]
    assert caps["backend"] == backend.name
    assert {m["name"]: m["kind"] for m in caps["models"]} == {m["name"]: m["kind"] for m in SYNTHETIC_MODELS}
    assert caps["features"] == FEATURES
    assert caps["upscalers"] == [UPSCALER] and caps["controlnet_types"] == ["canny"]
    assert "bf16" not in caps["dtypes"]
    assert ready["state"]["resident"] == [] or all(r["name"] in {m["name"] for m in SYNTHETIC_MODELS} for r in ready["state"]["resident"])


def test_generate_frames_come_in_order_and_end_with_one_result(backend):
    w = backend.spawn()
    backend.hello(w)
    msg = gen(backend, "order", steps=3, num_images=2)
    before, final = ok(backend, msg, w)
    assert all(m["id"] == "order" for m in before) and final["id"] == "order"
    assert {m["type"] for m in before} <= {"log", "progress"}
    stages = [s for s, _, _ in progress(before)]
    # loading_model 0/1, 1/1 for the base, then the base's steps
    assert progress(before)[:2] == [("loading_model", 0, 1), ("loading_model", 1, 1)]
    assert stages == sorted(stages, key=["loading_model", "base", "refiner", "upscale", "safety"].index)
    assert stage_totals(before) == {"base": 3}
    assert final["loaded_models"] == [BASE]
    # nothing for this request after its final message: the next request's frames are its own
    before2, final2 = ok(backend, gen(backend, "order-2", steps=1), w)
    assert all(m["id"] == "order-2" for m in before2) and final2["loaded_models"] == []
    assert not any(m.get("id") == "order" for m in w.received[w.received.index(final) + 1:])


# -- stages and step counts --------------------------------------------------------------------


def test_refiner_runs_the_steps_asked_for(backend):
    """Issue 9 fix 1: base round(steps × switch) steps, then the refiner refiner.steps steps."""
    _, _ = ok(backend, gen(backend, "warm-refiner", steps=1, model={"base": BASE, "refiner": REFINER}))
    before, final = ok(backend, gen(backend, "ref", steps=10, model={"base": BASE, "refiner": REFINER},
                                     refiner={"denoising_switch": 0.8, "steps": 10}))
    assert stage_totals(before) == {"base": 8, "refiner": 10}
    before, _ = ok(backend, gen(backend, "ref-default", steps=10, model={"base": BASE, "refiner": REFINER},
                                refiner={"denoising_switch": 0.5}))
    assert stage_totals(before) == {"base": 5, "refiner": 10}  # refiner.steps defaults to scheduler.steps
    meta = final["outputs"][0]["metadata"]
    assert meta["models"] == {"base": BASE, "refiner": REFINER} and meta["refiner"] == {"denoising_switch": 0.8, "steps": 10}


@pytest.mark.parametrize("strength,steps", [(0.5, 4), (0.75, 4), (1.0, 3)])
def test_img2img_runs_steps_times_strength(backend, inputs, strength, steps):
    before, final = ok(backend, gen(backend, f"i2i-{strength}", steps=steps, files=inputs,
                                    image={"init": {"s3_key": "in/init.png"}, "strength": strength}))
    assert stage_totals(before) == {"base": int(steps * strength)}
    assert final["outputs"][0]["metadata"]["strength"] == strength


def test_img2img_depends_on_the_init_and_the_strength(backend, inputs):
    """Pixels only as far as random weights allow: a tiny random VAE does not reconstruct its input,
    so "closer to the init at low strength" is for a real model (and the synthetic one) only."""
    shas = set()
    for strength in (0.5, 1.0):
        _, final = ok(backend, gen(backend, f"i2i-d-{strength}", steps=4, files=inputs,
                                   image={"init": {"s3_key": "in/init.png"}, "strength": strength}))
        shas.add(final["outputs"][0]["sha256"])
    _, plain = ok(backend, gen(backend, "i2i-d-plain", steps=4))
    shas.add(plain["outputs"][0]["sha256"])
    assert len(shas) == 3


def test_upscale_and_safety_stages(backend):
    before, final = ok(backend, gen(backend, "post", steps=2, num_images=2,
                                    postprocess={"upscale": {"factor": 4, "upscaler": UPSCALER}, "safety_check": True}))
    assert progress(before, "upscale") == [("upscale", 0, 1), ("upscale", 1, 1)]
    assert progress(before, "safety") == [("safety", 0, 1), ("safety", 1, 1)]
    for out in final["outputs"]:
        assert (out["width"], out["height"]) == (SIDE * 4, SIDE * 4) and Image.open(out["path"]).size == (SIDE * 4, SIDE * 4)
        assert out["upscaled"] == {"factor": 4, "upscaler": UPSCALER, "kind": "model"}
        assert out["safety"]["checked"] is True and out["safety"]["checker"] == SAFETY and isinstance(out["safety"]["nsfw"], bool)
        assert out["metadata"]["upscale"] == {"factor": 4, "upscaler": UPSCALER, "kind": "model"}
    _, lanczos = ok(backend, gen(backend, "post-l", steps=1, postprocess={"upscale": {"factor": 2, "upscaler": "lanczos"}, "safety_check": False}))
    assert lanczos["outputs"][0]["upscaled"] == {"factor": 2, "upscaler": "lanczos", "kind": "resample"}
    assert lanczos["outputs"][0]["safety"] is None


# -- timings, metadata, outputs ----------------------------------------------------------------


def test_timings_use_the_contracts_keys(backend):
    """Issue 9 fix 2: one set of per-stage keys (the contracts' STAGE_TIMING_KEYS) on every backend."""
    assert stage_timing_keys() == ["model_load_ms", "compile_ms", "base_ms", "refiner_ms", "upscale_ms", "safety_ms", "encode_ms"]
    _, plain = ok(backend, gen(backend, "t-plain", steps=1))
    assert set(plain["outputs"][0]["metadata"]["timings"]) == {"model_load_ms", "base_ms", "encode_ms"}
    _, full = ok(backend, gen(backend, "t-full", steps=2, model={"base": BASE, "refiner": REFINER},
                              postprocess={"upscale": {"factor": 2, "upscaler": "lanczos"}, "safety_check": True}))
    timings = full["outputs"][0]["metadata"]["timings"]
    assert list(timings) == ["model_load_ms", "base_ms", "refiner_ms", "upscale_ms", "safety_ms", "encode_ms"]
    assert all(isinstance(v, (int, float)) and v >= 0 for v in timings.values())
    assert set(full["timings"]) == {"model_load_ms", "inference_ms"}


def test_outputs_count_size_format_and_embedded_metadata(backend):
    for fmt, ext, ctype in (("png", ".png", "image/png"), ("jpeg", ".jpg", "image/jpeg"), ("webp", ".webp", "image/webp")):
        _, final = ok(backend, gen(backend, f"fmt-{fmt}", steps=1, num_images=2, width=SIDE, height=96, seed=2**32 - 1,
                                   output={"format": fmt, "quality": 80, "embed_metadata": True}, loras=[{"name": LORA, "weight": 0.5}]))
        outs = final["outputs"]
        assert [o["index"] for o in outs] == [0, 1] and [o["seed"] for o in outs] == [2**32 - 1, 0]
        for o in outs:
            assert o["path"].endswith(ext) and o["content_type"] == ctype and Image.open(o["path"]).size == (SIDE, 96)
            assert (o["width"], o["height"]) == (SIDE, 96) and o["bytes"] == os.path.getsize(o["path"])
            embedded = read_metadata(o["path"])
            assert embedded == {k: v for k, v in o["metadata"].items() if k != "timings"}
            assert embedded["seed"] == o["seed"] and embedded["models"] == {"base": BASE}
            assert embedded["loras"] == [{"name": LORA, "weight": 0.5}] and embedded["size"] == {"width": SIDE, "height": 96}
            assert embedded["scheduler"] == {"type": "EulerDiscreteScheduler", "steps": 1}
    _, bare = ok(backend, gen(backend, "fmt-bare", steps=1, output={"format": "png", "quality": 90, "embed_metadata": False}))
    assert read_metadata(bare["outputs"][0]["path"]) is None


def test_same_request_and_seed_give_the_same_bytes(backend):
    _, a = ok(backend, gen(backend, "det-a", steps=2, seed=7))
    _, b = ok(backend, gen(backend, "det-b", steps=2, seed=7))
    _, c = ok(backend, gen(backend, "det-c", steps=2, seed=8))
    assert a["outputs"][0]["sha256"] == b["outputs"][0]["sha256"] != c["outputs"][0]["sha256"]


def test_inpaint_keeps_unmasked_pixels(backend, inputs):
    """Issue 9 fix 3: outside the mask the output is the (resized) source, pixel for pixel."""
    _, final = ok(backend, gen(backend, "inpaint", steps=4, files=inputs,
                               image={"init": {"s3_key": "in/init.png"}, "mask": {"s3_key": "in/mask.png"}, "strength": 1.0}))
    out = pixels(final["outputs"][0]["path"])
    init = np.asarray(Image.open(inputs["in/init.png"]).convert("RGB").resize((SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.int16)
    mask = np.zeros((SIDE, SIDE), bool)
    mask[16:48, 16:48] = True
    assert np.array_equal(out[~mask], init[~mask]), f"{int((out[~mask] != init[~mask]).any(axis=-1).sum())} unmasked pixels changed"
    inner = np.zeros_like(mask)
    inner[24:40, 24:40] = True  # well inside the mask, past any edge blend
    assert float(np.abs(out[inner] - init[inner]).mean()) > 8
    assert final["outputs"][0]["metadata"]["inpaint"] is True


def test_controlnet_canny_with_preprocessing(backend, inputs):
    cn = {"type": "canny", "image": {"s3_key": "in/shapes.png"}, "conditioning_scale": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "preprocess": True}
    before, final = ok(backend, gen(backend, "cn", steps=2, files=inputs, controlnets=[cn]))
    assert stage_totals(before) == {"base": 2} and CANNY in final["loaded_models"] + [r["name"] for r in final["state"]["resident"]]
    assert [c["model"] for c in final["outputs"][0]["metadata"]["controlnets"]] == [CANNY]


# -- previews ----------------------------------------------------------------------------------


def previews(before: list[dict]) -> list[dict]:
    return [m for m in before if m["type"] == "preview"]


def preview_image(frame: dict) -> Image.Image:
    """The frame's image, decoded, after checking it is what the frame says."""
    data = base64.b64decode(frame["data"], validate=True)
    assert len(data) <= preview_max_bytes()
    img = Image.open(io.BytesIO(data))
    img.load()
    assert Image.MIME[img.format] == frame["content_type"] == "image/webp"
    assert img.size == (frame["width"], frame["height"])
    return img


def with_previews(every: int, max_size: int) -> dict:
    return {"format": "png", "quality": 90, "embed_metadata": True, "previews": {"every_n_steps": every, "max_size": max_size}}


def test_previews_on_the_same_steps_after_their_progress(backend):
    """output.previews: a small decodable image after every n-th step of each denoising stage, right
    after that step's progress; nothing else about the run changes (same steps, same bytes)."""
    model = {"base": BASE, "refiner": REFINER}
    refine = {"denoising_switch": 0.5, "steps": 4}
    _, plain = ok(backend, gen(backend, "pv-plain", steps=10, model=model, refiner=refine))
    before, final = ok(backend, gen(backend, "pv", steps=10, model=model, refiner=refine, output=with_previews(2, 48)))
    assert stage_totals(before) == {"base": 5, "refiner": 4}
    frames = previews(before)
    assert [(f["stage"], f["step"], f["total"]) for f in frames] == [("base", 2, 5), ("base", 4, 5), ("refiner", 2, 4), ("refiner", 4, 4)]
    for f in frames:  # each one right after its step's progress, never after the result
        i = before.index(f)
        assert (before[i - 1]["type"], before[i - 1]["stage"], before[i - 1]["step"]) == ("progress", f["stage"], f["step"])
        img = preview_image(f)
        assert 8 <= max(img.size) <= 48 and img.width == img.height  # small, and the output's aspect (64 × 64)
    assert final["outputs"][0]["sha256"] == plain["outputs"][0]["sha256"]  # previews never change the image
    assert final["outputs"][0]["metadata"] == {**plain["outputs"][0]["metadata"], "timings": final["outputs"][0]["metadata"]["timings"]}

    before, _ = ok(backend, gen(backend, "pv-none", steps=3))
    assert previews(before) == []  # none unless asked for
    before, _ = ok(backend, gen(backend, "pv-every", steps=3, num_images=2, width=SIDE, height=96, output=with_previews(1, 32)))
    frames = previews(before)
    assert [f["step"] for f in frames] == [1, 2, 3] and all(f["stage"] == "base" for f in frames)
    for f in frames:
        img = preview_image(f)
        assert max(img.size) <= 32 and img.height > img.width  # the first image's 64 × 96, shrunk


@pytest.mark.parametrize("backend", ["diffusers"], indirect=True)  # the synthetic one renders its previews
def test_diffusers_previews_use_the_tiny_autoencoder_when_there_is_one(backend, tmp_path):
    """MODELS_DIR/taesdxl (an AutoencoderTiny) decodes the previews at the image's size; a broken
    one is reported, and the linear approximation (one pixel per latent) used instead."""
    from diffusers_support.tiny_sdxl import build_tiny_taesd

    def models_dir(name: str) -> Path:
        models = tmp_path / name
        models.mkdir()
        for sub in Path(backend.env["MODELS_DIR"]).iterdir():
            (models / sub.name).symlink_to(sub)
        return models

    good = models_dir("with-taesd")
    shutil.move(build_tiny_taesd(tmp_path / "stage"), good / "taesdxl")
    broken = models_dir("broken-taesd")
    (broken / "taesdxl").mkdir()
    (broken / "taesdxl" / "config.json").write_text("{not json")
    for models, side in ((good, 48), (broken, 32)):
        w = backend.spawn(MODELS_DIR=str(models))
        backend.hello(w)
        before, _ = ok(backend, gen(backend, f"pv-taesd-{side}", steps=4, output=with_previews(2, 48)), w)
        frames = previews(before)
        assert [f["step"] for f in frames] == [2, 4]
        # the tiny autoencoder decodes to the image's 64 × 64 (then shrunk to 48); the linear one gives a pixel per latent
        assert {preview_image(f).size for f in frames} == {(side, side)}
        time.sleep(0.3)  # stderr is read by its own thread
        assert ("decoding latents with the tiny autoencoder" in w.stderr) is (models == good)
        assert ("cannot load" in w.stderr) is (models == broken)
        w.stop()


# -- errors ------------------------------------------------------------------------------------

PERF = {"attention_slicing": False, "vae_slicing": False, "vae_tiling": False, "cpu_offload": "none", "channels_last": False, "compile": False}


@pytest.mark.parametrize("case,overrides,code,field", [
    ("unknown-base", {"model": {"base": "nobody/nothing"}}, "model_not_found", "model.base"),
    ("lora-as-base", {"model": {"base": LORA}}, "invalid_request", "model.base"),
    ("unknown-lora", {"loras": [{"name": "nobody/lora", "weight": 1}]}, "model_not_found", "loras.0.name"),
    ("controlnet-as-lora", {"loras": [{"name": CANNY, "weight": 1}]}, "invalid_request", "loras.0.name"),
    ("unknown-upscaler", {"postprocess": {"upscale": {"factor": 2, "upscaler": "nobody-x2"}, "safety_check": False}}, "model_not_found", "postprocess.upscale.upscaler"),
    ("bf16", {"performance": {"dtype": "bf16", **PERF}}, "invalid_request", "performance.dtype"),
    ("refiner-with-image", {"model": {"base": BASE, "refiner": REFINER}, "image": {"init": {"s3_key": "in/init.png"}, "strength": 0.5}}, "invalid_request", "model.refiner"),
    ("missing-input", {"image": {"init": {"s3_key": "in/nope.png"}, "strength": 1.0}}, "invalid_request", "image.init"),
    ("out-of-memory", {"width": 2048, "height": 2048, "hyperparameters": {"guidance_scale": 5, "seed": 1, "width": 2048, "height": 2048, "num_images": 8}}, "out_of_memory", None),
])
def test_the_same_bad_request_gets_the_same_error(backend, inputs, case, overrides, code, field):
    msg = gen(backend, f"err-{case}", steps=1, files=inputs, **overrides)
    before, final = run(backend, msg)
    assert final["type"] == "error", final
    assert final["error"]["code"] == code, final["error"]
    assert final["error"]["retryable"] is (code == "out_of_memory")
    if field:
        assert final["error"]["message"].startswith(field), final["error"]["message"]
    assert not progress(before, "base")  # refused before any denoising


# -- residency ---------------------------------------------------------------------------------


def resident(msg: dict) -> dict[str, tuple[str, bool]]:
    return {r["name"]: (r["location"], r["pinned"]) for r in msg["state"]["resident"]}


def load(b: Backend, w: WorkerProcess, rid: str, models: list[str], location: str = "vram", pin: bool = False) -> tuple[list[dict], dict]:
    msg = {"v": 1, "type": "load", "id": rid, "models": models, "location": location, "pin": pin}
    assert not validation_problems("agent-to-worker", msg)
    return w.run(msg, timeout=120)


def unload(w: WorkerProcess, rid: str, models: list[str]) -> dict:
    return w.run({"v": 1, "type": "unload", "id": rid, "models": models}, timeout=60)[1]


def test_residency_after_load_unload_pin_and_eviction(backend):
    base_mb = {m["name"]: m["vram_mb"] for m in backend.hello(backend.worker)["capabilities"]["models"]}[BASE]
    # room for one base, not two (diffusers: the CPU memory budget; synthetic: its simulated VRAM)
    budget = str(base_mb + base_mb // 2)
    w = backend.spawn(KILN_DIFFUSERS_CPU_MEMORY_MB=budget, KILN_SYNTHETIC_VRAM_MB=budget)
    assert backend.hello(w)["state"]["resident"] == []

    before, loaded = load(backend, w, "l1", [BASE])
    assert loaded["type"] == "loaded" and loaded["models"] == [BASE] and resident(loaded) == {BASE: ("vram", False)}
    assert progress(before) == [("loading_model", 0, 1), ("loading_model", 1, 1)]
    _, again = load(backend, w, "l2", [BASE])
    assert again["models"] == [] and not progress(_)
    _, pinned = load(backend, w, "l3", [BASE], pin=True)
    assert resident(pinned) == {BASE: ("vram", True)}
    _, still = load(backend, w, "l4", [BASE])
    assert resident(still) == {BASE: ("vram", True)}  # a load without pin never lifts a pin

    _, refused = load(backend, w, "l5", [BASE_B])
    assert refused["type"] == "error" and refused["error"]["code"] == "out_of_memory" and refused["error"]["retryable"]
    assert BASE in refused["error"]["message"] and resident(refused) == {BASE: ("vram", True)}

    freed = unload(w, "u1", [BASE, "not/resident"])
    assert freed["type"] == "loaded" and freed["models"] == [BASE] and resident(freed) == {}

    _, a = load(backend, w, "l6", [BASE])
    _, b = load(backend, w, "l7", [BASE_B])  # evicts BASE, least recently used
    assert resident(a) == {BASE: ("vram", False)} and resident(b)[BASE_B] == ("vram", False)
    # out of VRAM: warm in host RAM on a GPU (and the synthetic one); a CPU worker has no second
    # memory to keep it in, so there it is dropped
    assert resident(b).get(BASE, ("ram", False)) == ("ram", False)
    unload(w, "u2", [BASE])
    _, warm = load(backend, w, "l8", [BASE_B], location="ram")
    assert warm["models"] == [BASE_B] and resident(warm) == {BASE_B: ("ram", False)}
    _, unknown = load(backend, w, "l9", ["nobody/nothing"])
    assert unknown["type"] == "error" and unknown["error"]["code"] == "model_not_found" and unknown["error"]["message"].startswith("models.0")


# -- cancel ------------------------------------------------------------------------------------


# Instruments a worker from outside (no hook in the worker itself): a sitecustomize on its
# PYTHONPATH wraps what turns latents into pixels — diffusers' AutoencoderKL.decode, the synthetic
# backend's render_image — to print a marker on stderr each time it runs.
PROBE = """
import os, sys

def _wrap(owner, name):
    inner = getattr(owner, name)
    def wrapped(*args, **kwargs):
        sys.stderr.write("KILN-PROBE decode\\n")
        sys.stderr.flush()
        return inner(*args, **kwargs)
    setattr(owner, name, wrapped)

if os.environ.get("KILN_BACKEND") == "diffusers":
    from kiln_worker.torch_compat import ensure_torchvision_importable
    ensure_torchvision_importable()
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    _wrap(AutoencoderKL, "decode")
else:
    import kiln_worker.backends.synthetic as synthetic
    _wrap(synthetic, "render_image")
"""


def decodes(w: WorkerProcess) -> int:
    time.sleep(0.3)  # stderr is read by its own thread
    return w.stderr.count("KILN-PROBE decode")


def test_cancel_stops_before_decoding(backend, tmp_path):
    """Issue 9 fix 4: a cancel ends the run at the next step: no more steps, nothing decoded or
    written, an error `canceled` soon after, and the models stay resident for the next job."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    # synthetic: ~0.1 s a step at 256², about what the tiny diffusers model takes on CPU
    w = backend.spawn(PYTHONPATH=str(tmp_path / "probe"), KILN_SYNTHETIC_STEP_MS="2000")
    backend.hello(w)
    ok(backend, gen(backend, "c-warm", steps=1), w)
    assert decodes(w) >= 1, "the probe did not see the warm-up decode:\n" + w.stderr[-2000:]
    msg = gen(backend, "c", steps=150, width=256, height=256)
    w.send(msg)
    arrivals = []
    while True:
        m = w.recv(120)
        if m["id"] == "c" and m["type"] == "progress" and m["stage"] == "base":
            arrivals.append(time.monotonic())
            if m["step"] >= 3:
                break
        assert m["type"] not in FINAL, m
    step_s = max(b - a for a, b in zip(arrivals, arrivals[1:]))
    decoded_before = decodes(w)
    sent = time.monotonic()
    w.send({"v": 1, "type": "cancel", "id": "c"})
    after, final = w.until_final("c", timeout=60)
    latency = time.monotonic() - sent
    assert final["type"] == "error" and final["error"]["code"] == "canceled", final
    assert final["error"]["retryable"] is False
    # the run stops within a step or two of the cancel (frames already in the pipe still arrive)
    late = progress(after, "base")
    assert set(s for s, _, _ in progress(after)) <= {"base"} and len(late) <= 3, late
    assert not Path(msg["job_dir"]).exists() or not os.listdir(msg["job_dir"])  # nothing written
    assert decodes(w) == decoded_before, "the canceled run was decoded"
    # a step or two, however loaded the machine (CI shares its cores): never the rest of the run
    assert latency < 3 * step_s + 1.0, f"cancel took {latency:.2f} s with steps of {step_s:.2f} s"
    assert BASE in resident(final)  # models kept
    _, nxt = ok(backend, gen(backend, "c-next", steps=1), w)
    assert nxt["loaded_models"] == []


# -- training ----------------------------------------------------------------------------------


def train_message(b: Backend, rid: str, dataset_dir: str, items: list[dict], *, steps: int = 4, every: int = 2,
                  resume: dict | None = None, job_dir: str | None = None) -> dict:
    hyper = {"rank": 4, "learning_rate": 1e-3, "steps": steps, "batch_size": 1, "gradient_accumulation": 1,
             "resolution": 256, "seed": 7, "train_text_encoder": False, "checkpoint_every": every}
    msg = {"v": 1, "type": "train", "id": rid, "job_id": f"job-{rid}", "attempt": 1, "job_dir": job_dir or b.job_dir(),
           "dataset_dir": dataset_dir, "resume": resume,
           "request": {"base_model": BASE, "dataset": {"items": items}, "output": {"name": "team/conformance-lora"},
                       "hyperparameters": hyper, "priority": "normal", "timeout_s": 3600}}
    assert not validation_problems("agent-to-worker", msg)
    return msg


def test_training_checkpoints_and_resume(backend, tmp_path):
    ds = tmp_path / "dataset"
    ds.mkdir()
    items = []
    for i in range(2):
        Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")).save(ds / f"{i}.png")
        items.append({"image": f"datasets/c/{i}.png", "caption": f"a photo of thing {i}"})
    before, trained = ok(backend, train_message(backend, "tr", str(ds), items, steps=3, every=1))
    steps = [(m["step"], m["total"]) for m in before if m["type"] == "progress" and m["stage"] == "train"]
    assert steps == [(s, 3) for s in range(1, 4)]
    assert all(np.isfinite(m["loss"]) for m in before if m["type"] == "progress" and m["stage"] == "train")
    ckpts = [m for m in before if m["type"] == "checkpoint"]
    assert [c["step"] for c in ckpts] == [1, 2]  # never at the last step: its weights are the result
    for c in ckpts:
        assert c["path"].endswith(f"checkpoints/step-{c['step']:06d}.safetensors") and os.path.getsize(c["path"]) == c["bytes"]
    # each checkpoint arrives after its step's progress and before the next step's
    order = [(m["type"], m.get("step")) for m in before if m["type"] in ("progress", "checkpoint") and m.get("stage", "train") == "train"]
    assert order.index(("checkpoint", 2)) == order.index(("progress", 2)) + 1
    assert trained["steps"] == 3 and os.path.basename(trained["path"]) == loras.file_name("team/conformance-lora")
    assert set(trained["timings"]) == {"model_load_ms", "train_ms"}

    resume_dir = str(tmp_path / "resume")
    os.makedirs(os.path.join(resume_dir, "checkpoints"))
    shutil.copy(ckpts[1]["path"], os.path.join(resume_dir, "checkpoints", os.path.basename(ckpts[1]["path"])))
    before, resumed = ok(backend, train_message(backend, "tr-resume", str(ds), items, steps=3, every=1, job_dir=resume_dir,
                                                resume={"path": os.path.join(resume_dir, "checkpoints", os.path.basename(ckpts[1]["path"])), "step": 2}))
    assert [m["step"] for m in before if m["type"] == "progress" and m["stage"] == "train"] == [3]
    assert not [m for m in before if m["type"] == "log" and m["level"] == "warning"]
    assert resumed["steps"] == 3

"""Every feature of the full SDXL request on the synthetic backend: what each one does to the
pixels, the progress, the suite and the outputs, and every request it must refuse. Protocol-level
behaviour runs through real worker processes (every frame checked against worker-to-agent.json);
pixel comparisons that need many variants run in-process."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln_worker.backends import load_backend
from kiln_worker.backends.synthetic import CONTROLNET_STEP_COST, render_image
from kiln_worker.config import Config
from kiln_worker.errors import WorkerError
from kiln_worker.output import read_metadata
from conftest import SDXL, generate_message

REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
VAE = "madebyollin/sdxl-vae-fp16-fix"
PIXEL_ART = "kiln/lora-pixel-art"
WATERCOLOR = "kiln/lora-watercolor"
CANNY = "diffusers/controlnet-canny-sdxl-1.0"
DEPTH = "diffusers/controlnet-depth-sdxl-1.0"
ESRGAN = "ai-forever/Real-ESRGAN-x4"
CHECKER = "CompVis/stable-diffusion-safety-checker"
PERF = {"dtype": "fp16", "attention_slicing": False, "vae_slicing": False, "vae_tiling": False,
        "cpu_offload": "none", "channels_last": False, "compile": False}


def scene(w=160, h=120) -> Image.Image:
    """A picture with structure: gradients and a bright block (edges for canny)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1).astype(np.uint8)
    arr[h // 4 : h // 2, w // 3 : 2 * w // 3] = 250
    return Image.fromarray(arr)


def put(tmp_path: Path, key: str, img: Image.Image, fmt: str = "PNG") -> tuple[str, str]:
    path = tmp_path / "inputs" / key.replace("/", "_")
    path.parent.mkdir(exist_ok=True)
    img.save(path, fmt)
    return key, str(path)


def controlnet(kind="canny", key="in/control.png", **kw) -> dict:
    return {"type": kind, "image": {"s3_key": key}, "conditioning_scale": 1.0, "guidance_start": 0.0,
            "guidance_end": 1.0, "preprocess": False, **kw}


def pixels(out: dict) -> np.ndarray:
    with Image.open(out["path"]) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def progress(before: list[dict]) -> list[tuple[str, int, int]]:
    return [(m["stage"], m["step"], m["total"]) for m in before if m["type"] == "progress"]


def ok(worker, msg, timeout=10.0):
    before, final = worker.run(msg, timeout)
    assert final["type"] == "result", final
    return before, final


@pytest.fixture
def worker(spawn):
    w = spawn()
    w.hello()
    return w


# -- refiner, VAE, LoRA -----------------------------------------------------------------------

def test_refiner_runs_after_the_switch_and_changes_the_pixels(worker, tmp_path):
    _, plain = ok(worker, generate_message("plain", str(tmp_path / "p"), steps=10, width=128, height=128))
    before, refined = ok(worker, generate_message("ref", str(tmp_path / "r"), steps=10, width=128, height=128,
                                                  model={"base": SDXL, "refiner": REFINER}, refiner={"denoising_switch": 0.8}))
    stages = progress(before)
    assert [s for s in stages if s[0] == "base"] == [("base", i, 8) for i in range(1, 9)]  # round(10 × 0.8)
    assert [s for s in stages if s[0] == "refiner"] == [("refiner", i, 10) for i in range(1, 11)]
    assert stages.index(("base", 8, 8)) < stages.index(("refiner", 1, 10))
    assert refined["loaded_models"] == [REFINER]
    assert "refiner_ms" in refined["outputs"][0]["metadata"]["timings"]
    assert refined["outputs"][0]["metadata"]["refiner"] == {"denoising_switch": 0.8, "steps": 10}
    assert (pixels(plain["outputs"][0]) != pixels(refined["outputs"][0])).any()
    before, _ = ok(worker, generate_message("ref2", str(tmp_path / "r2"), steps=10, width=128, height=128,
                                            model={"base": SDXL, "refiner": REFINER}, refiner={"denoising_switch": 0.6, "steps": 4}))
    assert progress(before)[-1] == ("refiner", 4, 4) and ("base", 6, 6) in progress(before)


def test_vae_changes_the_pixels_and_is_part_of_the_suite(worker, tmp_path):
    _, plain = ok(worker, generate_message("a", str(tmp_path / "a"), width=128, height=128))
    _, vae = ok(worker, generate_message("b", str(tmp_path / "b"), width=128, height=128, model={"base": SDXL, "vae": VAE}))
    assert vae["loaded_models"] == [VAE]
    assert {r["name"] for r in vae["state"]["resident"]} == {SDXL, VAE}
    assert (pixels(plain["outputs"][0]) != pixels(vae["outputs"][0])).any()


def test_lora_weights_matter_and_loras_stay_resident(worker, tmp_path):
    _, half = ok(worker, generate_message("half", str(tmp_path / "h"), width=128, height=128, loras=[{"name": PIXEL_ART, "weight": 0.5}]))
    _, full = ok(worker, generate_message("full", str(tmp_path / "f"), width=128, height=128, loras=[{"name": PIXEL_ART, "weight": 1.0}]))
    assert half["loaded_models"] == [SDXL, PIXEL_ART]
    assert full["loaded_models"] == []  # the LoRA was reused, not loaded again
    assert (pixels(half["outputs"][0]) != pixels(full["outputs"][0])).any()
    _, both = ok(worker, generate_message("both", str(tmp_path / "b"), width=128, height=128,
                                          loras=[{"name": PIXEL_ART, "weight": 1.0}, {"name": WATERCOLOR, "weight": 0.7}]))
    assert both["loaded_models"] == [WATERCOLOR]
    assert both["outputs"][0]["metadata"]["loras"] == [{"name": PIXEL_ART, "weight": 1.0}, {"name": WATERCOLOR, "weight": 0.7}]


def test_a_lora_dropped_into_the_lora_dir_is_usable_without_a_restart(spawn, tmp_path):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    worker = spawn({"KILN_SYNTHETIC_LORA_DIR": str(lora_dir)})
    assert "lora" in worker.hello()["capabilities"]["features"]
    _, err = worker.run(generate_message("early", str(tmp_path / "e"), width=64, height=64, loras=[{"name": "my-style", "weight": 1}]))
    assert err["error"]["code"] == "model_not_found" and err["error"]["message"].startswith("loras.0.name:")
    (lora_dir / "my-style.safetensors").write_bytes(b"\0" * (3 * 2**20))  # what training uploads later
    _, result = ok(worker, generate_message("late", str(tmp_path / "l"), width=64, height=64, loras=[{"name": "my-style", "weight": 1}]))
    assert "my-style" in result["loaded_models"]
    assert next(r for r in result["state"]["resident"] if r["name"] == "my-style")["vram_mb"] == 3


# -- ControlNet -------------------------------------------------------------------------------

def test_two_controlnets_load_cost_more_per_step_and_follow_their_images(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "640"})  # 40 ms a step at 256²
    files = dict([put(tmp_path, "in/control.png", scene()), put(tmp_path, "in/depth.png", scene().transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    common = dict(steps=5, width=256, height=256, files=files)
    ok(worker, generate_message("plain", str(tmp_path / "p"), **common))  # loads the base model
    cns = [controlnet("canny", model=CANNY), controlnet("depth", "in/depth.png", model=DEPTH, conditioning_scale=0.6)]
    _, two = ok(worker, generate_message("two", str(tmp_path / "t"), controlnets=cns, **common))
    assert two["loaded_models"] == [CANNY, DEPTH]
    # a simulated step never takes less than its cost, however loaded the machine: compare with
    # the cost of five plain steps, not with a measured plain run (which load can slow down)
    plain_cost_ms = 5 * 40
    assert two["outputs"][0]["metadata"]["timings"]["base_ms"] >= 0.99 * plain_cost_ms * (1 + CONTROLNET_STEP_COST * 2) > 1.5 * plain_cost_ms
    assert [c["model"] for c in two["outputs"][0]["metadata"]["controlnets"]] == [CANNY, DEPTH]
    files2 = {**files, "in/depth.png": put(tmp_path, "in/depth2.png", scene().rotate(90))[1]}
    _, other = ok(worker, generate_message("other", str(tmp_path / "o"), controlnets=cns, **{**common, "files": files2}))
    assert (pixels(two["outputs"][0]) != pixels(other["outputs"][0])).any()  # the control image shapes the output


def test_controlnet_without_a_model_gets_the_first_of_its_type(worker, tmp_path):
    files = dict([put(tmp_path, "in/control.png", scene())])
    _, result = ok(worker, generate_message("g", str(tmp_path / "g"), width=64, height=64, files=files, controlnets=[controlnet("depth")]))
    assert result["outputs"][0]["metadata"]["controlnets"][0]["model"] == DEPTH


def test_canny_preprocessing_changes_what_conditions_the_image(tmp_path):
    b = load_backend("synthetic", Config(synthetic_step_ms=0, synthetic_load_ms_per_gb=0))
    files = dict([put(tmp_path, "in/control.png", scene())])
    outs = []
    for pre in (False, True):
        req = generate_message("g", str(tmp_path), width=160, height=120, files=files,
                               controlnets=[controlnet(model=CANNY, preprocess=pre, conditioning_scale=2)])["request"]
        outs.append(b.generate(req, str(tmp_path / str(pre)), lambda *a: None, threading.Event(), files=files).outputs[0])
    raw, edges = pixels(outs[0]), pixels(outs[1])
    assert (raw != edges).any()
    assert outs[1]["metadata"]["controlnets"][0]["preprocess"] is True


# -- img2img and inpainting -------------------------------------------------------------------

def test_img2img_strength_sets_steps_and_closeness_to_the_init(worker, tmp_path):
    files = dict([put(tmp_path, "in/init.jpg", scene(200, 150), "JPEG")])
    init = np.asarray(Image.open(files["in/init.jpg"]).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS), dtype=np.int16)
    diffs = {}
    for strength in (0.3, 0.9):
        before, result = ok(worker, generate_message(f"s{strength}", str(tmp_path / str(strength)), steps=10, width=128, height=128,
                                                     files=files, image={"init": {"s3_key": "in/init.jpg"}, "strength": strength}))
        assert [s for s in progress(before) if s[0] == "base"][-1] == ("base", int(10 * strength), int(10 * strength))
        assert result["outputs"][0]["metadata"]["strength"] == strength
        diffs[strength] = np.abs(pixels(result["outputs"][0]) - init).mean()
    assert diffs[0.3] < diffs[0.9] / 2


def test_inpainting_leaves_unmasked_pixels_exactly_as_the_resized_init(worker, tmp_path):
    mask = Image.new("L", (100, 80), 0)
    mask.paste(255, (50, 0, 100, 80))  # right half repainted (mask at another size than the init)
    files = dict([put(tmp_path, "in/init.png", scene(200, 150)), put(tmp_path, "in/mask.png", mask)])
    _, result = ok(worker, generate_message("inpaint", str(tmp_path / "i"), width=128, height=96, files=files,
                                            image={"init": {"s3_key": "in/init.png"}, "mask": {"s3_key": "in/mask.png"}, "strength": 1.0}))
    out = pixels(result["outputs"][0])
    init = np.asarray(scene(200, 150).resize((128, 96), Image.Resampling.LANCZOS), dtype=np.int16)
    keep = np.asarray(mask.resize((128, 96), Image.Resampling.LANCZOS)) < 128
    assert keep.any() and (~keep).any()
    assert np.array_equal(out[keep], init[keep])
    assert (out[~keep] != init[~keep]).any()
    assert result["outputs"][0]["metadata"]["inpaint"] is True


# -- post-processing --------------------------------------------------------------------------

def test_upscale_by_resampling_and_by_model(worker, tmp_path):
    before, x2 = ok(worker, generate_message("x2", str(tmp_path / "2"), width=96, height=64, postprocess={"upscale": {"factor": 2}, "safety_check": False}))
    [out] = x2["outputs"]
    assert (out["width"], out["height"]) == (192, 128) and Image.open(out["path"]).size == (192, 128)
    assert out["upscaled"] == {"factor": 2, "upscaler": "lanczos", "kind": "resample"}  # no ×2 model here
    assert progress(before)[-2:] == [("upscale", 0, 1), ("upscale", 1, 1)]
    before, x4 = ok(worker, generate_message("x4", str(tmp_path / "4"), width=96, height=64, postprocess={"upscale": {"factor": 4}, "safety_check": False}))
    [out4] = x4["outputs"]
    assert (out4["width"], out4["height"]) == (384, 256)
    assert out4["upscaled"] == {"factor": 4, "upscaler": ESRGAN, "kind": "model"}
    assert x4["loaded_models"] == [ESRGAN] and out4["metadata"]["upscale"]["kind"] == "model"
    _, lz4 = ok(worker, generate_message("lz4", str(tmp_path / "l"), width=96, height=64,
                                         postprocess={"upscale": {"factor": 4, "upscaler": "lanczos"}, "safety_check": False}))
    assert lz4["outputs"][0]["upscaled"]["kind"] == "resample"
    assert (pixels(lz4["outputs"][0]) != pixels(out4)).any()


def test_safety_verdicts(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_NSFW_WORD": "forbidden"})
    post = {"safety_check": True}
    before, flagged = ok(worker, generate_message("bad", str(tmp_path / "b"), width=64, height=64, num_images=2,
                                                  prompt="something forbidden", postprocess=post))
    assert [o["safety"] for o in flagged["outputs"]] == [{"checked": True, "nsfw": True, "checker": CHECKER}] * 2
    assert progress(before)[-2:] == [("safety", 0, 1), ("safety", 1, 1)]
    assert CHECKER in flagged["loaded_models"]
    _, clean = ok(worker, generate_message("good", str(tmp_path / "g"), width=64, height=64, postprocess=post))
    assert clean["outputs"][0]["safety"]["nsfw"] is False and clean["loaded_models"] == []
    _, unchecked = ok(worker, generate_message("none", str(tmp_path / "n"), width=64, height=64, prompt="forbidden"))
    assert unchecked["outputs"][0]["safety"] is None


# -- output files -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, ext, ctype", [("jpeg", ".jpg", "image/jpeg"), ("webp", ".webp", "image/webp")])
def test_jpeg_and_webp_outputs(worker, tmp_path, fmt, ext, ctype):
    _, result = ok(worker, generate_message("g", str(tmp_path), width=160, height=96, output={"format": fmt, "quality": 80, "embed_metadata": True}))
    [out] = result["outputs"]
    assert out["path"].endswith("/0" + ext) and out["content_type"] == ctype
    with Image.open(out["path"]) as img:
        assert img.format == fmt.upper() and img.size == (160, 96)
    meta = dict(out["metadata"])
    meta.pop("timings")
    assert read_metadata(out["path"]) == meta


def test_png_parameters_chunk_and_opting_out_of_embedding(worker, tmp_path):
    _, result = ok(worker, generate_message("g", str(tmp_path / "a"), width=64, height=64, seed=5,
                                            scheduler={"type": "DPMSolverMultistepScheduler", "steps": 3, "use_karras_sigmas": True}))
    with Image.open(result["outputs"][0]["path"]) as img:
        assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 5, Size: 64x64" in img.text["parameters"]
    _, bare = ok(worker, generate_message("h", str(tmp_path / "b"), width=64, height=64, seed=5,
                                          scheduler={"type": "DPMSolverMultistepScheduler", "steps": 3, "use_karras_sigmas": True},
                                          output={"format": "png", "quality": 90, "embed_metadata": False}))
    assert read_metadata(bare["outputs"][0]["path"]) is None
    assert bare["outputs"][0]["metadata"]["seed"] == 5  # still reported on the output
    assert (pixels(bare["outputs"][0]) == pixels(result["outputs"][0])).all()


def test_a_full_request_is_byte_identical_across_processes(spawn, tmp_path):
    files = dict([put(tmp_path, "in/control.png", scene()), put(tmp_path, "in/init.png", scene(64, 64))])
    def msg(i):
        return generate_message(f"g{i}", str(tmp_path / str(i)), width=128, height=128, num_images=2, files=files,
                                model={"base": SDXL, "vae": VAE}, loras=[{"name": PIXEL_ART, "weight": 0.8}],
                                controlnets=[controlnet(model=CANNY, preprocess=True)],
                                image={"init": {"s3_key": "in/init.png"}, "strength": 0.7},
                                postprocess={"upscale": {"factor": 2}, "safety_check": True},
                                output={"format": "webp", "quality": 85, "embed_metadata": True})
    hashes = []
    for i in range(2):
        _, result = ok(spawn(), msg(i))
        hashes.append([o["sha256"] for o in result["outputs"]])
    assert hashes[0] == hashes[1] and hashes[0][0] != hashes[0][1]


def test_every_input_that_shapes_an_image_changes_its_pixels(tmp_path):
    control = scene(64, 64)
    init = scene(64, 64).rotate(180)
    mask = Image.new("L", (64, 64), 255)
    base = generate_message("g", "/tmp", width=64, height=64, model={"base": SDXL, "refiner": REFINER, "vae": VAE},
                            refiner={"denoising_switch": 0.8}, loras=[{"name": PIXEL_ART, "weight": 1.0}])["request"]
    ref = render_image(base, 1)
    assert np.array_equal(ref, render_image(base, 1))

    def variant(**changes):
        req = {**base, **changes}
        return render_image(req, 1)

    changed = [
        render_image(base, 2),
        variant(model={**base["model"], "refiner": "other/refiner"}),
        variant(model={**base["model"], "vae": "other/vae"}),
        variant(refiner={"denoising_switch": 0.7}),
        variant(scheduler={"type": "EulerDiscreteScheduler", "steps": 4, "use_karras_sigmas": True}),
        variant(scheduler={"type": "EulerDiscreteScheduler", "steps": 4, "timestep_spacing": "trailing"}),
        variant(loras=[{"name": PIXEL_ART, "weight": 0.5}]),
        variant(loras=[{"name": WATERCOLOR, "weight": 1.0}]),
        variant(performance={**PERF, "dtype": "bf16"}),
        variant(conditioning={"prompt": "a lighthouse at dawn", "negative_prompt": "sharp"}),
    ]
    for i, other in enumerate(changed):
        assert not np.array_equal(ref, other), f"variant {i} did not change the pixels"

    plain = generate_message("g", "/tmp", width=64, height=64)["request"]
    cn = {**plain, "controlnets": [controlnet(model=CANNY)]}
    cn_ref = render_image(cn, 1, {"controlnets.0": control}, [CANNY])
    for other in [
        render_image(cn, 1, {"controlnets.0": control.rotate(90)}, [CANNY]),
        render_image({**cn, "controlnets": [controlnet(model=CANNY, conditioning_scale=0.5)]}, 1, {"controlnets.0": control}, [CANNY]),
        render_image({**cn, "controlnets": [controlnet(model=CANNY, guidance_end=0.5)]}, 1, {"controlnets.0": control}, [CANNY]),
        render_image(cn, 1, {"controlnets.0": control}, ["other/canny"]),
    ]:
        assert not np.array_equal(cn_ref, other)
    i2i = {**plain, "image": {"init": {"s3_key": "a"}, "strength": 0.5}}
    i2i_ref = render_image(i2i, 1, {"image.init": init})
    assert not np.array_equal(i2i_ref, render_image(i2i, 1, {"image.init": init.rotate(90)}))
    assert not np.array_equal(i2i_ref, render_image({**i2i, "image": {**i2i["image"], "strength": 0.6}}, 1, {"image.init": init}))
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    assert not np.array_equal(render_image(i2i, 1, {"image.init": init, "image.mask": mask}),
                              render_image(i2i, 1, {"image.init": init, "image.mask": half}))


# -- VRAM, costs and performance options ------------------------------------------------------

def test_a_suite_too_big_for_the_gpu_is_out_of_memory(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_VRAM_MB": "12000"})
    files = dict([put(tmp_path, "in/control.png", scene())])
    _, alone = ok(worker, generate_message("alone", str(tmp_path / "a"), width=512, height=512))
    _, err = worker.run(generate_message("big", str(tmp_path / "b"), width=512, height=512, files=files,
                                         controlnets=[controlnet(model=CANNY), controlnet("depth", model=DEPTH)]))
    assert err["error"]["code"] == "out_of_memory" and err["error"]["retryable"] is True
    assert "suite of 3 models (12000 MB)" in err["error"]["message"] and "12000 MB of VRAM" in err["error"]["message"]
    assert [r["name"] for r in err["state"]["resident"]] == [SDXL]  # nothing was evicted or loaded for it


def test_suite_members_are_evicted_least_recently_used_first(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_VRAM_MB": "14000"})
    files = dict([put(tmp_path, "in/control.png", scene())])
    ok(worker, generate_message("cn", str(tmp_path / "a"), width=64, height=64, files=files, controlnets=[controlnet(model=CANNY)]))
    before, result = ok(worker, generate_message("ref", str(tmp_path / "b"), width=64, height=64, model={"base": SDXL, "refiner": REFINER}))
    assert result["loaded_models"] == [REFINER]
    assert [r["name"] for r in result["state"]["resident"] if r["location"] == "vram"] == [SDXL, REFINER]
    assert [r["name"] for r in result["state"]["resident"] if r["location"] == "ram"] == [CANNY]  # kept warm
    assert any(m["type"] == "log" and f"evicted {CANNY}" in m["message"] for m in before)


def test_cpu_offload_and_slicing_cost_time_in_that_order(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "160"})  # 40 ms per step at 512²
    ok(worker, generate_message("warm", str(tmp_path / "w"), steps=1, width=64, height=64))
    times = {}
    for name, perf in [("none", PERF), ("slicing", {**PERF, "attention_slicing": True}),
                       ("model", {**PERF, "cpu_offload": "model"}), ("sequential", {**PERF, "cpu_offload": "sequential"})]:
        _, result = ok(worker, generate_message(name, str(tmp_path / name), steps=4, width=512, height=512, performance=perf))
        assert result["timings"]["inference_ms"] >= result["outputs"][0]["metadata"]["timings"]["base_ms"]
        times[name] = result["outputs"][0]["metadata"]["timings"]["base_ms"]
    assert times["none"] < times["slicing"] < times["model"] < times["sequential"]
    assert times["sequential"] > 3 * times["none"]


def test_compile_costs_once_per_base_model(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "5"})  # compile ≈ 100 steps = 500 ms
    perf = {**PERF, "compile": True}
    _, first = ok(worker, generate_message("a", str(tmp_path / "a"), steps=2, width=64, height=64, performance=perf))
    _, second = ok(worker, generate_message("b", str(tmp_path / "b"), steps=2, width=64, height=64, performance=perf))
    assert first["outputs"][0]["metadata"]["timings"]["compile_ms"] >= 400
    assert "compile_ms" not in second["outputs"][0]["metadata"]["timings"]
    assert first["timings"]["inference_ms"] > second["timings"]["inference_ms"] + 300


def test_bf16_is_refused_where_the_gpu_has_none(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_NO_BF16": "1"})
    assert worker.hello()["capabilities"]["dtypes"] == ["fp16", "fp32"]
    _, err = worker.run(generate_message("g", str(tmp_path), width=64, height=64, performance={**PERF, "dtype": "bf16"}))
    assert err["error"]["code"] == "invalid_request" and err["error"]["message"].startswith("performance.dtype: bf16")
    ok(worker, generate_message("g2", str(tmp_path), width=64, height=64, performance={**PERF, "dtype": "fp32"}))


def test_cancel_during_the_refiner_stage(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "40"})  # 10 ms per base step, so the refiner starts soon
    worker.send(generate_message("long", str(tmp_path), steps=50, width=512, height=512,
                                 model={"base": SDXL, "refiner": REFINER}, refiner={"denoising_switch": 0.5}))
    while True:
        msg = worker.recv()
        if msg["type"] == "progress" and msg["stage"] == "refiner" and msg["step"] == 1:
            worker.send({"v": 1, "type": "cancel", "id": "long"})
            break
    after, final = worker.until_final("long", timeout=3)
    assert final["error"]["code"] == "canceled"
    assert len([m for m in after if m["type"] == "progress" and m["stage"] == "refiner"]) <= 10  # of 50


# -- rejections -------------------------------------------------------------------------------

def _files_for(tmp_path):
    files = dict([put(tmp_path, "in/control.png", scene()), put(tmp_path, "in/init.png", scene())])
    bad = tmp_path / "inputs" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    files["in/corrupt.png"] = str(bad)
    return files


REJECTIONS = [
    # (overrides, code, message prefix)
    ({"model": {"base": "nobody/model"}}, "model_not_found", "model.base: no base model named 'nobody/model'"),
    ({"model": {"base": PIXEL_ART}}, "invalid_request", "model.base: 'kiln/lora-pixel-art' is a LoRA, not a base model"),
    ({"model": {"base": SDXL, "refiner": "nobody/refiner"}}, "model_not_found", "model.refiner:"),
    ({"model": {"base": SDXL, "refiner": SDXL}}, "invalid_request", "model.refiner:"),
    ({"model": {"base": SDXL, "vae": "nobody/vae"}}, "model_not_found", "model.vae:"),
    ({"model": {"base": SDXL, "vae": REFINER}}, "invalid_request", "model.vae:"),
    ({"loras": [{"name": PIXEL_ART, "weight": 1}, {"name": "nobody/lora", "weight": 1}]}, "model_not_found", "loras.1.name: no LoRA named 'nobody/lora'"),
    ({"loras": [{"name": VAE, "weight": 1}]}, "invalid_request", "loras.0.name:"),
    ({"loras": [{"name": PIXEL_ART, "weight": 1}, {"name": PIXEL_ART, "weight": 0.5}]}, "invalid_request", "loras:"),
    ({"controlnets": [controlnet(model="nobody/cn")]}, "model_not_found", "controlnets.0.model:"),
    ({"controlnets": [controlnet(model=DEPTH)]}, "invalid_request", "controlnets.0.model: 'diffusers/controlnet-depth-sdxl-1.0' is a depth ControlNet, not canny"),
    ({"controlnets": [controlnet(model=PIXEL_ART)]}, "invalid_request", "controlnets.0.model:"),
    ({"controlnets": [controlnet(key="in/missing.png")]}, "invalid_request", "controlnets.0.image.s3_key:"),
    ({"controlnets": [controlnet(key="in/corrupt.png")]}, "invalid_request", "controlnets.0.image: not a decodable image"),
    ({"controlnets": [controlnet("depth", preprocess=True)]}, "invalid_request", "controlnets.0.preprocess:"),
    ({"controlnets": [controlnet(guidance_start=0.6, guidance_end=0.4)]}, "invalid_request", "controlnets.0.guidance_end:"),
    ({"image": {"init": {"s3_key": "in/missing.png"}, "strength": 0.5}}, "invalid_request", "image.init.s3_key:"),
    ({"image": {"init": {"s3_key": "in/corrupt.png"}, "strength": 0.5}}, "invalid_request", "image.init: not a decodable image"),
    ({"image": {"init": {"s3_key": "in/init.png"}, "mask": {"s3_key": "in/corrupt.png"}, "strength": 0.5}}, "invalid_request", "image.mask:"),
    ({"image": {"init": {"s3_key": "in/init.png"}, "strength": 0.1}}, "invalid_request", "image.strength:"),
    ({"model": {"base": SDXL, "refiner": REFINER}, "image": {"init": {"s3_key": "in/init.png"}, "strength": 0.5}}, "invalid_request", "model.refiner:"),
    ({"refiner": {"denoising_switch": 0.8}}, "invalid_request", "refiner:"),
    ({"postprocess": {"upscale": {"factor": 2, "upscaler": "nobody/esrgan"}, "safety_check": False}}, "model_not_found", "postprocess.upscale.upscaler:"),
    ({"postprocess": {"upscale": {"factor": 2, "upscaler": CANNY}, "safety_check": False}}, "invalid_request", "postprocess.upscale.upscaler:"),
    ({"scheduler": {"type": "DDIMScheduler", "steps": 4, "use_karras_sigmas": True}}, "invalid_request", "scheduler.use_karras_sigmas:"),
    ({"scheduler": {"type": "EulerDiscreteScheduler", "steps": 4, "solver_order": 2}}, "invalid_request", "scheduler.solver_order:"),
]


@pytest.mark.parametrize("overrides, code, prefix", REJECTIONS, ids=[r[2].split(":")[0] + "-" + r[1] for r in REJECTIONS])
def test_rejections_name_the_field(tmp_path, overrides, code, prefix):
    b = load_backend("synthetic", Config(synthetic_step_ms=0, synthetic_load_ms_per_gb=0))
    files = _files_for(tmp_path)
    req = generate_message("g", str(tmp_path), width=64, height=64, files=files, **overrides)["request"]
    with pytest.raises(WorkerError) as info:
        b.generate(req, str(tmp_path / "out"), lambda *a: None, threading.Event(), files=files)
    assert (info.value.code, info.value.message[: len(prefix)]) == (code, prefix), info.value.message
    assert b.state()["resident"] == []  # refused before anything was loaded
    assert not (tmp_path / "out").exists()


def test_rejections_reach_the_agent_as_error_frames(worker, tmp_path):
    files = _files_for(tmp_path)
    _, err = worker.run(generate_message("g", str(tmp_path), width=64, height=64, files=files,
                                         image={"init": {"s3_key": "in/corrupt.png"}, "strength": 0.5}))
    assert err["type"] == "error" and err["error"] == {
        "code": "invalid_request", "retryable": False, "message": err["error"]["message"]}
    assert err["error"]["message"].startswith("image.init: not a decodable image")
    _, err = worker.run(generate_message("h", str(tmp_path), width=64, height=64, loras=[{"name": "nobody/lora", "weight": 1}]))
    assert err["error"]["code"] == "model_not_found" and not err["error"]["retryable"]

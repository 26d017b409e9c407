"""Tiny random SDXL pipelines through the diffusers APIs the diffusers backend relies on.

Runs on CPU, fully offline (components built by diffusers_support.tiny_sdxl). Skipped where diffusers
is not installed (the project venv); run it in an environment that has diffusers.
"""

from __future__ import annotations

import os
import sys

import pytest

from conftest import import_diffusers_or_skip  # noqa: E402

import_diffusers_or_skip()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from diffusers import (  # noqa: E402
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

sys.path.insert(0, os.path.dirname(__file__))
from diffusers_support.tiny_sdxl import (  # noqa: E402
    build_tiny_controlnet,
    build_tiny_lora,
    build_tiny_refiner,
    build_tiny_sdxl,
)

SIDE = 64
STEPS = 2
PROMPT = "a lighthouse on a cliff at dusk"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def run(pipe, prompt=PROMPT, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    if "generator" not in kw:
        kw["generator"] = gen(seed)
    if "image" not in kw or isinstance(pipe, StableDiffusionXLControlNetPipeline):
        kw.setdefault("height", SIDE)
        kw.setdefault("width", SIDE)
    return pipe(prompt=prompt, **kw).images


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    base = build_tiny_sdxl(d)
    return {
        "base": base,
        "refiner": build_tiny_refiner(d),
        "controlnets": [build_tiny_controlnet(d, base, seed=0), build_tiny_controlnet(d, base, seed=1)],
        "lora": build_tiny_lora(d, base),
    }


def load_base(path):
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


@pytest.fixture(scope="module")
def pipe(tiny):
    return load_base(tiny["base"])


def test_text_to_image_pil_and_np(pipe):
    assert pipe.watermark is None
    assert pipe.vae_scale_factor == 2
    images = run(pipe, output_type="pil")
    assert len(images) == 1 and isinstance(images[0], Image.Image)
    assert images[0].size == (SIDE, SIDE) and images[0].mode == "RGB"
    arr = run(pipe)  # output_type="np": float32 NHWC in [0, 1]
    assert arr.shape == (1, SIDE, SIDE, 3) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    # same seed, same image; "pil" is the "np" output rounded to uint8
    np.testing.assert_allclose(np.asarray(images[0], dtype=np.float32) / 255.0, arr[0], atol=1 / 255 + 1e-6)
    assert np.array_equal(arr, run(pipe))


# A1111 names -> diffusers (table in diffusers docs/source/en/api/schedulers/overview.md)
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    "unipc_trailing": ("UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
    "ddim": ("DDIMScheduler", {}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_swap_from_config(pipe, name):
    import diffusers

    cls_name, opts = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    # from_config silently drops options a class does not take; check them against its __init__ keys
    assert set(opts) <= set(cls._get_init_keys(cls))
    assert cls in pipe.scheduler.compatibles
    original = pipe.scheduler
    try:
        pipe.scheduler = cls.from_config(original.config, **opts)
        for k, v in opts.items():
            assert pipe.scheduler.config[k] == v
        out = run(pipe, num_inference_steps=4)
        assert out.shape == (1, SIDE, SIDE, 3) and np.isfinite(out).all()
    finally:
        pipe.scheduler = original


def test_generator_list_matches_single_image_runs(pipe):
    s = 1234
    batch = run(pipe, seed=None, generator=[gen(s), gen(s + 1)], num_images_per_prompt=2)
    assert batch.shape[0] == 2
    for i in range(2):
        single = run(pipe, seed=s + i)[0]
        # batched vs single forward passes may differ in the last float bits on CPU
        np.testing.assert_allclose(batch[i], single, atol=1e-4)
    assert not np.allclose(batch[0], batch[1])


def test_different_prompts_give_different_images(pipe):
    a = run(pipe, prompt="a red apple", seed=7)
    b = run(pipe, prompt="a blue whale", seed=7)
    assert np.abs(a - b).max() > 1e-3


def test_callback_interrupt_stops_early(pipe):
    seen = []

    def on_step_end(p, i, t, kwargs):
        seen.append(i)
        if i == 1:
            p._interrupt = True
        return kwargs

    images = run(pipe, num_inference_steps=6, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    # remaining steps are skipped (no callback for them), the latents are still decoded
    assert seen == [0, 1]
    assert images.shape == (1, SIDE, SIDE, 3)
    # the flag is reset at the start of the next call
    assert run(pipe, num_inference_steps=2).shape == (1, SIDE, SIDE, 3)
    assert pipe.interrupt is False

    class Stop(Exception):
        pass

    def raise_at_0(p, i, t, kwargs):
        raise Stop

    with pytest.raises(Stop):
        run(pipe, num_inference_steps=6, callback_on_step_end=raise_at_0)


def test_base_plus_refiner_ensemble_of_experts(pipe, tiny):
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny["refiner"],
        text_encoder_2=pipe.text_encoder_2,
        vae=pipe.vae,
        local_files_only=True,
        add_watermarker=False,
    )
    refiner.set_progress_bar_config(disable=True)
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    latents = run(pipe, num_inference_steps=4, denoising_end=0.5, output_type="latent")
    assert latents.shape == (1, 4, SIDE // 2, SIDE // 2)
    image = refiner(
        prompt=PROMPT, image=latents, num_inference_steps=4, denoising_start=0.5, output_type="np", generator=gen(0)
    ).images
    assert image.shape == (1, SIDE, SIDE, 3)


def test_img2img_and_inpaint_from_pipe(pipe):
    init = Image.fromarray((np.random.RandomState(0).rand(SIDE, SIDE, 3) * 255).astype("uint8"))
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    assert img2img.unet is pipe.unet and img2img.vae is pipe.vae
    out = img2img(prompt=PROMPT, image=init, strength=0.5, num_inference_steps=4, output_type="np", generator=gen(0)).images
    assert out.shape == (1, SIDE, SIDE, 3)

    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
    out = inpaint(
        prompt=PROMPT,
        image=init,
        mask_image=mask,
        height=SIDE,
        width=SIDE,
        strength=0.9,
        num_inference_steps=4,
        output_type="np",
        generator=gen(0),
    ).images
    assert out.shape == (1, SIDE, SIDE, 3)


def test_lora_changes_output(tiny):
    pipe = load_base(tiny["base"])
    before = run(pipe, seed=3)
    pipe.load_lora_weights(tiny["lora"], adapter_name="tiny_style")
    assert pipe.get_list_adapters() == {"unet": ["tiny_style"]}
    pipe.set_adapters(["tiny_style"], adapter_weights=[1.0])
    assert pipe.get_active_adapters() == ["tiny_style"]
    with_lora = run(pipe, seed=3)
    assert np.abs(before - with_lora).max() > 1e-3
    pipe.set_adapters(["tiny_style"], adapter_weights=[0.0])
    np.testing.assert_allclose(run(pipe, seed=3), before, atol=1e-4)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(run(pipe, seed=3), before, atol=1e-5)


def test_multi_controlnet(pipe, tiny):
    cns = [ControlNetModel.from_pretrained(p, local_files_only=True) for p in tiny["controlnets"]]
    cpipe = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=cns)
    cpipe.set_progress_bar_config(disable=True)
    assert type(cpipe.controlnet).__name__ == "MultiControlNetModel"
    cond = [Image.fromarray((np.random.RandomState(i).rand(SIDE, SIDE, 3) * 255).astype("uint8")) for i in range(2)]
    out = run(cpipe, seed=5, image=cond, controlnet_conditioning_scale=[1.0, 0.5])
    assert out.shape == (1, SIDE, SIDE, 3)
    off = run(cpipe, seed=5, image=cond, controlnet_conditioning_scale=[0.0, 0.0])
    np.testing.assert_allclose(off, run(pipe, seed=5), atol=1e-4)
    assert np.abs(out - off).max() > 1e-4

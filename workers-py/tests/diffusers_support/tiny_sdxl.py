"""Tiny random SDXL components, built fully offline and saved as diffusers folders.

The shapes mirror the dummy components of diffusers' own fast tests
(tests/pipelines/stable_diffusion_xl/*, tests/pipelines/controlnet/test_controlnet_sdxl.py) but the
tokenizer is made here (no hub download): a character-level CLIP BPE vocabulary with no merges,
so different prompts give different token ids.

Every builder is deterministic (seeds fixed with torch.manual_seed) and returns a path on disk:

    build_tiny_sdxl(tmpdir)                    -> "<tmpdir>/tiny-sdxl"           (StableDiffusionXLPipeline)
    build_tiny_refiner(tmpdir)                 -> "<tmpdir>/tiny-sdxl-refiner"   (StableDiffusionXLImg2ImgPipeline)
    build_tiny_controlnet(tmpdir, unet_path)   -> "<tmpdir>/tiny-controlnet[-N]" (ControlNetModel.from_unet)
    build_tiny_lora(tmpdir, pipeline_path)     -> "<tmpdir>/tiny-lora[-N]/pytorch_lora_weights.safetensors"
    build_tiny_safety_checker(tmpdir)          -> "<tmpdir>/tiny-safety-checker[-N]" (StableDiffusionSafetyChecker + processor)
    build_tiny_esrgan(tmpdir)                  -> "<tmpdir>/tiny-esrgan-x4.safetensors" (Real-ESRGAN RRDBNet keys)
    build_tiny_taesd(tmpdir)                   -> "<tmpdir>/tiny-taesd[-N]"      (AutoencoderTiny, the tiny VAE's 2× scale)
"""

from __future__ import annotations

import json
import os

import torch

# CLIP special tokens; ids follow the 512 byte tokens.
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 512
EOS_ID = 513
VOCAB_SIZE = 1000  # >= 514 tokens; the extra rows are unused, as in diffusers' dummy configs
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (same as transformers' CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_char_tokenizer(directory: str) -> str:
    """Write vocab.json / merges.txt for a character-level CLIPTokenizer and save it properly."""
    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
    vocab[BOS] = BOS_ID
    vocab[EOS] = EOS_ID
    vocab_file = os.path.join(directory, "vocab.json")
    merges_file = os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # header only: no merges
    tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS)
    tok.save_pretrained(directory)
    return directory


def _tokenizer(tmp: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_char_tokenizer(tmp), local_files_only=True)


def _text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # != 2, so the pooled output is taken at the EOS token
        pad_token_id=EOS_ID,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=VOCAB_SIZE,
        hidden_act="gelu",
        projection_dim=32,
        max_position_embeddings=MODEL_MAX_LENGTH,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )


def _unet(projection_dim: int, cross_attention_dim: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=projection_dim,
        cross_attention_dim=cross_attention_dim,
    )


def build_tiny_sdxl(tmpdir) -> str:
    """Tiny SDXL base (two text encoders, 64-dim cross attention, VAE scale factor 2): 64x64 -> 32x32 latents."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = os.path.join(str(tmpdir), "tiny-sdxl")
    unet = _unet(projection_dim=80, cross_attention_dim=64)  # 6 time ids * 8 + 32 pooled
    vae = _vae()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    tok_dir = os.path.join(str(tmpdir), "tiny-tokenizer")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(tok_dir),
        tokenizer_2=_tokenizer(tok_dir),
        unet=unet,
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_refiner(tmpdir) -> str:
    """Tiny SDXL refiner: text_encoder_2 only (32-dim cross attention), aesthetic-score time ids.

    Its text_encoder_2 and VAE have the same configs as build_tiny_sdxl's, so a test may swap in the
    base's modules (ensemble of experts shares text_encoder_2 and vae).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTextModelWithProjection

    out = os.path.join(str(tmpdir), "tiny-sdxl-refiner")
    unet = _unet(projection_dim=72, cross_attention_dim=32)  # 5 time ids * 8 + 32 pooled
    vae = _vae()
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=_tokenizer(os.path.join(str(tmpdir), "tiny-tokenizer")),
        unet=unet,
        scheduler=_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _unique_dir(tmpdir, stem: str) -> str:
    base = os.path.join(str(tmpdir), stem)
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def build_tiny_controlnet(tmpdir, unet_path: str, seed: int = 0) -> str:
    """ControlNetModel.from_unet of the tiny UNet (a pipeline folder or its unet/ subfolder), with
    non-zero output convolutions (the zero-init ones would make the ControlNet a no-op)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    sub = os.path.join(unet_path, "unet")
    if os.path.isdir(sub):
        unet_path = sub
    unet = UNet2DConditionModel.from_pretrained(unet_path, local_files_only=True)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            m.weight.normal_(0.0, 0.02, generator=gen)
            m.bias.fill_(0.01)
    out = _unique_dir(tmpdir, "tiny-controlnet")
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_lora(tmpdir, pipeline_path: str, rank: int = 4, seed: int = 0) -> str:
    """A UNet LoRA (to_q/to_k/to_v/to_out.0, random A and non-zero B) for the tiny SDXL, saved in
    diffusers/kohya-free format with StableDiffusionXLPipeline.save_lora_weights. Returns the file."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipeline_path, subfolder="unet", local_files_only=True)
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,  # peft: B is random too (the default would zero it)
        )
    )
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any("lora" in k for k in state) and all(t.abs().sum() > 0 for k, t in state.items() if "lora_B" in k or "lora.up" in k)
    out = _unique_dir(tmpdir, "tiny-lora")
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


def build_tiny_safety_checker(tmpdir) -> str:
    """A tiny random StableDiffusionSafetyChecker (CLIP vision 32×32, patch 8) with its
    CLIPImageProcessor, saved as the folder MODELS_DIR/safety_checker/<name>/ holds."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "vocab_size": VOCAB_SIZE, "max_position_embeddings": MODEL_MAX_LENGTH,
                     "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config)
    out = _unique_dir(tmpdir, "tiny-safety-checker")
    checker.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def build_tiny_esrgan(tmpdir, scale: int = 4, num_feat: int = 8, num_block: int = 1, seed: int = 0) -> str:
    """A tiny randomly initialised Real-ESRGAN RRDBNet (×4: two nearest-neighbour + conv upsamples),
    saved as `<tmpdir>/tiny-esrgan-x<scale>.safetensors` with the key names of Real-ESRGAN's own
    RealESRGAN_x4plus weights (conv_first, body.<i>.rdb<j>.conv<k>, conv_body, conv_up1/2,
    conv_hr, conv_last), which spandrel recognises as ESRGAN. Built from shapes alone, so the
    file does not depend on spandrel's own classes. The growth channels stay 32, as in every
    released ESRGAN (spandrel assumes it)."""
    from safetensors.torch import save_file

    if scale != 4:
        raise ValueError("only ×4 (Real-ESRGAN's plain RRDBNet layout) is built here")
    num_grow = 32
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int) -> None:
        tensors[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (0.5 / (cin * 9) ** 0.5)
        tensors[f"{name}.bias"] = torch.zeros(cout)

    conv("conv_first", 3, num_feat)
    for b in range(num_block):
        for r in (1, 2, 3):
            for k in range(1, 5):
                conv(f"body.{b}.rdb{r}.conv{k}", num_feat + (k - 1) * num_grow, num_grow)
            conv(f"body.{b}.rdb{r}.conv5", num_feat + 4 * num_grow, num_feat)
    conv("conv_body", num_feat, num_feat)
    conv("conv_up1", num_feat, num_feat)
    conv("conv_up2", num_feat, num_feat)
    conv("conv_hr", num_feat, num_feat)
    conv("conv_last", num_feat, 3)
    tensors["conv_last.bias"] = torch.full((3,), 0.5)  # mid-grey plus the network's detail
    os.makedirs(str(tmpdir), exist_ok=True)
    out = os.path.join(str(tmpdir), f"tiny-esrgan-x{scale}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    return out


def build_tiny_taesd(tmpdir, seed: int = 0) -> str:
    """A random AutoencoderTiny (what madebyollin/taesdxl is) for the tiny VAE's latents: 4
    channels, one 2× upsampling (the tiny VAE's scale), as previews decode with it."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    path = _unique_dir(tmpdir, "tiny-taesd")
    model.save_pretrained(path)
    return path

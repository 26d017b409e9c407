"""SDXL LoRA fine-tuning on a resident base pipeline, following diffusers'
examples/text_to_image/train_text_to_image_lora_sdxl.py.

The recipe: VAE, text encoders and UNet frozen; a peft LoRA adapter (`LoraConfig(r=rank,
lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=to_k/to_q/to_v/to_out.0)`)
on the UNet, and on both text encoders (q/k/v/out_proj) with `train_text_encoder`; AdamW on the
LoRA parameters (float32) at the request's learning rate. Each optimizer step takes
`gradient_accumulation` micro-batches of `batch_size` images: resized (shorter side) and
center-cropped to `resolution`, VAE-encoded × scaling_factor, noised at random timesteps by a
DDPMScheduler built from the pipeline's scheduler config, with SDXL's added conditions (time ids =
original size + crop top-left + target size; pooled text embeds from text_encoder_2); MSE against
the noise (epsilon) or the velocity (v_prediction).

Determinism: every random draw of step s (which images, latent sample, noise, timesteps) comes from
a CPU generator seeded by (seed, s), and the image order of every epoch from (seed, epoch), so step
s sees the same data and noise whether the run started at 0 or resumed at s − 1. The LoRA starts
from `torch.manual_seed(seed)` (gaussian A, zero B, as peft initialises it).

Resume, what is and is not bit-identical (CPU, same torch build): the checkpoint holds the LoRA
weights exactly (float32), and step s's data/noise/timesteps do not depend on where the run
started, so the checkpoint of step k and the loss of step k + 1 match the uninterrupted run. The
AdamW moments (exp_avg, exp_avg_sq, step count) are NOT in the checkpoint (it must stay a plain
diffusers LoRA file, loadable by `load_lora_weights`), so they restart from zero on resume and the
weights after step k + 1, later losses and the final file differ slightly from an uninterrupted
run. On CUDA even an uninterrupted run is not bit-reproducible (non-deterministic kernels, fp16
autocast).

The adapter is added to the resident pipeline's own modules under the name `kiln_train` (no copy
of the base weights) and deleted afterwards, with the optimizer, so the pipeline is as it was.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ...errors import WorkerError
from ...training import TrainingSpec

ADAPTER = "kiln_train"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FORMAT = "kiln-diffusers-lora"


@dataclass(frozen=True)
class RunSpec(TrainingSpec):
    """The diffusers run; its checkpoints carry the keys a resume must match."""

    def resume_keys(self) -> dict[str, str]:
        """Metadata a checkpoint must carry unchanged to be continued (training.read_resume)."""
        return {"kiln_format": FORMAT, "base_model": self.base_model, "rank": str(self.rank), "alpha": repr(self.alpha), "run": self.run_id}


def _seeded(*parts: int):
    import torch

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))


def _load_pixels(path: str, resolution: int):
    """(pixels [3, r, r] in -1..1, original (h, w), crop top-left (y, x)) as the example script."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        original = (im.height, im.width)
        scale = resolution / min(im.width, im.height)
        w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
        im = im.resize((w, h), Image.LANCZOS)
        y1 = max(0, int(round((h - resolution) / 2.0)))
        x1 = max(0, int(round((w - resolution) / 2.0)))
        im = im.crop((x1, y1, x1 + resolution, y1 + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), original, (y1, x1)


class LoraTrainer:
    """One training run on `pipe` (a resident StableDiffusionXLPipeline)."""

    def __init__(self, pipe: Any, scheduler_config: dict, spec: RunSpec, items: list, device: str, log: Callable[[str, str], None]):
        import torch
        from diffusers import DDPMScheduler

        self.torch = torch
        self.pipe = pipe
        self.spec = spec
        self.items = items
        self.device = device
        self.log = log
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.unet = pipe.unet
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        self.weight_dtype = self.unet.dtype
        self.vae = pipe.vae
        self._vae_dtype = self.vae.dtype
        self._grad_state: list[tuple[Any, bool]] = []
        self._setup()

    # -- set up and tear down -----------------------------------------------------------------

    def _setup(self) -> None:
        from peft import LoraConfig

        torch = self.torch
        spec = self.spec
        for module in [self.unet, self.vae, *self.text_encoders]:
            for p in module.parameters():
                self._grad_state.append((p, p.requires_grad))
            module.requires_grad_(False)
        # the fp16 SDXL VAE overflows when encoding; upcast it for the run, as the pipeline does to decode
        if self._vae_dtype != torch.float32 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)
        torch.manual_seed(spec.seed)  # peft's gaussian init of lora_A draws from the global generator
        self.unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS), adapter_name=ADAPTER)
        self.unet.set_adapter(ADAPTER)
        self.unet.enable_adapters()
        self.modules = {"unet": self.unet}
        if spec.train_text_encoder:
            for name, te in zip(("text_encoder", "text_encoder_2"), self.text_encoders):
                te.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=TEXT_TARGETS), adapter_name=ADAPTER)
                te.set_adapter(ADAPTER)
                self.modules[name] = te
        self.params = []
        for module in self.modules.values():
            for n, p in module.named_parameters():
                if ADAPTER in n and "lora" in n:
                    p.data = p.data.to(torch.float32)  # trainable LoRA weights in float32 (cast_training_params)
                    p.requires_grad_(True)
                    self.params.append(p)
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def close(self) -> None:
        """Remove the adapter and free the optimizer: the shared pipeline is as before."""
        torch = self.torch
        self.optimizer = None
        self.params = []
        for name, module in self.modules.items():
            try:
                if name == "unet":
                    module.delete_adapters(ADAPTER)
                else:
                    module.delete_adapter(ADAPTER)
            except Exception as exc:  # never leave the worker broken because of cleanup
                self.log("warning", f"could not remove the training adapter from {name}: {exc}")
        for p, flag in self._grad_state:
            p.requires_grad_(flag)
        self._grad_state = []
        if self.vae.dtype != self._vae_dtype:
            self.vae.to(self._vae_dtype)
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # -- the LoRA state (diffusers format, as StableDiffusionXLPipeline.save_lora_weights) ------

    def state_dict(self) -> dict:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out: dict = {}
        for prefix, module in self.modules.items():
            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(module, adapter_name=ADAPTER))
            out.update({f"{prefix}.{k}": v.detach().to("cpu", self.torch.float32).contiguous() for k, v in layers.items()})
        return out

    def adapter_metadata(self) -> str:
        """`lora_adapter_metadata` as diffusers writes it: each module's LoraConfig under its prefix."""
        meta: dict = {}
        for prefix, module in self.modules.items():
            cfg = module.peft_config[ADAPTER].to_dict()
            meta.update({f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()})
        return json.dumps(meta, indent=2, sort_keys=True, default=str)

    def load_state_dict(self, tensors: dict) -> None:
        """Continue from a checkpoint written by state_dict (numpy or torch tensors)."""
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        torch = self.torch
        full = {k: torch.as_tensor(v) for k, v in tensors.items()}
        expected = set(self.state_dict())
        if set(full) != expected:
            raise ValueError(f"its tensors do not match this run ({len(set(full) ^ expected)} keys differ)")
        for prefix, module in self.modules.items():
            part = {k[len(prefix) + 1:]: v for k, v in full.items() if k.startswith(prefix + ".")}
            if prefix == "unet":
                part = convert_unet_state_dict_to_peft(part)
            else:
                part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"unexpected keys for {prefix}: {unexpected[:3]}")
        for p in self.params:  # set_peft_model_state_dict copies in place; keep them float32 and trainable
            p.data = p.data.to(torch.float32)

    # -- one optimizer step -------------------------------------------------------------------

    def _indices(self, step: int) -> list[int]:
        """Dataset indices of step `step`'s samples: epoch-wise permutations from (seed, epoch)."""
        torch = self.torch
        n = len(self.items)
        per_step = self.spec.batch_size * self.spec.gradient_accumulation
        out = []
        orders: dict[int, list[int]] = {}
        for pos in range((step - 1) * per_step, step * per_step):
            epoch, offset = divmod(pos, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=_seeded(self.spec.seed, "epoch", epoch)).tolist()
            out.append(orders[epoch][offset])
        return out

    def _encode_prompts(self, captions: list[str], train_te: bool):
        torch = self.torch
        embeds = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            with torch.set_grad_enabled(train_te):
                out = encoder(ids.to(self.device), output_hidden_states=True, return_dict=True)
            pooled = out[0]  # the last (text_encoder_2) encoder's projected pooled output
            embeds.append(out.hidden_states[-2])
        prompt_embeds = torch.cat(embeds, dim=-1)
        return prompt_embeds, pooled.view(pooled.shape[0], -1)

    def step(self, step: int, cancel_event: threading.Event) -> float:
        """Run optimizer step `step` (1-based); the mean loss over its micro-batches."""
        torch = self.torch
        spec = self.spec
        gen = _seeded(spec.seed, "step", step)
        indices = self._indices(step)
        accum = spec.gradient_accumulation
        cuda = self.device.startswith("cuda")
        autocast = torch.autocast("cuda", dtype=self.weight_dtype) if cuda and self.weight_dtype != torch.float32 else _null()
        total = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            if cancel_event.is_set():
                raise WorkerError("canceled", "canceled by the agent")
            batch = [self.items[i] for i in indices[micro * spec.batch_size:(micro + 1) * spec.batch_size]]
            loaded = [_load_pixels(item.path, spec.resolution) for item in batch]
            pixels = torch.stack([p for p, _, _ in loaded]).to(self.device, self.vae.dtype)
            with torch.no_grad():
                dist = self.vae.encode(pixels).latent_dist
                sample = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(self.device, dist.mean.dtype)
                latents = (dist.mean + dist.std * sample) * self.vae.config.scaling_factor
            latents = latents.to(self.weight_dtype)
            noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(self.device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            time_ids = torch.tensor([list(orig + crop + (spec.resolution, spec.resolution)) for _, orig, crop in loaded],
                                    device=self.device, dtype=self.weight_dtype)
            with autocast:
                prompt_embeds, pooled = self._encode_prompts([item.caption for item in batch], spec.train_text_encoder)
                pred = self.unet(noisy, timesteps, prompt_embeds.to(self.weight_dtype),
                                 added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled.to(self.weight_dtype)}, return_dict=False)[0]
            kind = self.noise_scheduler.config.prediction_type
            if kind == "epsilon":
                target = noise
            elif kind == "v_prediction":
                target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise WorkerError("internal", f"unsupported prediction_type {kind!r} in the base model's scheduler config")
            loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
            (loss / accum).backward()
            total += float(loss.detach().item())
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = total / accum
        if not math.isfinite(value):
            raise WorkerError("internal", f"training diverged at step {step} (loss {value}); try a lower learning_rate")
        return value


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def save_lora(path: str, tensors: dict, metadata: dict[str, str]) -> None:
    """Atomically (tmp + fsync + os.replace) write the float32 LoRA tensors.

    kiln_worker.safetensors_io rather than safetensors.torch.save_file: the latter writes the
    `__metadata__` map in hash order, so the same weights could give different bytes (and sha256)
    from run to run; this writer sorts keys and tensors, so equal weights give equal files. Both
    are plain safetensors that `load_lora_weights` and `safetensors.torch.load_file` read.
    """
    from ... import safetensors_io

    safetensors_io.write_atomic(path, {k: v.detach().to("cpu").float().numpy() for k, v in tensors.items()}, metadata)

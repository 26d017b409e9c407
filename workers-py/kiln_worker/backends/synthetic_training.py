"""The synthetic backend's LoRA fine-tune: a deterministic loss curve and weights that evolve step
by step, so checkpoints, resume and the final file behave like a real trainer's.

- The run's identity is (base model, seed, dataset digest, learning rate, rank, alpha, resolution,
  batch size, gradient accumulation, text encoder); `run_id` is its digest, stored in every file.
- Loss at step s: floor + (start − floor)·exp(−s/τ), times 1 ± 4% noise; start, floor and the
  noise come from the identity, τ shrinks as the learning rate grows. A pure function of s, so a
  resumed run reports the same curve.
- Weights: lora_A starts small and random, lora_B at zero (as PEFT initialises them); every step
  adds lr-scaled float32 noise drawn from (identity, step). Step s depends only on the weights
  of step s − 1, which a checkpoint holds exactly, so resuming from any checkpoint gives the same
  bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
from ..training import TrainingSpec

FEATURES = 64  # the synthetic layers' width: lora_A is [rank, 64], lora_B is [64, rank]
UNET_BLOCKS = ("down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0")
UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
FORMAT = "kiln-synthetic-lora"


def module_names(train_text_encoder: bool) -> list[str]:
    """The LoRA target modules, named as diffusers (PEFT) names them."""
    names = [f"unet.{block}.transformer_blocks.0.{attn}.{proj}" for block in UNET_BLOCKS for attn in ("attn1", "attn2") for proj in UNET_PROJECTIONS]
    if train_text_encoder:
        names += [f"text_encoder.text_model.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in TEXT_PROJECTIONS]
    return sorted(names)


@dataclass(frozen=True)
class Run(TrainingSpec):
    """The synthetic run: a deterministic loss curve and weights from the spec."""

    def _unit(self, *parts: object) -> float:
        """A uniform number in [0, 1) from the run and `parts`."""
        digest = hashlib.sha256(("/".join([self.run_id, *map(str, parts)])).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _rng(self, *parts: object) -> np.random.Generator:
        digest = hashlib.sha256(("/".join([self.run_id, *map(str, parts)])).encode("utf-8")).digest()
        return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "big")))

    # -- the loss curve ---------------------------------------------------------------------

    def loss(self, step: int) -> float:
        start = 0.16 + 0.08 * self._unit("start")
        floor = 0.03 + 0.04 * self._unit("floor") * 16 / (16 + self.rank)  # more rank fits a little closer
        tau = min(1e6, max(3.0, 100.0 / math.sqrt(self.learning_rate / 1e-4)))
        clean = floor + (start - floor) * math.exp(-step / tau)
        return round(clean * (1.0 + 0.08 * (self._unit("noise", step) - 0.5)), 6)

    # -- the weights --------------------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for module in module_names(self.train_text_encoder):
            out[f"{module}.lora_A.weight"] = (self.rank, FEATURES)
            out[f"{module}.lora_B.weight"] = (FEATURES, self.rank)
        return out

    def initial(self) -> dict[str, np.ndarray]:
        rng = self._rng("init")
        weights: dict[str, np.ndarray] = {}
        for key, shape in sorted(self.shapes().items()):
            if key.endswith("lora_A.weight"):
                weights[key] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / self.rank)).astype(np.float32)
            else:
                weights[key] = np.zeros(shape, dtype=np.float32)
        return weights

    def step(self, weights: dict[str, np.ndarray], step: int) -> None:
        """Advance `weights` (in place) from step − 1 to `step`."""
        rng = self._rng("step", step)
        scale = np.float32(self.learning_rate * 10.0)
        for key in sorted(weights):
            weights[key] += scale * rng.standard_normal(weights[key].shape, dtype=np.float32)

    def fits(self, weights: dict[str, np.ndarray]) -> bool:
        """True when `weights` has exactly this run's tensors (a checkpoint we can continue)."""
        shapes = self.shapes()
        return set(weights) == set(shapes) and all(tuple(weights[k].shape) == shapes[k] for k in shapes)

    def metadata(self, step: int) -> dict[str, str]:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "name": self.name,
            "rank": str(self.rank),
            "alpha": repr(self.alpha),
            "step": str(step),
            "run": self.run_id,
        }

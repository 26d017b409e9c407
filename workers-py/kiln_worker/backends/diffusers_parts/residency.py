"""Which models are loaded, where, and what goes when room is needed.

A resident is one catalog model in memory: a base pipeline (all its components), a refiner's UNet
(its text_encoder_2 and VAE are the base's, as in diffusers' ensemble of experts), a VAE, a
ControlNet, a safety checker, or a LoRA (a named adapter inside one base pipeline; it lives and
moves with that base). Every resident has an estimated size (catalog parameters × dtype bytes),
a location ("vram" on the device, "ram" warm in host memory) and a last use.

`ensure()` makes a request's suite resident on the device, evicting least recently used models
that the request does not need: to host RAM when the RAM budget and MemAvailable allow (a later
request moves them back without reading the disk), else deleted (then `torch.cuda.empty_cache()`).
On a CPU-only worker the device is host memory, so eviction always deletes.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from ...errors import WorkerError
from .catalog import ModelEntry
from .settings import available_ram_mb

log = logging.getLogger("kiln_worker.diffusers.residency")

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
RAM_HEADROOM_MB = 2048  # never fill host RAM past MemAvailable minus this when keeping models warm


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def adapter_name(lora: str) -> str:
    """A peft adapter name for a LoRA (module keys cannot hold '.', '/' or '-'), unique per name."""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", lora)[:48]
    return f"{slug}_{hashlib.sha256(lora.encode()).hexdigest()[:8]}"


@dataclass
class RefinerParts:
    """What a refiner keeps resident: its UNet, tokenizer, scheduler config and pipeline flags."""

    unet: Any
    tokenizer_2: Any
    scheduler: Any
    requires_aesthetics_score: bool
    force_zeros_for_empty_prompt: bool

    def modules(self) -> list:
        return [self.unet]


@dataclass
class SafetyParts:
    checker: Any
    processor: Any

    def modules(self) -> list:
        return [self.checker]


@dataclass
class Resident:
    entry: ModelEntry
    obj: Any  # pipeline, RefinerParts, model, SafetyParts; for a LoRA the base pipeline it lives in
    dtype: str
    vram_mb: int
    location: str = "vram"
    last_used_at: str | None = None
    parent: str | None = None  # LoRAs: the base they are loaded into
    # set by a cache (load) request: "vram" never leaves VRAM; "ram" may move VRAM → RAM but is
    # never dropped; only unload lifts a pin
    pinned_at: str | None = None
    extras: dict = field(default_factory=dict)  # compiled UNet, original scheduler config

    @property
    def pinned(self) -> bool:
        return self.pinned_at is not None

    def wire(self) -> dict:
        return {"name": self.entry.name, "location": self.location, "vram_mb": self.vram_mb, "last_used_at": self.last_used_at, "pinned": self.pinned}


def _modules(obj: Any) -> list:
    import torch

    if hasattr(obj, "components"):  # a pipeline
        return [m for m in obj.components.values() if isinstance(m, torch.nn.Module)]
    if hasattr(obj, "modules") and not isinstance(obj, torch.nn.Module):
        return obj.modules()
    return [obj]


def move(obj: Any, device: str) -> None:
    for m in _modules(obj):
        m.to(device)


# -- loaders -----------------------------------------------------------------------------------


def _common(entry: ModelEntry, dtype: str) -> dict:
    kw: dict = {"local_files_only": True, "dtype": torch_dtype(dtype)}
    if entry.variant:
        kw["variant"] = entry.variant
    return kw


def load_model(entry: ModelEntry, dtype: str, device: str, base_pipe: Any = None) -> Any:
    """Read one catalog model from disk onto `device` (everything offline)."""
    import diffusers

    kind = entry.kind
    kw = _common(entry, dtype)
    if kind == "base":
        cls = diffusers.StableDiffusionXLPipeline
        if entry.single_file:
            pipe = cls.from_single_file(entry.path, config=entry.config, local_files_only=True, dtype=kw["dtype"], add_watermarker=False)
        else:
            pipe = cls.from_pretrained(entry.path, add_watermarker=False, **kw)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        return pipe
    if kind == "refiner":
        if entry.single_file:
            shared = {"text_encoder_2": base_pipe.text_encoder_2, "vae": base_pipe.vae} if base_pipe is not None else {}
            full = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(
                entry.path, config=entry.config, local_files_only=True, dtype=kw["dtype"], add_watermarker=False, **shared
            )
            parts = RefinerParts(full.unet, full.tokenizer_2, full.scheduler, bool(full.config.requires_aesthetics_score), bool(full.config.force_zeros_for_empty_prompt))
        else:
            from transformers import CLIPTokenizer

            index = diffusers.DiffusionPipeline.load_config(entry.path, local_files_only=True)
            unet = diffusers.UNet2DConditionModel.from_pretrained(entry.path, subfolder="unet", **kw)
            tok = CLIPTokenizer.from_pretrained(entry.path, subfolder="tokenizer_2", local_files_only=True)
            sched_cls = getattr(diffusers, index.get("scheduler", [None, "EulerDiscreteScheduler"])[1])
            sched = sched_cls.from_pretrained(entry.path, subfolder="scheduler", local_files_only=True)
            parts = RefinerParts(unet, tok, sched, bool(index.get("requires_aesthetics_score", True)), bool(index.get("force_zeros_for_empty_prompt", False)))
        parts.unet.to(device)
        return parts
    if kind in ("vae", "controlnet"):
        cls = diffusers.AutoencoderKL if kind == "vae" else diffusers.ControlNetModel
        if entry.single_file:
            extra = {"subfolder": entry.config_subfolder} if entry.config_subfolder else {}
            model = cls.from_single_file(entry.path, config=entry.config, local_files_only=True, dtype=kw["dtype"], **extra)
        else:
            model = cls.from_pretrained(entry.path, **kw)
        return model.to(device)
    if kind == "safety_checker":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker = StableDiffusionSafetyChecker.from_pretrained(entry.path, **kw).to(device)
        if os.path.isfile(os.path.join(entry.path, "preprocessor_config.json")):
            processor = CLIPImageProcessor.from_pretrained(entry.path, local_files_only=True)
        else:
            processor = CLIPImageProcessor()  # CLIP ViT-L/14 defaults, what the SD safety checker was trained with
        return SafetyParts(checker, processor)
    raise ValueError(f"{entry.name}: kind {kind} is not loaded through residency")


def load_lora(pipe: Any, entry: ModelEntry) -> str:
    name = adapter_name(entry.name)
    if entry.single_file:
        pipe.load_lora_weights(entry.path, adapter_name=name)
    else:
        pipe.load_lora_weights(entry.path, weight_name=entry.extra.get("weight_name"), adapter_name=name)
    return name


# -- the resident set --------------------------------------------------------------------------


class Residency:
    def __init__(self, device: str, vram_total_mb: int, ram_budget_mb: int):
        self.device = device
        self.vram_total_mb = vram_total_mb
        self.ram_budget_mb = ram_budget_mb
        # a CPU-only worker's "VRAM" is host memory: eviction deletes (nothing to gain by keeping
        # it "warm"), except models pinned in RAM; an explicit load to "ram" still keeps them warm
        self.keep_warm = device != "cpu"
        self._resident: "OrderedDict[str, Resident]" = OrderedDict()  # least recently used first
        self._lock = threading.RLock()  # state() is read from the stdin thread too

    # reads

    def get(self, name: str) -> Resident | None:
        with self._lock:
            return self._resident.get(name)

    def wire(self) -> list[dict]:
        with self._lock:
            return [r.wire() for r in self._resident.values()]

    def all(self) -> list[Resident]:
        """Every resident, least recently used first."""
        with self._lock:
            return list(self._resident.values())

    def used_mb(self, location: str = "vram") -> int:
        with self._lock:
            return sum(r.vram_mb for r in self._resident.values() if r.location == location)

    def loras_of(self, base: str) -> list[Resident]:
        with self._lock:
            return [r for r in self._resident.values() if r.parent == base]

    # writes

    def touch(self, names: list[str]) -> None:
        stamp = now_iso()
        with self._lock:
            for n in names:
                r = self._resident.get(n)
                if r is not None:
                    r.last_used_at = stamp
                    self._resident.move_to_end(n)

    def set_location(self, names: list[str], location: str) -> None:
        with self._lock:
            for n in names:
                r = self._resident.get(n)
                if r is not None:
                    r.location = location
                    for child in self.loras_of(n):
                        child.location = location

    def add(self, resident: Resident) -> None:
        with self._lock:
            self._resident[resident.entry.name] = resident
            self._resident.move_to_end(resident.entry.name)

    def drop(self, name: str, log_cb: Callable[[str, str], None] | None = None, reason: str = "") -> None:
        """Delete a resident (and the LoRAs living in it), freeing its memory."""
        with self._lock:
            r = self._resident.pop(name, None)
            children = [c.entry.name for c in self.loras_of(name)]
        if r is None:
            return
        for c in children:
            with self._lock:
                self._resident.pop(c, None)
        if r.parent is not None:
            base = self.get(r.parent)
            if base is not None:
                try:
                    base.obj.delete_adapters(r.extras["adapter"])
                except Exception as exc:  # the adapter is gone either way once its base goes
                    log.warning("delete_adapters(%s) failed: %s", name, exc)
        r.obj = None
        r.extras.clear()
        del r
        gc.collect()
        self.empty_cache()
        log.info("unloaded %s%s", name, f" ({reason})" if reason else "")
        if log_cb:
            log_cb("info", f"unloaded {name}{f' ({reason})' if reason else ''}")

    def empty_cache(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def make_room(self, need_mb: int, keep: set[str], log_cb=None) -> None:
        """Evict LRU residents not in `keep` until `need_mb` more fits in VRAM."""
        with self._lock:
            order = list(self._resident.values())
        for r in order:
            if self.vram_total_mb - self.used_mb() >= need_mb:
                return
            name = r.entry.name
            if name in keep or r.pinned_at == "vram" or r.location != "vram" or self.get(name) is None:
                continue
            if r.parent is not None and r.parent in keep:
                self.drop(name, log_cb, "to make room in VRAM")
                continue
            if r.parent is not None:
                continue  # moves with its base
            self.evict(name, log_cb)

    def evict(self, name: str, log_cb=None) -> None:
        """Out of VRAM: warm in host RAM when the budget and MemAvailable allow, else deleted."""
        r = self.get(name)
        if r is None:
            return
        size = r.vram_mb + sum(c.vram_mb for c in self.loras_of(name))
        if r.pinned_at == "ram":  # pinned in RAM: never dropped, whatever the budget
            self.to_ram(name, log_cb)
            return
        if self.keep_warm and self.ram_budget_mb > 0 and size <= self.ram_budget_mb:
            with self._lock:
                warm = [x for x in self._resident.values() if x.location == "ram" and x.parent is None and x.entry.name != name and not x.pinned]
            for old in warm:  # oldest first
                if self.used_mb("ram") + size <= self.ram_budget_mb:
                    break
                self.drop(old.entry.name, log_cb, "host RAM budget")
            avail = available_ram_mb()
            if self.used_mb("ram") + size <= self.ram_budget_mb and (avail is None or avail - size >= RAM_HEADROOM_MB):
                move(r.obj, "cpu")
                self.set_location([name], "ram")
                self.empty_cache()
                log.info("moved %s to host RAM", name)
                if log_cb:
                    log_cb("info", f"moved {name} ({size} MB) from VRAM to host RAM to make room")
                return
        self.drop(name, log_cb, "to make room in VRAM")

    def to_ram(self, name: str, log_cb=None) -> None:
        """Move a resident (and the LoRAs in it) from VRAM to host RAM."""
        r = self.get(name)
        if r is None or r.location == "ram":
            return
        move(r.obj, "cpu")
        self.set_location([name], "ram")
        self.empty_cache()
        log.info("moved %s to host RAM", name)
        if log_cb:
            log_cb("info", f"moved {name} from VRAM to host RAM")

    def pinned_in_vram(self, keep: set[str]) -> list[Resident]:
        with self._lock:
            return [r for r in self._resident.values() if r.location == "vram" and r.pinned_at == "vram" and r.entry.name not in keep]

    def evict_all(self, log_cb=None) -> None:
        """After an out-of-memory error: nothing stays on the device but models pinned there."""
        with self._lock:
            names = [r.entry.name for r in self._resident.values() if r.parent is None and r.location == "vram" and r.pinned_at != "vram"]
        for n in names:
            self.evict(n, log_cb)
        gc.collect()
        self.empty_cache()

    def check_fits(self, suite_mb: int, activation_mb: int, offload: bool) -> None:
        if offload:
            return
        if suite_mb + activation_mb > self.vram_total_mb:
            raise WorkerError(
                "out_of_memory",
                f"the models ({suite_mb} MB) plus activations ({activation_mb} MB) exceed this device's {self.vram_total_mb} MB",
            )

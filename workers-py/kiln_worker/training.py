"""What every backend does the same way for a `train` request: the checks before any cost is paid
(capability, job_dir, the dataset files the agent downloaded — each must exist and decode), the
dataset's digest, the VRAM training needs, where checkpoints and the result go, and reading the
checkpoint an earlier attempt left (`resume`).

Fields are named relative to the request, as the API names them (`dataset.items.3.image`).
"""

from __future__ import annotations

import json

import glob
import hashlib
import math
import os
from dataclasses import dataclass

from . import images, loras, safetensors_io
from .errors import WorkerError, invalid_request

TRAIN_VRAM_MB_PER_MEGAPIXEL = 4000  # contracts: trainingVramMb — optimizer state and activations per 1024² sample
TEXT_ENCODER_VRAM_MB = 2000
REFERENCE_PIXELS = 1024 * 1024
IGNORED_SUFFIXES = (".part", ".tmp")


@dataclass(frozen=True)
class DatasetItem:
    index: int
    path: str
    caption: str
    sha256: str


def training_vram_mb(request: dict) -> int:
    """VRAM a LoRA fine-tune needs on top of its base model (the contracts' trainingVramMb)."""
    hp = request["hyperparameters"]
    return math.ceil(TRAIN_VRAM_MB_PER_MEGAPIXEL * hp["resolution"] * hp["resolution"] / REFERENCE_PIXELS * hp["batch_size"]
                     + (TEXT_ENCODER_VRAM_MB if hp["train_text_encoder"] else 0))


def check_train_message(message: dict, capabilities: dict) -> None:
    """The rules the schema can't express, on the whole train message."""
    if "training" not in capabilities.get("features", []):
        raise WorkerError("invalid_request", f"(request): training is not supported by the {capabilities.get('backend')} backend on this worker")
    for key in ("job_dir", "dataset_dir"):
        if not os.path.isabs(message[key]):
            raise WorkerError("invalid_request", f"{key}: absolute — {message[key]!r} is not an absolute path")
    if not os.path.isdir(message["dataset_dir"]):
        raise WorkerError("invalid_request", f"dataset_dir: {message['dataset_dir']!r} is not a directory")
    hp = message["request"]["hyperparameters"]
    if hp["resolution"] % 64:
        raise invalid_request("hyperparameters.resolution", "must be a multiple of 64")


def dataset_file(dataset_dir: str, index: int, key: str) -> str | None:
    """`<index>.<ext of the key>`, else any complete `<index>.*` file; None when there is none."""
    ext = key.rsplit(".", 1)[-1] if "." in os.path.basename(key) else ""
    if ext:
        exact = os.path.join(dataset_dir, f"{index}.{ext}")
        if os.path.isfile(exact):
            return exact
    for path in sorted(glob.glob(os.path.join(glob.escape(dataset_dir), f"{index}.*"))):
        if os.path.isfile(path) and not path.endswith(IGNORED_SUFFIXES):
            return path
    return None


def load_dataset(request: dict, dataset_dir: str) -> list[DatasetItem]:
    """Every item's local file, verified to decode; invalid_request naming `dataset.items.<i>.image`."""
    items: list[DatasetItem] = []
    for i, item in enumerate(request["dataset"]["items"]):
        field = f"dataset.items.{i}.image"
        path = dataset_file(dataset_dir, i, item["image"])
        if path is None:
            raise invalid_request(field, f"no file {i}.<ext> for {item['image']!r} in the dataset directory")
        images.load_image(path, field=field)  # decodes it: truncated or corrupt files fail here
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        items.append(DatasetItem(i, path, item["caption"], digest))
    return items


def dataset_digest(items: list[DatasetItem]) -> str:
    """sha256 over every image's bytes and caption, in order: the dataset's identity."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.index}\0{item.sha256}\0{item.caption}\0".encode("utf-8"))
    return h.hexdigest()


def checkpoint_path(job_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(job_dir), "checkpoints", f"step-{step:06d}.safetensors")


def result_path(job_dir: str, request: dict) -> str:
    """`<job_dir>/<output name with "/" → "--">.safetensors`: the same file name KILN_LORA_DIR uses."""
    return os.path.join(os.path.abspath(job_dir), loras.file_name(request["output"]["name"]))


def checkpoint_due(step: int, total: int, every: int) -> bool:
    """A checkpoint every `checkpoint_every` steps; never at the last step (the result is that file)."""
    return step < total and step % every == 0


def read_resume(resume: dict | None, expected: dict[str, str], total_steps: int) -> tuple[dict, int] | str:
    """(tensors, step) from the earlier attempt's checkpoint, or the reason it can't be used.

    `expected` is metadata the checkpoint must carry unchanged (base model, rank, …); a checkpoint
    that is unreadable or from other settings is a reason to start over, never a failed job.
    """
    if not resume:
        return "no checkpoint"
    path, step = resume["path"], resume["step"]
    if step > total_steps:
        return f"resume.step {step} is beyond hyperparameters.steps {total_steps}"
    try:
        tensors, meta = safetensors_io.read(path)
    except OSError as exc:
        return f"cannot read {path!r}: {exc}"
    except safetensors_io.SafetensorsError as exc:
        return f"{path!r} is not a usable checkpoint: {exc}"
    if meta.get("step") != str(step):
        return f"{path!r} is the checkpoint of step {meta.get('step')}, not {step}"
    for key, value in expected.items():
        if meta.get(key) != value:
            return f"{path!r} was trained with {key}={meta.get(key)!r}, this request has {value!r}"
    return tensors, step


@dataclass(frozen=True)
class TrainingSpec:
    """What decides a LoRA run's weights (everything but the output name), from a train request.

    Both backends derive their deterministic run id from it, so a checkpoint is continued only
    by the run that wrote it.
    """

    base_model: str
    name: str
    seed: int
    dataset: str  # dataset_digest
    learning_rate: float
    rank: int
    alpha: float
    resolution: int
    batch_size: int
    gradient_accumulation: int
    train_text_encoder: bool

    @classmethod
    def of(cls, request: dict, dataset: str):
        hp = request["hyperparameters"]
        return cls(request["base_model"], request["output"]["name"], int(hp["seed"]), dataset, float(hp["learning_rate"]),
                   int(hp["rank"]), float(hp.get("alpha") or hp["rank"]), int(hp["resolution"]), int(hp["batch_size"]),
                   int(hp["gradient_accumulation"]), bool(hp["train_text_encoder"]))

    @property
    def run_id(self) -> str:
        ident = {k: v for k, v in self.__dict__.items() if k != "name"}  # the output name doesn't change the weights
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:32]

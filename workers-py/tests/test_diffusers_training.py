"""The diffusers backend's residency requests (load/unload, pins) and LoRA training on the tiny
random SDXL pipeline, on CPU and offline: in-process, and `train` through a real worker process.
Skipped where diffusers is not installed."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time

import pytest

from conftest import import_diffusers_or_skip  # noqa: E402

import_diffusers_or_skip()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from kiln_worker import loras  # noqa: E402
from kiln_worker.backends.diffusers_backend import DiffusersBackend  # noqa: E402
from kiln_worker.backends.diffusers_parts.settings import DiffusersSettings  # noqa: E402
from kiln_worker.config import Config  # noqa: E402
from kiln_worker.errors import WorkerError  # noqa: E402
from kiln_worker.protocol import validation_problems  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import generate_message  # noqa: E402
from diffusers_support.tiny_sdxl import build_tiny_lora, build_tiny_sdxl  # noqa: E402

BASE = "kiln/tiny-sdxl"
BASE2 = "kiln/tiny-sdxl-b"
LORA = "tiny-style"
OUT = "team/cat-lora"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtrain")
    stage, models = root / "stage", root / "models"
    for sub in ("base", "lora"):
        (models / sub).mkdir(parents=True)
    base = str(models / "base" / "kiln--tiny-sdxl")
    shutil.move(build_tiny_sdxl(stage), base)
    shutil.copytree(base, models / "base" / "kiln--tiny-sdxl-b")
    shutil.move(build_tiny_lora(stage, base), models / "lora" / f"{LORA}.safetensors")
    return str(models)


def make_backend(models_dir, lora_dir=None, **settings) -> DiffusersBackend:
    return DiffusersBackend(Config(backend="diffusers", lora_dir=lora_dir),
                            DiffusersSettings(models_dir=models_dir, scan_hf_cache=False, **settings))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    items = []
    for i in range(3):
        arr = (np.random.RandomState(i).rand(80, 72, 3) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"{i}.png")
        items.append({"image": f"datasets/cats/{i}.png", "caption": f"a photo of cat number {i}"})
    return str(folder), items


def train_message(rid, job_dir, dataset, *, steps=6, every=2, resume=None, resolution=64, **hp) -> dict:
    ds, items = dataset
    hyper = {"rank": 4, "learning_rate": 1e-3, "steps": steps, "batch_size": 1, "gradient_accumulation": 1,
             "resolution": resolution, "seed": 7, "train_text_encoder": False, "checkpoint_every": every, **hp}
    return {"v": 1, "type": "train", "id": rid, "job_id": f"job-{rid}", "attempt": 1, "job_dir": str(job_dir),
            "dataset_dir": ds, "resume": resume,
            "request": {"base_model": BASE, "dataset": {"items": items}, "output": {"name": OUT}, "hyperparameters": hyper,
                        "priority": "normal", "timeout_s": 3600}}


class Recorder:
    def __init__(self, cancel_after_step=None):
        self.progress, self.checkpoints, self.logs = [], [], []
        self.cancel = threading.Event()
        self._cancel_after = cancel_after_step

    def on_progress(self, stage, step, total, loss=None):
        self.progress.append((stage, step, total, loss))

    def on_checkpoint(self, step, path, sha, size):
        self.checkpoints.append((step, path, sha, size))
        if self._cancel_after is not None and step >= self._cancel_after:
            self.cancel.set()

    def on_log(self, level, message):
        self.logs.append((level, message))


def train(backend, msg, rec=None):
    rec = rec or Recorder()
    return backend.train(msg, rec.on_progress, rec.on_checkpoint, rec.cancel, rec.on_log), rec


def load_lora_into_fresh_pipe(models_dir, path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(models_dir, "base", "kiln--tiny-sdxl"), local_files_only=True)
    pipe.load_lora_weights(path, adapter_name="t")
    return pipe


# -- load / unload / pins ----------------------------------------------------------------------


def resident(backend) -> dict:
    return {r["name"]: (r["location"], r["pinned"]) for r in backend.state()["resident"]}


def test_load_to_vram_and_ram_and_back_warm_is_faster_than_cold(models_dir):
    backend = make_backend(models_dir)
    progress = []
    cold = backend.load([BASE], "vram", False, lambda *a: progress.append(a), threading.Event())
    assert cold.models == [BASE] and progress == [("loading_model", 0, 1), ("loading_model", 1, 1)]
    assert resident(backend) == {BASE: ("vram", False)}
    again = backend.load([BASE], "vram", False, lambda *a: None, threading.Event())
    assert again.models == []  # already there: costs nothing
    out = backend.load([BASE], "ram", False, lambda *a: None, threading.Event())
    assert out.models == [BASE] and resident(backend) == {BASE: ("ram", False)}
    assert backend.state()["vram_used_mb"] == 0
    warm = backend.load([BASE], "vram", False, lambda *a: None, threading.Event())
    assert warm.models == [BASE] and resident(backend)[BASE] == ("vram", False)
    assert warm.load_ms < cold.load_ms  # .to(device) of a warm pipeline vs from_pretrained
    # cold straight into RAM
    into_ram = backend.load([BASE2], "ram", False, lambda *a: None, threading.Event())
    assert into_ram.models == [BASE2] and resident(backend)[BASE2] == ("ram", False)
    info = {m["name"]: m for m in backend.capabilities()["models"]}
    assert info[BASE]["load_ms"] == info[BASE2]["load_ms"] >= 1  # ModelInfo.load_ms stays the cold estimate

    err = pytest.raises(WorkerError, backend.load, [BASE, "nobody/none"], "vram", False, lambda *a: None, threading.Event()).value
    assert err.code == "model_not_found" and err.message == "models.1: no model named 'nobody/none' on this worker"

    freed = backend.unload([BASE, "not/resident", BASE2])
    assert sorted(freed.models) == [BASE, BASE2] and freed.load_ms == 0 and backend.state()["resident"] == []


def test_pins_prevent_eviction_and_give_out_of_memory(models_dir, tmp_path):
    probe = make_backend(models_dir)
    size = next(m["vram_mb"] for m in probe.capabilities()["models"] if m["name"] == BASE)
    activation = 10  # a 64² fp32 image (ACTIVATION_MB_PER_MEGAPIXEL × 2)
    assert size > activation
    # room for one base plus a 64² generation, not for two bases
    backend = make_backend(models_dir, cpu_memory_mb=size + activation)
    backend.load([BASE], "vram", True, lambda *a: None, threading.Event())
    assert resident(backend) == {BASE: ("vram", True)}
    backend.load([BASE], "vram", False, lambda *a: None, threading.Event())
    assert resident(backend) == {BASE: ("vram", True)}  # a load without pin never lifts one

    err = pytest.raises(WorkerError, backend.load, [BASE2], "vram", False, lambda *a: None, threading.Event()).value
    assert err.code == "out_of_memory" and err.retryable and BASE in err.message and "pinned" in err.message
    req = generate_message("g", str(tmp_path / "g"), model=BASE2, steps=1, width=64, height=64)["request"]
    gen_err = pytest.raises(WorkerError, backend.generate, req, str(tmp_path / "g"), lambda *a: None, threading.Event()).value
    assert gen_err.code == "out_of_memory" and BASE in gen_err.message
    assert resident(backend) == {BASE: ("vram", True)}

    # pinned in VRAM, then loaded to RAM: pinned in RAM, may leave VRAM but is never dropped
    backend.load([BASE], "ram", False, lambda *a: None, threading.Event())
    assert resident(backend) == {BASE: ("ram", True)}
    backend.load([BASE], "vram", False, lambda *a: None, threading.Event())
    assert resident(backend) == {BASE: ("vram", True)}
    ok = backend.generate(req, str(tmp_path / "g2"), lambda *a: None, threading.Event())
    assert ok.loaded_models == [BASE2]
    assert resident(backend) == {BASE: ("ram", True), BASE2: ("vram", False)}  # evicted to RAM, not dropped

    backend.unload([BASE])
    assert BASE not in resident(backend)


# -- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(models_dir, tmp_path_factory):
    return make_backend(models_dir, lora_dir=str(tmp_path_factory.mktemp("kiln-lora-dir")))


@pytest.fixture(scope="module")
def full_run(backend, dataset, tmp_path_factory):
    job = tmp_path_factory.mktemp("job-full")
    result, rec = train(backend, train_message("t1", job, dataset))
    return result, rec, job


def test_train_reports_finite_loss_and_checkpoints_that_load(backend, full_run, models_dir):
    from safetensors import safe_open

    result, rec, job = full_run
    assert [p[:3] for p in rec.progress[:2]] == [("loading_model", 0, 1), ("loading_model", 1, 1)]
    steps = [p for p in rec.progress if p[0] == "train"]
    assert [(s, t) for _, s, t, _ in steps] == [(i, 6) for i in range(1, 7)]
    assert all(np.isfinite(loss) and loss > 0 for *_, loss in steps)
    assert result.final_loss == steps[-1][3] and result.steps == 6
    assert [c[0] for c in rec.checkpoints] == [2, 4]
    for step, path, sha, size in rec.checkpoints:
        assert path == str(job / "checkpoints" / f"step-{step:06d}.safetensors") and os.path.getsize(path) == size
    assert not [f for f in os.listdir(job / "checkpoints") if "tmp" in f]
    assert result.path == str(job / "team~cat-lora.safetensors") and os.path.getsize(result.path) == result.bytes
    assert set(result.timings) == {"model_load_ms", "train_ms"}
    with safe_open(result.path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    assert meta["step"] == "6" and meta["base_model"] == BASE and meta["rank"] == "4" and meta["name"] == OUT
    pipe = load_lora_into_fresh_pipe(models_dir, rec.checkpoints[0][1])
    assert "t" in pipe.get_list_adapters()["unet"]
    # the shared pipeline is as before: the training adapter (and its weights) are gone
    unet = backend._residency.get(BASE).obj.unet
    assert "kiln_train" not in getattr(unet, "peft_config", {}) and not any("kiln_train" in n for n, _ in unet.named_parameters())


def test_cancel_keeps_the_last_checkpoint_and_resume_completes(backend, dataset, full_run, tmp_path):
    rec = Recorder(cancel_after_step=2)
    with pytest.raises(WorkerError) as info:
        train(backend, train_message("t2", tmp_path, dataset), rec)
    assert info.value.code == "canceled"
    assert [c[0] for c in rec.checkpoints] == [2] and os.path.isfile(rec.checkpoints[0][1])
    assert not os.path.exists(tmp_path / "team~cat-lora.safetensors")
    # the same step's checkpoint is byte-identical to the uninterrupted run's (CPU)
    assert rec.checkpoints[0][2] == full_run[1].checkpoints[0][2]

    resumed, rec2 = train(backend, train_message("t3", tmp_path, dataset, resume={"path": rec.checkpoints[0][1], "step": 2}))
    steps = [p[1] for p in rec2.progress if p[0] == "train"]
    assert steps == [3, 4, 5, 6] and resumed.steps == 6 and np.isfinite(resumed.final_loss)
    assert any("resuming from the checkpoint of step 2" in m for _, m in rec2.logs)
    assert [c[0] for c in rec2.checkpoints] == [4] and os.path.isfile(resumed.path)

    # a checkpoint of another run is a warning, training starts over
    other = train_message("t4", tmp_path / "other", dataset, steps=2, every=1, resume={"path": rec.checkpoints[0][1], "step": 2}, learning_rate=5e-4)
    r4, rec4 = train(backend, other)
    assert [p[1] for p in rec4.progress if p[0] == "train"] == [1, 2] and any(level == "warning" for level, _ in rec4.logs)


def test_trained_lora_in_kiln_lora_dir_changes_the_next_generation(backend, full_run, tmp_path):
    result = full_run[0]
    lora_dir = backend._config.lora_dir
    req = generate_message("g", str(tmp_path), model=BASE, steps=2, width=64, height=64, seed=3)["request"]
    plain = backend.generate(req, str(tmp_path / "a"), lambda *a: None, threading.Event())
    assert OUT not in {m["name"] for m in backend.capabilities()["models"]}
    shutil.copy(result.path, os.path.join(lora_dir, loras.file_name(OUT)))
    assert {"name": OUT, "kind": "lora"}.items() <= next(m for m in backend.capabilities()["models"] if m["name"] == OUT).items()
    with_lora = backend.generate({**req, "loras": [{"name": OUT, "weight": 1.0}]}, str(tmp_path / "b"), lambda *a: None, threading.Event())
    assert with_lora.loaded_models == [OUT]
    a = np.asarray(Image.open(plain.outputs[0]["path"]), dtype=np.int16)
    b = np.asarray(Image.open(with_lora.outputs[0]["path"]), dtype=np.int16)
    assert int(np.abs(a - b).max()) > 0


def test_train_errors_before_any_cost(backend, dataset, tmp_path):
    msg = train_message("e", tmp_path, dataset)
    msg["request"]["base_model"] = "nobody/none"
    err = pytest.raises(WorkerError, train, backend, msg).value
    assert err.code == "model_not_found" and err.message.startswith("base_model")
    msg = train_message("e", tmp_path, dataset)
    msg["request"]["output"]["name"] = LORA
    assert pytest.raises(WorkerError, train, backend, msg).value.message.startswith("output.name")
    ds, items = dataset
    msg = train_message("e", tmp_path, (ds, items + [{"image": "datasets/cats/9.png", "caption": "x"}]))
    err = pytest.raises(WorkerError, train, backend, msg).value
    assert err.code == "invalid_request" and err.message.startswith("dataset.items.3.image")


# -- through a real worker process -------------------------------------------------------------


def test_train_through_a_worker_process(spawn, models_dir, dataset, tmp_path):
    worker = spawn({"KILN_BACKEND": "diffusers", "MODELS_DIR": models_dir, "KILN_DIFFUSERS_HF_CACHE": "0", "HF_HUB_OFFLINE": "1",
                    "KILN_LORA_DIR": str(tmp_path / "loras")})
    ready = worker.hello()  # every frame is checked against worker-to-agent.json
    assert "training" in ready["capabilities"]["features"]
    msg = train_message("t1", tmp_path / "job", dataset, steps=3, every=1, resolution=256)  # 256: the contracts' minimum
    assert not validation_problems("agent-to-worker", msg)
    before, trained = worker.run(msg, timeout=120)
    assert trained["type"] == "trained", trained
    progress = [m for m in before if m["type"] == "progress" and m["stage"] == "train"]
    assert [m["step"] for m in progress] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in progress)
    assert [m["step"] for m in before if m["type"] == "checkpoint"] == [1, 2]
    assert trained["steps"] == 3 and trained["final_loss"] == progress[-1]["loss"]
    assert os.path.getsize(trained["path"]) == trained["bytes"]
    assert {r["name"] for r in trained["state"]["resident"]} == {BASE}

    _, loaded = worker.run({"v": 1, "type": "load", "id": "l1", "models": [BASE], "location": "ram", "pin": True}, timeout=60)
    assert loaded["type"] == "loaded" and loaded["models"] == [BASE]
    assert loaded["state"]["resident"][0]["location"] == "ram" and loaded["state"]["resident"][0]["pinned"]
    _, freed = worker.run({"v": 1, "type": "unload", "id": "u1", "models": [BASE, "x/y"]}, timeout=60)
    assert freed["type"] == "loaded" and freed["models"] == [BASE] and freed["state"]["resident"] == []

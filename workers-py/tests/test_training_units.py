"""In-process pieces shared by the backends: the safetensors writer/reader, LoRA directory naming,
training helpers, and the synthetic trainer's curve and weights."""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
import pytest

from kiln_worker import loras, safetensors_io, training
from kiln_worker.backends import load_backend
from kiln_worker.backends.synthetic_training import Run
from kiln_worker.config import Config, ModelSpec
from kiln_worker.errors import WorkerError


def test_safetensors_bytes_follow_the_format_and_round_trip(tmp_path):
    tensors = {"b.lora_B.weight": np.arange(6, dtype=np.float32).reshape(3, 2), "a.lora_A.weight": np.ones((2, 3), np.float32)}
    data = safetensors_io.dumps(tensors, {"step": "3", "base_model": "x"})
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"] == {"base_model": "x", "step": "3"}
    assert header["a.lora_A.weight"] == {"data_offsets": [0, 24], "dtype": "F32", "shape": [2, 3]}  # sorted: a first
    assert data[8 + n + 24 :] == np.arange(6, dtype="<f4").tobytes()
    assert safetensors_io.dumps(dict(reversed(list(tensors.items()))), {"base_model": "x", "step": "3"}) == data
    path = tmp_path / "sub" / "x.safetensors"
    safetensors_io.write_atomic(str(path), tensors, {"step": "3"})
    back, meta = safetensors_io.read(str(path))
    assert meta == {"step": "3"} and all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]
    for bad in (b"", b"\xff" * 8 + b"{}", struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 2) + b"{"):
        with pytest.raises(safetensors_io.SafetensorsError):
            safetensors_io.loads(bad)


def test_lora_dir_names(tmp_path):
    assert loras.file_name("team/cat-lora") == "team~cat-lora.safetensors"
    assert loras.name_from_file("/x/team~cat-lora.safetensors") == "team/cat-lora"
    (tmp_path / "team~cat-lora.safetensors").write_bytes(b"1")
    (tmp_path / "plain.safetensors").write_bytes(b"1")
    (tmp_path / "half--done.safetensors.part").write_bytes(b"1")  # a download in progress
    assert loras.scan(str(tmp_path)) == {"plain": str(tmp_path / "plain.safetensors"), "team/cat-lora": str(tmp_path / "team~cat-lora.safetensors")}
    assert set(loras.scan(str(tmp_path), by_stem=True)) == {"plain", "team~cat-lora"}
    assert loras.scan(str(tmp_path / "missing")) == {} and loras.scan(None) == {}
    assert loras.find(str(tmp_path), "team/cat-lora") == str(tmp_path / "team~cat-lora.safetensors")
    assert loras.find(str(tmp_path), "team/other") is None


def test_lora_file_names_never_collide():
    # "a/b" and "a--b" once shared a file: the second tenant's LoRA replaced the first's
    names = ["a/b", "a--b", "a-b", "t/a/b", "t/a--b", "t--a/b"]
    files = [loras.file_name(n) for n in names]
    assert len(set(files)) == len(names)
    assert [loras.name_from_file(f) for f in files] == names


def test_checkpoint_schedule_and_vram():
    assert [s for s in range(1, 11) if training.checkpoint_due(s, 10, 4)] == [4, 8]
    assert [s for s in range(1, 9) if training.checkpoint_due(s, 8, 4)] == [4]  # step 8 is the result itself
    hp = {"resolution": 1024, "batch_size": 2, "train_text_encoder": True}
    assert training.training_vram_mb({"hyperparameters": hp}) == 10000


def _run(**kw) -> Run:
    base = dict(base_model="b", name="n", seed=1, dataset="d", learning_rate=1e-4, rank=8, alpha=8.0, resolution=512,
                batch_size=1, gradient_accumulation=1, train_text_encoder=False)
    return Run(**{**base, **kw})


def test_synthetic_loss_falls_with_noise_and_depends_on_the_run():
    run = _run()
    curve = [run.loss(s) for s in range(1, 1001)]
    assert np.mean(curve[-50:]) < 0.6 * np.mean(curve[:50])
    assert any(b > a for a, b in zip(curve, curve[1:]))  # noisy, not monotone
    assert curve == [_run().loss(s) for s in range(1, 1001)]
    for other in (_run(seed=2), _run(dataset="e"), _run(learning_rate=1e-3), _run(rank=16)):
        assert [other.loss(s) for s in range(1, 50)] != curve[:49]
    faster = _run(learning_rate=1e-3)
    assert faster.loss(200) < run.loss(200)  # a higher rate converges sooner


def test_synthetic_weights_evolve_deterministically():
    run = _run(train_text_encoder=True)
    w = run.initial()
    assert run.fits(w) and any(k.startswith("text_encoder.") for k in w)
    assert all(not v.any() for k, v in w.items() if k.endswith("lora_B.weight"))  # PEFT init: B = 0
    for s in (1, 2, 3):
        run.step(w, s)
    again = run.initial()
    for s in (1, 2, 3):
        run.step(again, s)
    assert safetensors_io.dumps(w, run.metadata(3)) == safetensors_io.dumps(again, run.metadata(3))
    assert not run.fits(_run().initial())  # no text encoder tensors: another run's checkpoint


def test_backends_without_training_refuse_cleanly():
    from kiln_worker.backends.base import Backend

    class Minimal(Backend):
        name = "minimal"
        device = capabilities = state = generate = lambda self, *a, **k: None

    b = Minimal()
    for call in (lambda: b.load(["x"], "vram", False, print, threading.Event()), lambda: b.unload(["x"]),
                 lambda: b.train({}, print, print, threading.Event())):
        with pytest.raises(WorkerError) as info:
            call()
        assert info.value.code == "invalid_request" and "minimal" in info.value.message


def test_training_that_cannot_fit_beside_pinned_models_is_out_of_memory(tmp_path):
    models = (ModelSpec("m/base", "base", 3000, 0.0), ModelSpec("m/other", "base", 3000, 0.0))
    b = load_backend("synthetic", Config(synthetic_vram_mb=8000, synthetic_load_ms_per_gb=0, synthetic_models=models,
                                         synthetic_train_step_ms=0))
    b.load(["m/other"], "vram", True, lambda *a: None, threading.Event())
    from PIL import Image

    (tmp_path / "ds").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ds" / "0.png")
    msg = {"job_dir": str(tmp_path / "job"), "dataset_dir": str(tmp_path / "ds"), "resume": None,
           "request": {"base_model": "m/base", "dataset": {"items": [{"image": "k/0.png", "caption": "c"}]}, "output": {"name": "o"},
                       "hyperparameters": {"rank": 2, "learning_rate": 1e-4, "steps": 2, "batch_size": 1, "gradient_accumulation": 1,
                                           "resolution": 1024, "seed": 1, "train_text_encoder": False, "checkpoint_every": 1}}}
    with pytest.raises(WorkerError) as info:  # 3000 + 4000 > 8000 − 3000 pinned
        b.train(msg, lambda *a: None, lambda *a: None, threading.Event())
    assert info.value.code == "out_of_memory" and "m/other" in info.value.message
    msg["request"]["hyperparameters"]["resolution"] = 512  # 3000 + 1000 fits
    result = b.train(msg, lambda *a: None, lambda *a: None, threading.Event())
    assert result.steps == 2 and result.path.endswith("/o.safetensors")

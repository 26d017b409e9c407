"""The `self_test` request (a self-test job's share on one agent): the GPU check inside a real
`python -m kiln_worker`, on the worker's own backend, answered by one `self_test_result` valid
against worker-to-agent.json (conftest checks every frame).

- synthetic: environment, MODELS_DIR verdicts where one is set, benchmark rows labelled synthetic;
  progress per case; pinned models restored after the benchmark moved them; cancel between cases.
- diffusers (wherever it is importable; KILN_REQUIRE_DIFFUSERS=1 fails instead of skipping): the
  gpu-check functions on its MODELS_DIR (a tiny random suite built here), and without a GPU the
  benchmark on the tiny random pipeline, saying so.
"""

from __future__ import annotations

import json
import shutil
import sys
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import WorkerProcess, import_diffusers_or_skip
from kiln_worker import safetensors_io

sys.path.insert(0, os.path.dirname(__file__))

BASE = "kiln/base-a"
SYNTHETIC_MODELS = [
    {"name": BASE, "kind": "base", "vram_mb": 3000, "disk_gb": 0.2},
    {"name": "kiln/base-b", "kind": "base", "vram_mb": 3000, "disk_gb": 0.2},
    {"name": "kiln/refiner", "kind": "refiner", "vram_mb": 2000, "disk_gb": 0.1},
    {"name": "kiln/lora", "kind": "lora", "vram_mb": 10, "disk_gb": 0.01},
]
SCHEDULERS = ["EulerDiscreteScheduler", "HeunDiscreteScheduler"]


def self_test(rid: str, job_dir: str, checks=("environment", "models", "benchmark"), **benchmark) -> dict:
    return {"v": 1, "type": "self_test", "id": rid, "job_id": f"job-{rid}", "attempt": 1, "job_dir": job_dir,
            "checks": list(checks), "benchmark": benchmark}


def models_dir(root: Path) -> str:
    """A MODELS_DIR with one good LoRA and one whose safetensors header is garbage."""
    (root / "lora").mkdir(parents=True)
    safetensors_io.write_atomic(str(root / "lora" / "team--good.safetensors"), {"w": np.ones((4, 8), "float32")}, {})
    (root / "lora" / "broken.safetensors").write_bytes(b"\xff" * 16)
    return str(root)


def synthetic(spawn, tmp_path: Path, **env: str) -> WorkerProcess:
    worker = spawn({"KILN_BACKEND": "synthetic", "KILN_SYNTHETIC_MODELS": json.dumps(SYNTHETIC_MODELS), "KILN_SYNTHETIC_VRAM_MB": "12000",
                    "KILN_SYNTHETIC_STEP_MS": "20", "KILN_SYNTHETIC_LOAD_MS_PER_GB": "100", **env})
    worker.hello()
    return worker


def progress(before: list[dict]) -> list[tuple[int, int]]:
    return [(m["step"], m["total"]) for m in before if m["type"] == "progress" and m["stage"] == "self_test"]


def test_synthetic_report_has_every_section_labelled_synthetic_and_progress_per_case(spawn, tmp_path):
    worker = synthetic(spawn, tmp_path, MODELS_DIR=models_dir(tmp_path / "models"))
    # pinned: the model the benchmark itself unloads and moves (its cold load lifts the pin), and another
    _, loaded = worker.run({"v": 1, "type": "load", "id": "pin", "models": [BASE, "kiln/base-b"], "location": "vram", "pin": True})
    assert loaded["type"] == "loaded"
    before, final = worker.run(self_test("st-1", str(tmp_path / "job"), size=64, steps=2, schedulers=SCHEDULERS), timeout=120)
    assert final["type"] == "self_test_result", final
    report = final["report"]

    # progress: one step per check and benchmark case, counting up to its total
    steps = progress(before)
    total = steps[0][1]
    assert steps == [(i, total) for i in range(total + 1)]
    assert total == 2 + len(report["benchmark"]["rows"])

    assert report["backend"] == "synthetic" and report["checks"] == ["environment", "models", "benchmark"]
    env = report["environment"]
    assert env["backend"] == "synthetic" and env["device"]["vram_total_mb"] == 12000 and env["cuda_available"] is False and env["devices"] == []

    items = {m["name"]: m for m in report["models"]["items"]}
    assert items["team/good"]["ok"] and items["team/good"]["params"] == 32
    assert not items["broken"]["ok"] and any("unreadable safetensors header" in p for p in items["broken"]["problems"])

    bench = report["benchmark"]
    assert bench["mode"] == "synthetic" and "not GPU figures" in bench["note"]
    assert (bench["base"], bench["size"], bench["steps"]) == (BASE, 64, 2)
    rows = {r["case"]: r for r in bench["rows"]}
    assert [c for c in rows if c.startswith("base 64²")] == [f"base 64² 2 steps, {s}" for s in SCHEDULERS]
    assert all(rows[f"base 64² 2 steps, {s}"]["ok"] and rows[f"base 64² 2 steps, {s}"]["steps"] == {"base": 2} for s in SCHEDULERS)
    assert rows[f"load {BASE} from disk"]["ok"] and rows[f"load {BASE} from host RAM"]["ok"]
    assert rows["base + refiner (kiln/refiner), switch 0.8"]["steps"] == {"base": 2, "refiner": 2}
    assert rows["with LoRA kiln/lora"]["ok"] and rows["base at fp16"]["ok"] and rows["one-step turbo-class model"]["ok"] is None

    # the broken model fails the verdict, and says why
    assert report["verdict"] == "fail" and report["reasons"] == [next(r for r in report["reasons"] if r.startswith("model lora broken:"))]

    # the pins survived: the benchmarked base was unloaded and moved, then put back and pinned again
    for name in (BASE, "kiln/base-b"):
        assert {"name": name, "location": "vram", "pinned": True} in report["residency"]["before"]
        assert {"name": name, "location": "vram", "pinned": True} in report["residency"]["after"]
    assert report["residency"]["restored"] == [BASE] and report["residency"]["problems"] == []
    resident = {r["name"]: r for r in final["state"]["resident"]}
    assert resident[BASE]["pinned"] and resident[BASE]["location"] == "vram" and resident["kiln/base-b"]["pinned"]


def test_synthetic_without_models_dir_passes_and_runs_only_what_is_asked(spawn, tmp_path):
    worker = synthetic(spawn, tmp_path)
    before, final = worker.run(self_test("st-2", str(tmp_path / "job"), checks=["models", "environment"]), timeout=60)
    report = final["report"]
    assert report["verdict"] == "pass" and report["reasons"] == []
    assert report["benchmark"] is None and report["environment"]["backend"] == "synthetic"
    assert report["models"]["items"] == [] and "MODELS_DIR is not set" in report["models"]["note"]
    assert progress(before) == [(0, 2), (1, 2), (2, 2)]


def test_cancel_stops_the_self_test_between_cases_and_keeps_pins(spawn, tmp_path):
    worker = synthetic(spawn, tmp_path, KILN_SYNTHETIC_STEP_MS="400")
    worker.run({"v": 1, "type": "load", "id": "pin", "models": [BASE], "location": "vram", "pin": True})
    worker.send(self_test("st-3", str(tmp_path / "job"), size=1024, steps=50))
    while True:  # the benchmark has begun: its first case is done
        msg = worker.recv(60)
        if msg["type"] == "progress" and msg["id"] == "st-3" and msg["step"] >= 3:
            break
    worker.send({"v": 1, "type": "cancel", "id": "st-3"})
    _, final = worker.until_final("st-3", timeout=30)
    assert final["type"] == "error" and final["error"]["code"] == "canceled", final
    # the cold load had unloaded the pinned base; the cancel did not stop its restoration
    resident = {r["name"]: r for r in final["state"]["resident"]}
    assert resident[BASE]["pinned"] and resident[BASE]["location"] == "vram"
    # the worker goes on serving
    _, again = worker.run(self_test("st-4", str(tmp_path / "job2"), checks=["environment"]), timeout=30)
    assert again["type"] == "self_test_result" and again["report"]["verdict"] == "pass"


def test_diffusers_runs_the_gpu_check_on_its_models_and_the_tiny_pipeline_without_a_gpu(tmp_path):
    import_diffusers_or_skip()
    import torch

    from diffusers_support.tiny_sdxl import build_tiny_lora, build_tiny_sdxl

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run on the real weights")
    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    (models / "lora").mkdir(parents=True)
    base = str(models / "base" / "kiln--tiny-sdxl")
    shutil.move(build_tiny_sdxl(tmp_path / "stage"), base)
    shutil.move(build_tiny_lora(tmp_path / "stage", base), models / "lora" / "tiny-style.safetensors")
    (models / "lora" / "broken.safetensors").write_bytes(b"\xff" * 16)
    worker = WorkerProcess({"KILN_BACKEND": "diffusers", "MODELS_DIR": str(models), "KILN_DIFFUSERS_HF_CACHE": "0", "HF_HUB_OFFLINE": "1",
                            "KILN_DIFFUSERS_DEVICE": "cpu"})
    try:
        worker.send({"v": 1, "type": "hello", "id": "hello-1", "agent_id": "agent-test", "gpu_id": "0"})
        _, ready = worker.until_final("hello-1", timeout=180)
        assert ready["type"] == "ready", ready
        _, loaded = worker.run({"v": 1, "type": "load", "id": "pin", "models": ["kiln/tiny-sdxl"], "location": "vram", "pin": True}, timeout=180)
        assert loaded["type"] == "loaded", loaded
        before, final = worker.run(self_test("st-d", str(tmp_path / "job"), size=64, steps=2, schedulers=["EulerDiscreteScheduler"]), timeout=600)
        assert final["type"] == "self_test_result", final
        report = final["report"]
        assert report["backend"] == "diffusers"
        assert report["environment"]["torch"] == torch.__version__ and report["environment"]["cuda_available"] is False
        assert report["environment"]["device"]["name"] == "cpu"
        items = {m["name"]: m for m in report["models"]["items"]}
        assert report["models"]["models_dir"] == str(models)
        assert items["kiln/tiny-sdxl"]["ok"] and items["kiln/tiny-sdxl"]["kind"] == "base" and items["kiln/tiny-sdxl"]["params"] > 0
        assert items["tiny-style"]["ok"] and not items["broken"]["ok"]
        bench = report["benchmark"]
        assert bench["mode"] == "tiny" and "no GPU here" in bench["note"] and "tiny random SDXL" in bench["note"]
        rows = {r["case"]: r for r in bench["rows"]}
        assert rows["base 64² 2 steps, EulerDiscreteScheduler"]["ok"] and rows["base 64² 2 steps, EulerDiscreteScheduler"]["steps"] == {"base": 2}
        assert set(rows["base 64² 2 steps, EulerDiscreteScheduler"]["timings"]) >= {"model_load_ms", "base_ms", "encode_ms"}
        assert rows["base at bf16"]["ok"] is None  # a CPU runs fp32 only
        assert report["verdict"] == "fail" and any(r.startswith("model lora broken:") for r in report["reasons"])
        steps = progress(before)
        assert steps[-1] == (steps[0][1], steps[0][1]) and len(steps) == steps[0][1] + 1
        # the tiny pipeline ran in a backend of its own: the worker's pinned model never moved
        assert report["residency"]["after"] == report["residency"]["before"] == [{"name": "kiln/tiny-sdxl", "location": "vram", "pinned": True}]
        assert report["residency"]["restored"] == []
    finally:
        worker.stop()

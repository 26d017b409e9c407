"""`npm run gpu-check` (kiln_worker.gpu_check): model validation without torch, and the whole
check on the tiny random pipeline where the diffusers extras are installed."""

from __future__ import annotations

import json
import os

import pytest

from kiln_worker import safetensors_io
from kiln_worker.gpu_check import render, validate_models


def test_validate_models_gives_each_item_a_verdict(tmp_path):
    models = tmp_path / "models"
    (models / "lora").mkdir(parents=True)
    safetensors_io.write_atomic(str(models / "lora" / "team--good.safetensors"), {"w": __import__("numpy").ones((4, 8), "float32")}, {})
    (models / "lora" / "broken.safetensors").write_bytes(b"\xff" * 16)
    (models / "base" / "no-index").mkdir(parents=True)
    (models / "controlnet" / "sparkles" / "x").mkdir(parents=True)
    rows = {r["name"]: r for r in validate_models(str(models))}
    assert rows["team/good"]["ok"] and rows["team/good"]["params"] == 32 and rows["team/good"]["kind"] == "lora"
    assert not rows["broken"]["ok"] and any("unreadable safetensors header" in p for p in rows["broken"]["problems"])
    assert not rows["no-index"]["ok"] and any("model_index.json" in p for p in rows["no-index"]["problems"])
    assert not rows["x"]["ok"] and "not a ControlNet type" in rows["x"]["problems"][0]
    text = render({"environment": {"devices": [], "driver": None, "cuda": None, "torch": "t", "diffusers": "d", "transformers": "x",
                                   "spandrel": None, "python": "3"}, "models_dir": str(models), "models": list(rows.values()),
                   "benchmark_skipped": "--no-benchmark"})
    assert "1 ok, 3 with problems" in text and "team/good" in text


def test_gpu_check_runs_on_the_tiny_pipeline_without_a_gpu(tmp_path):
    from conftest import import_diffusers_or_skip

    import_diffusers_or_skip()
    import torch

    from kiln_worker.gpu_check import main

    out = tmp_path / "report.json"
    code = main(["--models-dir", str(tmp_path / "none"), "--json", str(out), "--size", "64", "--steps", "2",
                 "--schedulers", "EulerDiscreteScheduler,HeunDiscreteScheduler"])
    report = json.loads(out.read_text())
    bench = report["benchmark"]
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check ran for real")
    assert code == 0 and bench["mode"] == "tiny" and "tiny random SDXL" in bench["note"]
    cases = {r["case"]: r for r in bench["rows"]}
    assert cases["base 64² 2 steps, HeunDiscreteScheduler"]["steps"] == {"base": 2}
    # the refiner runs the steps asked for; the base stops at the switch's noise level (1 of 2 here)
    assert next(r for c, r in cases.items() if c.startswith("base + refiner"))["steps"]["refiner"] == 2
    assert cases["load kiln/tiny-sdxl from disk"]["ok"] and cases["load kiln/tiny-sdxl from host RAM"]["ok"]
    assert cases["base at bf16"]["ok"] is None and report["environment"]["torch"] == torch.__version__
    assert os.path.isfile(out)

"""Real `python -m kiln_worker` processes spoken to over JSON lines, as the gpu-agent does."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln_worker.output import read_metadata
from kiln_worker.png import read_png_size
from conftest import SDXL, WORKERS_PY, generate_message
from pngdecode import decode


def test_hello_gets_ready_with_capabilities_and_state(spawn):
    worker = spawn({"KILN_SYNTHETIC_GPU_NAME": "Test GPU", "KILN_SYNTHETIC_VRAM_MB": "16000", "KILN_SYNTHETIC_LOAD_MS_PER_GB": "400"})
    ready = worker.hello()
    assert ready["worker"]["pid"] == worker.proc.pid
    assert ready["worker"]["python"].startswith("3.")
    assert ready["device"] == {"name": "Test GPU", "vram_total_mb": 16000}
    caps = ready["capabilities"]
    assert caps["backend"] == "synthetic"
    assert caps["output_formats"] == ["png", "jpeg", "webp"] and caps["max_side"] == 2048 and caps["max_images"] == 8
    assert caps["features"] == ["refiner", "vae", "lora", "controlnet", "img2img", "inpaint", "upscale", "safety_check", "metadata", "training"]
    assert caps["controlnet_types"] == ["canny", "depth", "openpose", "lineart", "scribble", "normal", "seg"]
    assert caps["controlnet_preprocessors"] == ["canny"] and caps["upscalers"] == ["ai-forever/Real-ESRGAN-x4"]
    assert caps["dtypes"] == ["fp16", "bf16", "fp32"] and len(caps["performance"]) == 7
    by_name = {m["name"]: m for m in caps["models"]}
    assert by_name["diffusers/controlnet-canny-sdxl-1.0"]["controlnet_type"] == "canny"
    assert by_name["ai-forever/Real-ESRGAN-x4"]["scale"] == 4 and by_name["kiln/lora-pixel-art"]["kind"] == "lora"
    assert "EulerDiscreteScheduler" in caps["schedulers"] and len(caps["schedulers"]) == 10
    sdxl = next(m for m in caps["models"] if m["name"] == SDXL)
    assert sdxl["kind"] == "base" and sdxl["load_ms"] == 2760
    assert ready["state"] == {"vram_total_mb": 16000, "vram_used_mb": 0, "resident": []}


def test_generate_streams_progress_then_one_result_with_the_png(spawn, tmp_path):
    worker = spawn()
    worker.hello()
    before, result = worker.run(generate_message("g1", str(tmp_path), steps=5, width=320, height=192))
    assert [(m["stage"], m["step"], m["total"]) for m in before if m["type"] == "progress"] == (
        [("loading_model", 0, 1), ("loading_model", 1, 1)] + [("base", i, 5) for i in range(1, 6)])
    assert result["type"] == "result"
    assert result["loaded_models"] == [SDXL]
    assert result["timings"]["model_load_ms"] > 0 and result["timings"]["inference_ms"] > 0
    [out] = result["outputs"]
    path = Path(out["path"])
    assert path.is_absolute() and path == tmp_path / "0.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_png_size(data) == (320, 192)
    assert decode(data).shape == (192, 320, 3)
    metadata = out.pop("metadata")
    assert out == {"index": 0, "path": str(path), "width": 320, "height": 192, "seed": 1234,
                   "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "content_type": "image/png",
                   "upscaled": None, "safety": None}
    timings = metadata.pop("timings")
    assert timings["base_ms"] > 0 and timings["model_load_ms"] > 0 and "refiner_ms" not in timings
    assert metadata["prompt"] == "a lighthouse at dawn" and metadata["seed"] == 1234
    assert metadata == read_metadata(str(path))  # the same dict is in the file, without timings
    [resident] = result["state"]["resident"]
    assert resident["name"] == SDXL and resident["location"] == "vram" and resident["last_used_at"]
    assert result["state"]["vram_used_mb"] == 7000

    # the model is now warm: a second request loads nothing
    before, again = worker.run(generate_message("g2", str(tmp_path / "again"), steps=2))
    assert again["loaded_models"] == []
    assert not [m for m in before if m.get("stage") == "loading_model"]


def test_same_request_and_seed_is_byte_identical_across_processes(spawn, tmp_path):
    hashes = []
    for n in range(2):
        worker = spawn()
        _, result = worker.run(generate_message(f"g{n}", str(tmp_path / str(n)), seed=99, width=256, height=256))
        hashes.append(result["outputs"][0]["sha256"])
        assert (tmp_path / str(n) / "0.png").read_bytes() == (tmp_path / "0" / "0.png").read_bytes()
    assert hashes[0] == hashes[1]

    _, other_seed = spawn().run(generate_message("g3", str(tmp_path / "3"), seed=100, width=256, height=256))
    assert other_seed["outputs"][0]["sha256"] != hashes[0]
    _, other_prompt = spawn().run(generate_message("g4", str(tmp_path / "4"), seed=99, prompt="a harbour", width=256, height=256))
    assert other_prompt["outputs"][0]["sha256"] != hashes[0]


def test_num_images_uses_consecutive_seeds(spawn, tmp_path):
    worker = spawn()
    _, result = worker.run(generate_message("g1", str(tmp_path), seed=4294967290, num_images=2, width=128, height=128))
    outs = result["outputs"]
    assert [(o["index"], o["seed"], Path(o["path"]).name) for o in outs] == [(0, 4294967290, "0.png"), (1, 4294967291, "1.png")]
    assert outs[0]["sha256"] != outs[1]["sha256"]
    # image 1 of this request is what a single-image request with seed s+1 gives
    _, single = worker.run(generate_message("g2", str(tmp_path / "single"), seed=4294967291, width=128, height=128))
    assert single["outputs"][0]["sha256"] == outs[1]["sha256"]


def test_seeds_past_the_maximum_wrap_to_zero(spawn, tmp_path):
    # image i uses (seed + i) mod 2**32: every reported seed is one the API accepts (recv checks
    # each output against worker-to-agent.json, whose seed maximum is 2**32 - 1)
    worker = spawn()
    _, result = worker.run(generate_message("g1", str(tmp_path), seed=4294967295, num_images=3, width=64, height=64))
    outs = result["outputs"]
    assert [o["seed"] for o in outs] == [4294967295, 0, 1]
    assert [read_metadata(o["path"])["seed"] for o in outs] == [4294967295, 0, 1]
    _, single = worker.run(generate_message("g2", str(tmp_path / "single"), seed=0, width=64, height=64))
    assert single["outputs"][0]["sha256"] == outs[1]["sha256"]


def test_cancel_mid_run_stops_within_a_step_and_the_worker_keeps_serving(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "200"})  # per 1024², so 50 ms per step at 512²
    worker.send(generate_message("long", str(tmp_path / "long"), steps=150, width=512, height=512))
    while True:
        msg = worker.recv()
        if msg["type"] == "progress" and msg["stage"] == "base" and msg["step"] == 3:
            break
    sent = time.monotonic()
    worker.send({"v": 1, "type": "cancel", "id": "long"})
    after, final = worker.until_final("long", timeout=5)
    elapsed = time.monotonic() - sent
    assert final["type"] == "error"
    assert final["error"]["code"] == "canceled" and final["error"]["retryable"] is False
    assert elapsed < 0.5, f"cancel took {elapsed * 1000:.0f} ms"
    assert max((m["step"] for m in after if m["type"] == "progress"), default=3) < 10
    assert not (tmp_path / "long" / "0.png").exists()

    _, result = worker.run(generate_message("next", str(tmp_path / "next"), steps=2, width=64, height=64))
    assert result["type"] == "result"


def test_cancel_of_a_queued_request_answers_at_once(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "100"})
    worker.send(generate_message("first", str(tmp_path / "a"), steps=150, width=1024, height=1024))  # 15 s at least
    worker.send(generate_message("second", str(tmp_path / "b"), steps=10))
    worker.send({"v": 1, "type": "cancel", "id": "second"})
    # "at once" means while "first" still runs, not within some wall time a loaded machine may miss
    _, canceled = worker.until_final("second", timeout=60)
    assert canceled["type"] == "error" and canceled["error"]["code"] == "canceled"
    assert not any(m.get("id") == "first" and m["type"] in ("result", "error") for m in worker.received)
    worker.send({"v": 1, "type": "cancel", "id": "first"})
    _, first = worker.until_final("first", timeout=60)
    assert first["type"] == "error" and first["error"]["code"] == "canceled"
    assert all(m.get("id") != "second" for m in worker.received[worker.received.index(canceled) + 1 :])


def test_cancel_of_an_unknown_request_is_only_logged(spawn):
    worker = spawn()
    worker.send({"v": 1, "type": "cancel", "id": "ghost"})
    msg = worker.recv()
    assert msg["type"] == "log" and msg["id"] is None and "ghost" in msg["message"]
    worker.hello()


def test_stray_prints_during_a_request_never_reach_the_protocol(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STRAY_PRINT": "1"})
    worker.hello()
    _, result = worker.run(generate_message("g1", str(tmp_path), steps=3))  # recv() fails on any non-frame line
    assert result["type"] == "result"
    worker.send({"v": 1, "type": "shutdown", "id": "bye-1"})
    assert worker.until_final("bye-1")[1]["type"] == "bye"
    assert worker.wait() == 0
    time.sleep(0.1)
    assert "stray print from a library" in worker.stderr
    assert "stray write straight to fd 1" in worker.stderr


def test_bad_lines_are_answered_without_crashing(spawn, tmp_path):
    worker = spawn()
    worker.send_raw("this is not json")
    msg = worker.recv()
    assert msg["type"] == "log" and msg["level"] == "error" and msg["id"] is None and "not JSON" in msg["message"]

    bad = generate_message("g-bad", str(tmp_path))
    bad["request"]["hyperparameters"]["width"] = 1000 + 4
    bad["request"]["hyperparameters"]["steps"] = 30
    worker.send(bad)
    _, err = worker.until_final("g-bad")
    assert err["type"] == "error" and err["error"]["code"] == "invalid_request" and not err["error"]["retryable"]
    assert "request.hyperparameters.width: multipleOf" in err["error"]["message"]
    assert "request.hyperparameters.steps: additionalProperties" in err["error"]["message"]

    wrong_version = generate_message("g-v2", str(tmp_path))
    wrong_version["v"] = 2
    worker.send(wrong_version)
    _, err = worker.until_final("g-v2")
    assert err["error"]["code"] == "invalid_request" and "v: const" in err["error"]["message"]

    worker.send({"v": 1, "type": "hello", "id": "h-bad"})  # not a generate: logged, not answered
    msg = worker.recv()
    assert msg["type"] == "log" and msg["id"] is None and "agent_id" in msg["message"]

    worker.send_raw('{"v": 1, "type": "generate"}')  # no id to answer to
    msg = worker.recv()
    assert msg["type"] == "log" and msg["id"] is None

    _, result = worker.run(generate_message("g-ok", str(tmp_path), steps=1))
    assert result["type"] == "result"


def test_unknown_model_is_model_not_found(spawn, tmp_path):
    worker = spawn()
    _, err = worker.run(generate_message("g1", str(tmp_path), model="someone/sd-1.5"))
    assert err["type"] == "error"
    assert err["error"]["code"] == "model_not_found" and err["error"]["retryable"] is False
    assert "someone/sd-1.5" in err["error"]["message"]
    assert err["state"]["resident"] == []


def test_model_larger_than_vram_is_out_of_memory(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_VRAM_MB": "6000"})
    _, err = worker.run(generate_message("g1", str(tmp_path)))
    assert err["error"]["code"] == "out_of_memory" and err["error"]["retryable"] is True
    assert err["state"]["vram_total_mb"] == 6000


def test_lru_eviction_with_small_vram(spawn, tmp_path):
    models = [{"name": f"test/{c}", "kind": "base", "vram_mb": 1000, "disk_gb": 1} for c in "abc"]
    worker = spawn({"KILN_SYNTHETIC_VRAM_MB": "2500", "KILN_SYNTHETIC_MODELS": json.dumps(models)})
    assert [m["name"] for m in worker.hello()["capabilities"]["models"]] == ["test/a", "test/b", "test/c"]
    for name in "ab":
        _, result = worker.run(generate_message(name, str(tmp_path / name), model=f"test/{name}", width=64, height=64))
        assert result["loaded_models"] == [f"test/{name}"]
    assert [r["name"] for r in result["state"]["resident"]] == ["test/a", "test/b"]
    before, result = worker.run(generate_message("c", str(tmp_path / "c"), model="test/c", width=64, height=64))
    assert result["loaded_models"] == ["test/c"]
    assert [(r["name"], r["location"]) for r in result["state"]["resident"]] == [("test/a", "ram"), ("test/b", "vram"), ("test/c", "vram")]
    assert result["state"]["vram_used_mb"] == 2000
    assert any(m["type"] == "log" and "evicted test/a" in m["message"] for m in before)


def test_unexpected_exception_is_internal_and_the_worker_keeps_serving(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_RAISE_ON_PROMPT": "explode"})
    _, err = worker.run(generate_message("g1", str(tmp_path), prompt="please explode"))
    assert err["error"]["code"] == "internal" and "synthetic fault injected" in err["error"]["message"]
    _, result = worker.run(generate_message("g2", str(tmp_path), prompt="calm"))
    assert result["type"] == "result"


def test_stdin_eof_exits_zero(spawn):
    worker = spawn()
    worker.hello()
    worker.close_stdin()
    assert worker.wait(5) == 0


def test_stdin_eof_mid_run_cancels_and_exits_zero(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "1000"})
    worker.send(generate_message("g1", str(tmp_path), steps=100, width=1024, height=1024))
    while worker.recv()["type"] != "progress":
        pass
    worker.close_stdin()
    _, final = worker.until_final("g1", timeout=3)
    assert final["error"]["code"] == "canceled"
    assert worker.wait(3) == 0


def test_shutdown_says_bye_and_exits_zero(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "1000"})
    worker.send(generate_message("g1", str(tmp_path), steps=100, width=1024, height=1024))
    worker.send(generate_message("g2", str(tmp_path), steps=100))
    while worker.recv()["type"] != "progress":
        pass
    worker.send({"v": 1, "type": "shutdown", "id": "s1"})
    finals = {}
    while "s1" not in finals:
        msg = worker.recv(3)
        if msg["type"] in ("result", "error", "bye"):
            finals[msg["id"]] = msg
    assert finals["g1"]["error"]["code"] == "canceled"
    assert finals["g2"]["error"]["code"] == "canceled"
    assert finals["s1"]["type"] == "bye"
    assert worker.wait(3) == 0


def test_diffusers_backend_without_its_libraries_exits_3_with_a_clear_message(spawn, tmp_path):
    # where diffusers is installed, a package of that name first on the path hides it
    (tmp_path / "hide" / "diffusers").mkdir(parents=True)
    (tmp_path / "hide" / "diffusers" / "__init__.py").write_text('raise ImportError("No module named diffusers (hidden by the test)")\n')
    worker = spawn({"KILN_BACKEND": "diffusers", "PYTHONPATH": str(tmp_path / "hide")})
    assert worker.wait(10) == 3
    time.sleep(0.1)
    assert "diffusers backend" in worker.stderr and "KILN_BACKEND=synthetic" in worker.stderr


def test_bad_configuration_exits_2_naming_each_variable(spawn):
    worker = spawn({"KILN_SYNTHETIC_STEP_MS": "soon", "KILN_SYNTHETIC_VRAM_MB": "0"})
    assert worker.wait(10) == 2
    time.sleep(0.1)
    assert "KILN_SYNTHETIC_STEP_MS" in worker.stderr and "KILN_SYNTHETIC_VRAM_MB" in worker.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_dies_with_its_agent_even_if_stdin_stays_open(tmp_path):
    # A stand-in agent starts the worker with *our* stdin pipe (which we keep open), then is
    # SIGKILLed: only PR_SET_PDEATHSIG can end the worker now.
    pidfile = tmp_path / "worker.pid"
    agent_code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'kiln_worker'], stdin=sys.stdin, stdout=subprocess.DEVNULL)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(WORKERS_PY)}
    agent = subprocess.Popen([sys.executable, "-c", agent_code], stdin=subprocess.PIPE, cwd=str(WORKERS_PY), env=env)
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "stand-in agent never started the worker"
            time.sleep(0.02)
        worker_pid = int(pidfile.read_text())
        time.sleep(1.0)  # let the worker reach prctl
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 5
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "worker outlived its agent"
            time.sleep(0.05)
    finally:
        agent.stdin.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie waiting for init to reap it is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""Cache requests on real worker processes: load into VRAM or host RAM, pins, unload; what
residency reports (`pinned` on every model) and what warm loads cost."""

from __future__ import annotations

import json

from conftest import generate_message

# cold load = disk_gb × 200 ms; warm (RAM → VRAM) = 15% of that
MODELS = [{"name": f"m/{c}", "kind": "base", "vram_mb": 1000, "disk_gb": 1.0} for c in "abc"]
ENV = {"KILN_SYNTHETIC_VRAM_MB": "2500", "KILN_SYNTHETIC_MODELS": json.dumps(MODELS), "KILN_SYNTHETIC_LOAD_MS_PER_GB": "200"}


def load(worker, rid, models, location="vram", pin=False):
    return worker.run({"v": 1, "type": "load", "id": rid, "models": models, "location": location, "pin": pin})


def unload(worker, rid, models):
    return worker.run({"v": 1, "type": "unload", "id": rid, "models": models})


def resident(msg) -> dict[str, tuple[str, bool]]:
    return {r["name"]: (r["location"], r["pinned"]) for r in msg["state"]["resident"]}


def gen(worker, rid, tmp_path, model):
    return worker.run(generate_message(rid, str(tmp_path / rid), model=model, width=64, height=64, steps=1))


def test_load_into_vram_and_ram_and_warm_loads_are_cheaper(spawn):
    worker = spawn(ENV)
    assert worker.hello()["state"]["resident"] == []
    before, cold = load(worker, "l1", ["m/a"])
    assert cold["type"] == "loaded" and cold["models"] == ["m/a"]
    assert [(m["stage"], m["step"]) for m in before if m["type"] == "progress"] == [("loading_model", 0), ("loading_model", 1)]
    assert cold["timings"]["load_ms"] >= 190
    assert resident(cold) == {"m/a": ("vram", False)}
    assert cold["state"]["vram_used_mb"] == 1000

    _, warm_in = load(worker, "l2", ["m/b"], location="ram")  # cold from disk into host RAM
    assert warm_in["models"] == ["m/b"] and resident(warm_in)["m/b"] == ("ram", False)
    assert warm_in["state"]["vram_used_mb"] == 1000  # RAM is not VRAM

    _, hot = load(worker, "l3", ["m/b"])  # warm → VRAM: ~15% of the cold cost
    assert hot["models"] == ["m/b"] and resident(hot)["m/b"] == ("vram", False)
    assert 20 <= hot["timings"]["load_ms"] < 0.5 * cold["timings"]["load_ms"]

    _, again = load(worker, "l4", ["m/a", "m/b"])  # already hot: nothing to do
    assert again["models"] == [] and again["timings"]["load_ms"] < 50
    _, unknown = load(worker, "l5", ["m/a", "m/nope"])
    assert unknown["type"] == "error" and unknown["error"]["code"] == "model_not_found"
    assert unknown["error"]["message"].startswith("models.1:") and "m/nope" in unknown["error"]["message"]
    assert resident(unknown) == {"m/a": ("vram", False), "m/b": ("vram", False)}


def test_a_generation_brings_a_warm_model_back_faster_than_a_cold_one(spawn, tmp_path):
    worker = spawn(ENV)
    _, cold = gen(worker, "cold", tmp_path, "m/a")
    load(worker, "warm", ["m/b"], location="ram")
    _, warm = gen(worker, "fromram", tmp_path, "m/b")
    assert cold["loaded_models"] == ["m/a"] and warm["loaded_models"] == ["m/b"]
    assert warm["timings"]["model_load_ms"] < 0.5 * cold["timings"]["model_load_ms"]


def test_pins_prevent_eviction_and_a_request_that_cannot_fit_is_out_of_memory(spawn, tmp_path):
    worker = spawn(ENV)
    _, pinned = load(worker, "pin-a", ["m/a"], pin=True)
    assert resident(pinned) == {"m/a": ("vram", True)}
    gen(worker, "b", tmp_path, "m/b")
    before, c = gen(worker, "c", tmp_path, "m/c")  # needs room: b goes warm, a stays
    assert c["type"] == "result"
    assert resident(c) == {"m/a": ("vram", True), "m/b": ("ram", False), "m/c": ("vram", False)}
    assert any(m["type"] == "log" and "evicted m/b" in m["message"] for m in before)

    _, pin_b = load(worker, "pin-b", ["m/b"], pin=True)  # c is evicted for it, a is not
    assert resident(pin_b) == {"m/a": ("vram", True), "m/c": ("ram", False), "m/b": ("vram", True)}
    _, oom = gen(worker, "c2", tmp_path, "m/c")
    assert oom["type"] == "error" and oom["error"]["code"] == "out_of_memory" and oom["error"]["retryable"] is True
    assert "pinned" in oom["error"]["message"] and "m/a" in oom["error"]["message"] and "m/b" in oom["error"]["message"]
    _, oom_load = load(worker, "load-c", ["m/c"])
    assert oom_load["error"]["code"] == "out_of_memory" and "m/a" in oom_load["error"]["message"]
    assert resident(oom_load)["m/a"] == ("vram", True)  # nothing moved

    _, freed = unload(worker, "un", ["m/a", "m/not-resident"])
    assert freed["type"] == "loaded" and freed["models"] == ["m/a"] and freed["timings"] == {"load_ms": 0}
    assert "m/a" not in resident(freed) and freed["state"]["vram_used_mb"] == 1000
    _, c3 = gen(worker, "c3", tmp_path, "m/c")  # fits now
    assert c3["type"] == "result" and resident(c3)["m/c"] == ("vram", False)
    _, unpinned = unload(worker, "un-b", ["m/b"])
    _, relo = load(worker, "re-b", ["m/b"])  # unload also lifted the pin
    assert resident(relo)["m/b"] == ("vram", False)


def test_a_model_pinned_in_ram_moves_out_of_vram_but_is_never_dropped(spawn, tmp_path):
    worker = spawn({**ENV, "KILN_SYNTHETIC_RAM_MB": "1000"})
    _, r = load(worker, "ram-a", ["m/a"], location="ram", pin=True)
    assert resident(r) == {"m/a": ("ram", True)}
    gen(worker, "a", tmp_path, "m/a")  # comes to VRAM for the job
    gen(worker, "b", tmp_path, "m/b")
    _, c = gen(worker, "c", tmp_path, "m/c")  # a is evicted back to RAM (its pin), not dropped
    assert resident(c) == {"m/a": ("ram", True), "m/b": ("vram", False), "m/c": ("vram", False)}
    _, oom = load(worker, "ram-b", ["m/b"], location="ram")  # RAM is full of pinned a
    assert oom["error"]["code"] == "out_of_memory" and "m/a" in oom["error"]["message"]


def test_invalid_load_and_train_messages_get_an_error_naming_the_field(spawn):
    worker = spawn(ENV)
    _, bad_load = worker.run({"v": 1, "type": "load", "id": "bad", "models": ["m/a"], "location": "disk", "pin": False})
    assert bad_load["error"]["code"] == "invalid_request" and "location" in bad_load["error"]["message"]
    _, bad_train = worker.run({"v": 1, "type": "train", "id": "badt", "job_id": "j", "attempt": 1, "job_dir": "/tmp/x",
                               "dataset_dir": "/tmp/y", "resume": None, "request": {}})
    assert bad_train["error"]["code"] == "invalid_request" and "request.base_model" in bad_train["error"]["message"]

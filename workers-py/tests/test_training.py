"""LoRA training on real worker processes (synthetic backend): progress with a falling loss,
checkpoints at the right steps with matching hashes, cancel, resume byte-identical to an
uninterrupted run, dataset checks, and a trained LoRA used by generation via KILN_LORA_DIR."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from kiln_worker import safetensors_io
from kiln_worker.protocol import validation_problems
from conftest import SDXL, generate_message

LORA = "team/cat-lora"
STEP_ENV = {"KILN_SYNTHETIC_TRAIN_STEP_MS": "160"}  # 10 ms per step at 256², batch 1


def dataset(tmp_path: Path, n: int = 3) -> tuple[str, list[dict]]:
    folder = tmp_path / "dataset"
    folder.mkdir(exist_ok=True)
    items = []
    for i in range(n):
        arr = np.full((32, 32, 3), (40 * i, 200 - 30 * i, 90), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        items.append({"image": f"datasets/cats/{i}.png", "caption": f"a photo of cat number {i}"})
    return str(folder), items


def train_message(rid: str, job_dir: Path, dataset_dir: str, items: list[dict], *, steps: int = 10, every: int = 4,
                  resume: dict | None = None, base: str = SDXL, **hp) -> dict:
    hyper = {"rank": 4, "learning_rate": 1e-3, "steps": steps, "batch_size": 1, "gradient_accumulation": 1,
             "resolution": 256, "seed": 7, "train_text_encoder": False, "checkpoint_every": every, **hp}
    msg = {"v": 1, "type": "train", "id": rid, "job_id": f"job-{rid}", "attempt": 1, "job_dir": str(job_dir),
           "dataset_dir": dataset_dir, "resume": resume,
           "request": {"base_model": base, "dataset": {"items": items}, "output": {"name": LORA}, "hyperparameters": hyper,
                       "priority": "normal", "timeout_s": 3600}}
    assert not validation_problems("agent-to-worker", msg)
    return msg


def sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_progress(before: list[dict]) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in before if m["type"] == "progress" and m["stage"] == "train"]


def test_train_streams_loss_writes_checkpoints_and_a_lora(spawn, tmp_path):
    worker = spawn(STEP_ENV)
    assert "training" in worker.hello()["capabilities"]["features"]
    ds, items = dataset(tmp_path)
    before, trained = worker.run(train_message("t1", tmp_path / "job", ds, items))
    assert trained["type"] == "trained", trained
    progress = train_progress(before)
    assert [s for s, _ in progress] == list(range(1, 11))
    losses = [loss for _, loss in progress]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) and losses[-1] < losses[0]
    assert trained["final_loss"] == losses[-1] and trained["steps"] == 10
    assert [m["stage"] for m in before if m["type"] == "progress"][0] == "loading_model"

    checkpoints = [m for m in before if m["type"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [4, 8]  # every 4 steps, never the last one
    order = [(m["type"], m.get("step")) for m in before if m["type"] in ("progress", "checkpoint") and m.get("stage") != "loading_model"]
    assert order.index(("checkpoint", 4)) == order.index(("progress", 4)) + 1  # written right after its step
    for c in checkpoints:
        assert os.path.isfile(c["path"]) and sha(c["path"]) == c["sha256"] and os.path.getsize(c["path"]) == c["bytes"]
    assert not [f for f in os.listdir(tmp_path / "job" / "checkpoints") if "tmp" in f]  # atomic writes leave nothing behind

    assert trained["path"] == str(tmp_path / "job" / "team~cat-lora.safetensors")
    assert sha(trained["path"]) == trained["sha256"] and os.path.getsize(trained["path"]) == trained["bytes"]
    assert trained["timings"]["train_ms"] >= 90 and trained["timings"]["model_load_ms"] >= 0
    assert {r["name"] for r in trained["state"]["resident"]} == {SDXL}

    raw = Path(trained["path"]).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len % 8 == 0
    tensors, meta = safetensors_io.read(trained["path"])
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 64) and tensors[f"{key}.lora_B.weight"].shape == (64, 4)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert meta["base_model"] == SDXL and meta["rank"] == "4" and meta["step"] == "10"
    ck_tensors, ck_meta = safetensors_io.read(checkpoints[1]["path"])
    assert ck_meta["step"] == "8" and not np.array_equal(ck_tensors[f"{key}.lora_B.weight"], tensors[f"{key}.lora_B.weight"])


def test_cancel_keeps_the_last_checkpoint_and_resume_is_byte_identical(spawn, tmp_path):
    worker = spawn({"KILN_SYNTHETIC_TRAIN_STEP_MS": "480"})  # 30 ms per step
    ds, items = dataset(tmp_path)
    worker.send(train_message("first", tmp_path / "a1", ds, items, steps=12, every=3))
    while True:  # cancel once the checkpoint of step 6 is announced
        msg = worker.recv()
        if msg["type"] == "checkpoint" and msg["step"] == 6:
            last = msg
            worker.send({"v": 1, "type": "cancel", "id": "first"})
            break
    before, err = worker.until_final("first")
    assert err["type"] == "error" and err["error"]["code"] == "canceled"
    assert not [m for m in before if m["type"] == "checkpoint"]  # stopped before step 9
    assert sorted(os.listdir(tmp_path / "a1" / "checkpoints")) == ["step-000003.safetensors", "step-000006.safetensors"]
    assert sha(last["path"]) == last["sha256"]
    assert not (tmp_path / "a1" / "team~cat-lora.safetensors").exists()

    # the agent downloads the checkpoint into the next attempt's job dir and resumes
    (tmp_path / "a2").mkdir()
    resume_path = shutil.copy(last["path"], tmp_path / "a2" / "resume-step-6.safetensors")
    before2, resumed = worker.run(train_message("second", tmp_path / "a2", ds, items, steps=12, every=3,
                                                resume={"path": str(resume_path), "step": 6}))
    assert resumed["type"] == "trained"
    assert [s for s, _ in train_progress(before2)] == list(range(7, 13))
    assert [c["step"] for c in before2 if c["type"] == "checkpoint"] == [9]

    fast = spawn()  # an uninterrupted run elsewhere (timing doesn't change the weights)
    before3, whole = fast.run(train_message("whole", tmp_path / "w", ds, items, steps=12, every=3))
    assert whole["sha256"] == resumed["sha256"] and whole["bytes"] == resumed["bytes"]
    assert Path(whole["path"]).read_bytes() == Path(resumed["path"]).read_bytes()
    assert train_progress(before3)[6:] == train_progress(before2)  # the same loss curve
    assert {c["step"]: c["sha256"] for c in before3 if c["type"] == "checkpoint"}[6] == last["sha256"]

    # a checkpoint that can't be used (wrong step, corrupt) is a reason to start over, not to fail
    Path(resume_path).write_bytes(b"garbage")
    before4, restarted = fast.run(train_message("third", tmp_path / "a3", ds, items, steps=12, every=3,
                                                resume={"path": str(resume_path), "step": 6}))
    assert restarted["sha256"] == whole["sha256"] and train_progress(before4)[0][0] == 1
    assert any(m["type"] == "log" and m["level"] == "warning" and "cannot resume" in m["message"] for m in before4)


def test_bad_datasets_and_models_are_refused_naming_the_field(spawn, tmp_path):
    worker = spawn(STEP_ENV)
    ds, items = dataset(tmp_path)
    os.remove(os.path.join(ds, "1.png"))
    _, missing = worker.run(train_message("missing", tmp_path / "j1", ds, items))
    assert missing["error"]["code"] == "invalid_request" and missing["error"]["message"].startswith("dataset.items.1.image:")
    Path(ds, "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _, corrupt = worker.run(train_message("corrupt", tmp_path / "j2", ds, items))
    assert corrupt["error"]["code"] == "invalid_request" and corrupt["error"]["message"].startswith("dataset.items.1.image:")
    assert "decodable" in corrupt["error"]["message"]
    _, unknown = worker.run(train_message("unknown", tmp_path / "j3", ds, items, base="nobody/model"))
    assert unknown["error"]["code"] == "model_not_found" and unknown["error"]["message"].startswith("base_model:")
    _, wrong = worker.run(train_message("wrong", tmp_path / "j4", ds, items, base="kiln/lora-watercolor"))
    assert wrong["error"]["code"] == "invalid_request" and wrong["error"]["message"].startswith("base_model:")
    for name in ("j1", "j2", "j3", "j4"):
        assert not (tmp_path / name).exists()  # nothing written before the checks passed


def test_a_trained_lora_placed_in_the_lora_dir_is_usable_and_changes_the_pixels(spawn, tmp_path):
    lora_dir = tmp_path / "loras"  # the agent creates it when it first fetches a LoRA
    worker = spawn({**STEP_ENV, "KILN_LORA_DIR": str(lora_dir)})
    assert LORA not in [m["name"] for m in worker.hello()["capabilities"]["models"]]
    common = dict(width=64, height=64, steps=2, seed=5)
    _, early = worker.run(generate_message("early", str(tmp_path / "e"), loras=[{"name": LORA, "weight": 1}], **common))
    assert early["error"]["code"] == "model_not_found" and early["error"]["message"].startswith("loras.0.name:")

    ds, items = dataset(tmp_path)
    _, trained = worker.run(train_message("t", tmp_path / "job", ds, items, steps=4))
    lora_dir.mkdir()
    shutil.copy(trained["path"], lora_dir / "team~cat-lora.safetensors.part")  # the agent's download, then rename
    os.rename(lora_dir / "team~cat-lora.safetensors.part", lora_dir / "team~cat-lora.safetensors")

    _, plain = worker.run(generate_message("plain", str(tmp_path / "p"), **common))
    _, styled = worker.run(generate_message("styled", str(tmp_path / "s"), loras=[{"name": LORA, "weight": 1}], **common))
    assert styled["type"] == "result" and LORA in styled["loaded_models"]
    assert styled["outputs"][0]["sha256"] != plain["outputs"][0]["sha256"]
    with Image.open(plain["outputs"][0]["path"]) as a, Image.open(styled["outputs"][0]["path"]) as b:
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean() > 1
    info = next(m for m in worker.hello()["capabilities"]["models"] if m["name"] == LORA)
    assert info["kind"] == "lora"

import json

import pytest

from kiln_worker.config import DEFAULT_MODELS, ConfigError, load_config
from kiln_worker.errors import ERROR_CODES, WorkerError, coerce_error, is_retryable
from conftest import SCHEMAS


def _schema_error_codes() -> set[str]:
    schema = json.loads((SCHEMAS / "worker-to-agent.json").read_text())
    error_branch = next(b for b in schema["oneOf"] if b["properties"]["type"]["const"] == "error")
    return set(error_branch["properties"]["error"]["properties"]["code"]["enum"])


def test_every_contract_error_code_has_a_retry_decision():
    assert _schema_error_codes() == set(ERROR_CODES)


@pytest.mark.parametrize("code,retryable", [("out_of_memory", True), ("model_not_found", False), ("canceled", False),
                                            ("invalid_request", False), ("internal", False), ("unavailable", True)])
def test_retryable_follows_the_contracts(code, retryable):
    assert is_retryable(code) is retryable
    assert WorkerError(code, "x").to_wire() == {"code": code, "message": "x", "retryable": retryable}


def test_unknown_code_is_refused():
    with pytest.raises(ValueError):
        WorkerError("bogus", "x")


def test_coerce_error_keeps_worker_errors_and_wraps_the_rest():
    err = WorkerError("canceled", "stop")
    assert coerce_error(err) is err
    wrapped = coerce_error(KeyError("width"))
    assert wrapped.code == "internal" and "KeyError" in wrapped.message and "width" in wrapped.message


def test_defaults():
    config = load_config({})
    assert config.backend == "synthetic"
    assert config.synthetic_step_ms == 50
    assert config.synthetic_load_ms_per_gb == 400
    assert config.synthetic_vram_mb == 24576
    assert config.synthetic_gpu_name == "Synthetic GPU"
    assert config.synthetic_models == DEFAULT_MODELS
    assert not config.synthetic_stray_print


def test_reads_every_variable():
    config = load_config({
        "KILN_BACKEND": "diffusers", "KILN_SYNTHETIC_STEP_MS": "0", "KILN_SYNTHETIC_LOAD_MS_PER_GB": "12.5",
        "KILN_SYNTHETIC_VRAM_MB": "8192", "KILN_SYNTHETIC_GPU_NAME": "RTX 4090",
        "KILN_SYNTHETIC_MODELS": '[{"name": "a/b", "kind": "base", "vram_mb": 100, "disk_gb": 1}]',
        "KILN_SYNTHETIC_STRAY_PRINT": "1",
    })
    assert config.backend == "diffusers"
    assert config.synthetic_step_ms == 0
    assert config.synthetic_load_ms_per_gb == 12.5
    assert config.synthetic_vram_mb == 8192
    assert config.synthetic_gpu_name == "RTX 4090"
    assert [m.name for m in config.synthetic_models] == ["a/b"]
    assert config.synthetic_stray_print


def test_names_every_bad_variable_at_once():
    with pytest.raises(ConfigError) as info:
        load_config({
            "KILN_BACKEND": "tensorrt", "KILN_SYNTHETIC_STEP_MS": "fast", "KILN_SYNTHETIC_LOAD_MS_PER_GB": "-1",
            "KILN_SYNTHETIC_VRAM_MB": "12.5", "KILN_SYNTHETIC_MODELS": '[{"name": "", "kind": "textual_inversion", "vram_mb": "x"}]',
        })
    text = str(info.value)
    for name in ["KILN_BACKEND", "KILN_SYNTHETIC_STEP_MS", "KILN_SYNTHETIC_LOAD_MS_PER_GB", "KILN_SYNTHETIC_VRAM_MB",
                 "KILN_SYNTHETIC_MODELS[0].name", "KILN_SYNTHETIC_MODELS[0].kind", "KILN_SYNTHETIC_MODELS[0].vram_mb",
                 "KILN_SYNTHETIC_MODELS[0].disk_gb"]:
        assert name in text


@pytest.mark.parametrize("raw", ["not json", "{}", "[]", '[{"name": "a", "kind": "base", "vram_mb": 1, "disk_gb": 1}, {"name": "a", "kind": "base", "vram_mb": 1, "disk_gb": 1}]'])
def test_rejects_bad_model_lists(raw):
    with pytest.raises(ConfigError, match="KILN_SYNTHETIC_MODELS"):
        load_config({"KILN_SYNTHETIC_MODELS": raw})


def test_new_synthetic_variables_are_parsed_and_checked(tmp_path):
    from kiln_worker.config import ConfigError, load_config

    config = load_config({"KILN_SYNTHETIC_LORA_DIR": str(tmp_path), "KILN_SYNTHETIC_NSFW_WORD": "boo", "KILN_SYNTHETIC_NO_BF16": "1",
                          "KILN_SYNTHETIC_MODELS": '[{"name": "b", "kind": "base", "vram_mb": 1, "disk_gb": 1},'
                                                   ' {"name": "c", "kind": "controlnet", "vram_mb": 1, "disk_gb": 1, "controlnet_type": "depth"},'
                                                   ' {"name": "u", "kind": "upscaler", "vram_mb": 1, "disk_gb": 1, "scale": 2}]'})
    assert (config.synthetic_lora_dir, config.synthetic_nsfw_word, config.synthetic_no_bf16) == (str(tmp_path), "boo", True)
    assert [(m.controlnet_type, m.scale) for m in config.synthetic_models] == [(None, None), ("depth", None), (None, 2)]
    with pytest.raises(ConfigError) as info:
        load_config({"KILN_SYNTHETIC_LORA_DIR": str(tmp_path / "nope"), "KILN_SYNTHETIC_NO_BF16": "yes",
                     "KILN_SYNTHETIC_MODELS": '[{"name": "c", "kind": "controlnet", "vram_mb": 1, "disk_gb": 1},'
                                              ' {"name": "u", "kind": "upscaler", "vram_mb": 1, "disk_gb": 1, "scale": 3},'
                                              ' {"name": "b", "kind": "base", "vram_mb": 1, "disk_gb": 1, "scale": 2}]'})
    text = str(info.value)
    for name in ["KILN_SYNTHETIC_LORA_DIR", "KILN_SYNTHETIC_NO_BF16", "KILN_SYNTHETIC_MODELS[0].controlnet_type",
                 "KILN_SYNTHETIC_MODELS[1].scale", "KILN_SYNTHETIC_MODELS[2].scale"]:
        assert name in text


def test_residency_training_and_lora_dir_variables(tmp_path):
    config = load_config({})
    assert (config.lora_dir, config.synthetic_ram_mb, config.synthetic_ram_load_factor, config.synthetic_train_step_ms) == (None, 65536, 0.15, 50)
    config = load_config({"KILN_LORA_DIR": str(tmp_path / "not-yet"), "KILN_SYNTHETIC_RAM_MB": "0",
                          "KILN_SYNTHETIC_RAM_LOAD_FACTOR": "0.5", "KILN_SYNTHETIC_TRAIN_STEP_MS": "7"})
    assert (config.lora_dir, config.synthetic_ram_mb, config.synthetic_ram_load_factor, config.synthetic_train_step_ms) == (
        str(tmp_path / "not-yet"), 0, 0.5, 7)  # the agent creates KILN_LORA_DIR when it first needs it
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as info:
        load_config({"KILN_LORA_DIR": str(tmp_path / "file"), "KILN_SYNTHETIC_RAM_MB": "lots",
                     "KILN_SYNTHETIC_RAM_LOAD_FACTOR": "1.5", "KILN_SYNTHETIC_TRAIN_STEP_MS": "-1"})
    for name in ["KILN_LORA_DIR", "KILN_SYNTHETIC_RAM_MB", "KILN_SYNTHETIC_RAM_LOAD_FACTOR", "KILN_SYNTHETIC_TRAIN_STEP_MS"]:
        assert name in str(info.value)

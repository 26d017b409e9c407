"""The diffusers backend's configuration, read from the environment once when the backend starts.

Every bad variable is collected and reported together, like kiln_worker.config. These variables
belong to this backend only; the synthetic backend never reads them.

| variable | default | meaning |
|---|---|---|
| `MODELS_DIR` | `/models` | local models: `<kind>/<name>/` diffusers folders or `<kind>/<name>.safetensors` files |
| `KILN_DIFFUSERS_DEVICE` | `auto` | `auto` (cuda when available, else cpu), `cuda`, `cuda:N` or `cpu` |
| `KILN_DIFFUSERS_CPU_MEMORY_MB` | `8192` | the memory budget reported and enforced as "VRAM" on a CPU-only worker |
| `KILN_DIFFUSERS_RAM_CACHE_MB` | half of host RAM | host RAM for models evicted from VRAM but kept warm (`0` disables) |
| `KILN_DIFFUSERS_HF_CACHE` | `1` | `1` also lists SDXL models already in the local Hugging Face cache |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MODELS_DIR = "/models"


@dataclass(frozen=True)
class DiffusersSettings:
    models_dir: str = DEFAULT_MODELS_DIR
    device: str = "auto"
    cpu_memory_mb: int = 8192
    ram_cache_mb: int | None = None  # None: half of physical RAM
    scan_hf_cache: bool = True
    hf_cache_dir: str | None = None  # None: huggingface_hub's own (HF_HUB_CACHE / HF_HOME)


class SettingsError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("invalid diffusers backend configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def _int(env: Mapping[str, str], name: str, problems: list[str], minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r}: must be an integer")
        return None
    if value < minimum:
        problems.append(f"{name}={raw!r}: must be >= {minimum}")
        return None
    return value


def load_settings(env: Mapping[str, str] | None = None) -> DiffusersSettings:
    """Parse the environment; raise SettingsError naming every bad variable."""
    env = os.environ if env is None else env
    problems: list[str] = []
    models_dir = env.get("MODELS_DIR", "").strip()
    if models_dir:
        if not os.path.isdir(models_dir):
            problems.append(f"MODELS_DIR={models_dir!r}: not a directory")
    else:
        models_dir = DEFAULT_MODELS_DIR  # absent is fine: the HF cache may hold models
    device = env.get("KILN_DIFFUSERS_DEVICE", "").strip() or "auto"
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        problems.append(f"KILN_DIFFUSERS_DEVICE={device!r}: must be auto, cpu, cuda or cuda:N")
    cpu_memory_mb = _int(env, "KILN_DIFFUSERS_CPU_MEMORY_MB", problems, 1)  # any budget: tests size it to tiny models
    ram_cache_mb = _int(env, "KILN_DIFFUSERS_RAM_CACHE_MB", problems, 0)
    hf = env.get("KILN_DIFFUSERS_HF_CACHE", "").strip() or "1"
    if hf not in ("0", "1"):
        problems.append(f"KILN_DIFFUSERS_HF_CACHE={hf!r}: must be 0 or 1")
    if problems:
        raise SettingsError(problems)
    return DiffusersSettings(
        models_dir=models_dir,
        device=device,
        cpu_memory_mb=cpu_memory_mb if cpu_memory_mb is not None else 8192,
        ram_cache_mb=ram_cache_mb,
        scan_hf_cache=hf == "1",
    )


def physical_ram_mb() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))
    except (ValueError, OSError, AttributeError):
        return 0


def available_ram_mb() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

"""The self-test: `npm run gpu-check` run inside the worker, on the backend and models it has, for
a self-test job (POST /v1/admin/self-tests). The report is the SelfTestReport of the contracts.

1. environment — device, driver, torch/diffusers/… versions (gpu_check.environment on diffusers;
   on synthetic, the versions installed, read without importing torch, and no CUDA device).
2. models — every item of MODELS_DIR with a verdict (gpu_check.validate_models). The synthetic
   backend simulates its models; it validates MODELS_DIR only when one is set.
3. benchmark — the gpu-check cases through a backend:
   - diffusers on a GPU with a base model: the worker's own backend and weights (mode "real");
   - diffusers without a GPU or without a base model: the tiny random SDXL pipeline, in a backend
     of its own that is dropped afterwards (mode "tiny", and the note says so);
   - synthetic: its own simulated costs (mode "synthetic"), labelled as such, never GPU figures.
   The benchmark loads, moves and unloads models; models pinned before it are put back where they
   were and pinned again (also after a cancel), and `residency` reports before and after.

Progress: stage `self_test`, step = checks and cases done of the total; cancel stops it between
cases (and between denoising steps inside one).
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import threading
import time
from typing import Any, Callable

from . import gpu_check
from .errors import WorkerError

log = logging.getLogger("kiln_worker.self_test")

SYNTHETIC_DEFAULTS = {"size": 256, "steps": 10}
SYNTHETIC_NOTE = ("synthetic backend: simulated costs (KILN_SYNTHETIC_STEP_MS per 1024² step, KILN_SYNTHETIC_LOAD_MS_PER_GB); "
                  "these rows show the check runs, they are not GPU figures")


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise WorkerError("canceled", "canceled by the agent")


def _residents(backend: Any) -> list[dict]:
    return [{"name": r["name"], "location": r["location"], "pinned": bool(r.get("pinned"))} for r in backend.state()["resident"]]


def _synthetic_environment(backend: Any) -> dict:
    """What a host without the diffusers path has: versions as installed, no CUDA device."""
    version = gpu_check._version  # noqa: SLF001 — the same reader as gpu-check
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "cuda": None,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "spandrel": version("spandrel"),
        "peft": version("peft"),
        "cuda_available": False,
        "devices": [],
        "driver": None,
    }


def _models_dir(backend: Any) -> str | None:
    if backend.name == "diffusers":
        return backend._settings.models_dir  # noqa: SLF001 — the folder the backend itself reads
    return os.environ.get("MODELS_DIR") or None


def _restore_pins(backend: Any, before: list[dict]) -> tuple[list[str], list[str]]:
    """Puts models pinned before the benchmark back where they were, pinned; (restored, problems)."""
    now = {r["name"]: r for r in _residents(backend)}
    restored: list[str] = []
    problems: list[str] = []
    for location in ("vram", "ram"):
        lost = [r["name"] for r in before if r["pinned"] and r["location"] == location
                and not ((n := now.get(r["name"])) and n["pinned"] and n["location"] == location)]
        if not lost:
            continue
        try:
            # a fresh event: a cancel of the self-test must not stop its clean-up
            backend.load(lost, location, True, lambda *a: None, threading.Event())
            restored += lost
        except Exception as exc:  # noqa: BLE001 — reported, and the verdict fails
            problems.append(f"could not restore the pinned models {', '.join(lost)} to {location}: {exc}")
    return restored, problems


def run_self_test(backend: Any, message: dict, progress_cb: Callable[..., None], cancel: threading.Event,
                  log_cb: Callable[[str, str], None]) -> dict:
    """Runs the checks the `self_test` message asks for; returns the report (SelfTestReport)."""
    started = time.perf_counter()
    checks = list(message["checks"])
    opts = message.get("benchmark") or {}
    before = _residents(backend)
    report: dict[str, Any] = {
        "backend": backend.name,
        "checks": checks,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": None,
        "models": None,
        "benchmark": None,
    }
    reasons: list[str] = []
    restored: list[str] = []
    problems: list[str] = []

    # the benchmark's backend and cases are planned first, so progress has a total from the start
    bench_backend, mode, note, cuda, size, steps, base, cases = None, None, None, False, 0, 0, None, []
    unusable: str | None = None  # why there is nothing to benchmark
    if "benchmark" in checks:
        if backend.name == "diffusers":
            cuda = backend._device.startswith("cuda")  # noqa: SLF001
            has_base = any(m["kind"] == "base" for m in backend.capabilities()["models"])
            mode, defaults = ("real", gpu_check.REAL) if cuda and has_base else ("tiny", gpu_check.TINY)
            if mode == "real":
                bench_backend = backend
            else:
                note = gpu_check.tiny_note(cuda)
                log_cb("info", "self-test: building the tiny random SDXL pipeline for the benchmark")
                try:
                    bench_backend = gpu_check.tiny_backend(os.path.join(message["job_dir"], "tiny-models"), backend._device)  # noqa: SLF001
                except Exception as exc:  # noqa: BLE001 — reported; the other checks still run
                    log.exception("self-test: the tiny pipeline could not be built")
                    unusable = f"the tiny random pipeline could not be built: {type(exc).__name__}: {exc}"
        else:
            bench_backend, mode, defaults, note = backend, "synthetic", SYNTHETIC_DEFAULTS, SYNTHETIC_NOTE
        size, steps = opts.get("size") or defaults["size"], opts.get("steps") or defaults["steps"]
        if bench_backend is not None:
            base, cases = gpu_check.plan_cases(bench_backend, mode, size, steps, opts.get("schedulers"))
            if not cases:
                unusable = "no base model to benchmark"
    total = sum(1 for c in checks if c != "benchmark") + len(cases)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        progress_cb("self_test", done, total)

    progress_cb("self_test", 0, total)
    try:
        if "environment" in checks:
            env = gpu_check.environment() if backend.name == "diffusers" else _synthetic_environment(backend)
            report["environment"] = {"backend": backend.name, "device": backend.device(), **env}
            step()
        _check_cancel(cancel)
        if "models" in checks:
            folder = _models_dir(backend)
            if folder and os.path.isdir(folder):
                items = gpu_check.validate_models(folder)
                synthetic = backend.name == "synthetic"
                report["models"] = {"models_dir": folder, "items": items,
                                    "note": "validated the files; the synthetic backend does not load them" if synthetic else None}
                for m in items:
                    if not m["ok"]:
                        reasons.append(f"model {m['kind']} {m['name']}: {'; '.join(m['problems']) or 'not usable'}")
            else:
                why = ("the synthetic backend simulates its models (KILN_SYNTHETIC_MODELS) and MODELS_DIR is not set"
                       if backend.name == "synthetic" and not folder else f"MODELS_DIR {folder!r} is not a directory")
                report["models"] = {"models_dir": folder, "items": [], "note": why}
            step()
        _check_cancel(cancel)
        if "benchmark" in checks:
            if unusable:
                report["benchmark"] = {"mode": mode, "note": unusable, "base": None, "size": size, "steps": steps,
                                       "device": (bench_backend or backend).device(), "rows": []}
                reasons.append(f"benchmark: {unusable}")
            else:
                def on_case(row: dict) -> None:
                    state = "skipped" if row["ok"] is None else "ok" if row["ok"] else f"FAILED: {row.get('error', '')[:200]}"
                    log_cb("info", f"self-test case {row['case']}: {state}")

                bench = gpu_check.Bench(bench_backend, os.path.join(message["job_dir"], "bench"), cuda, cancel, on_case)
                for _, run in cases:
                    _check_cancel(cancel)
                    run(bench)
                    step()
                report["benchmark"] = {"mode": mode, "note": note, "base": base, "size": size, "steps": steps,
                                       "device": bench_backend.device(), "rows": bench.rows}
                reasons += [f"benchmark case {r['case']} failed: {r.get('error', '')}" for r in bench.rows if r["ok"] is False]
    finally:
        if bench_backend is backend:
            restored, problems = _restore_pins(backend, before)
        elif bench_backend is not None:
            # the tiny pipeline's own backend: free what it loaded before it goes
            cases.clear()
            bench_backend.unload([r["name"] for r in bench_backend.state()["resident"]])
            bench_backend = None
            gc.collect()
            if cuda:
                import torch

                torch.cuda.empty_cache()
    reasons += problems
    report["residency"] = {"before": before, "after": _residents(backend), "restored": restored, "problems": problems}
    report["verdict"] = "fail" if reasons else "pass"
    report["reasons"] = reasons
    report["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return report


"""`npm run gpu-check`: what this GPU host can do, for an operator, before it joins the farm.

1. Environment: device, driver, CUDA, torch, diffusers, transformers, spandrel versions.
2. Models: every item of MODELS_DIR (the layout the diffusers backend reads), each with a verdict:
   safetensors headers readable, the config it needs present (model_index.json, config.json, or
   the staged config of a single file), parameters, bytes on disk, VRAM at fp16.
3. Benchmark, through the diffusers backend itself (the code path jobs take): SDXL base at
   1024², 30 steps, per scheduler; base + refiner; with a LoRA; loading the base cold from disk
   and warm from host RAM; fp16 against bf16; a one-step turbo-class model if one is there;
   wall time, per-stage timings and peak VRAM of each.
Prints a table and writes the whole report as JSON (`--json`, default .kiln/gpu-check.json).

Without a GPU or without a base model in MODELS_DIR it builds the tiny random SDXL pipeline the
tests use (offline) and benchmarks that instead, at a small size, and says so: the numbers then
only show the check works, not what the host can do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable

from . import tables
from .torch_compat import ensure_torchvision_importable

WORKERS_PY = Path(__file__).resolve().parents[1]
REAL = {"size": 1024, "steps": 30}
TINY = {"size": 128, "steps": 10}


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Device, driver and library versions (torch imported here: it is required)."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "spandrel": _version("spandrel"),
        "peft": _version("peft"),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "driver": None,
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["devices"].append({"index": i, "name": p.name, "vram_mb": p.total_memory // 2**20,
                                   "compute_capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()})
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20)
                env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
            except (OSError, subprocess.SubprocessError):
                pass
    return env


# -- models --------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def validate_models(models_dir: str) -> list[dict]:
    """One row per MODELS_DIR item: kind, name, ok, problems, params, disk bytes, vram_mb (fp16)."""
    from .backends.diffusers_parts import catalog

    rows: list[dict] = []
    if not os.path.isdir(models_dir):
        return rows
    capture = _Capture()
    log = catalog.log  # its warnings say why an item is skipped
    log.addHandler(capture)
    try:
        for kind in catalog.KINDS:
            folders = [(os.path.join(models_dir, kind), None)]
            if kind == "controlnet":
                base = os.path.join(models_dir, kind)
                folders = [(os.path.join(base, t), t) for t in sorted(os.listdir(base))] if os.path.isdir(base) else []
            for folder, cn_type in folders:
                for path, name in catalog._items(folder):
                    capture.messages.clear()
                    problems = []
                    if kind == "controlnet" and cn_type not in tables.controlnet_types():
                        problems.append(f"{cn_type!r} is not a ControlNet type")
                        entry = None
                    else:
                        try:
                            entry = catalog._entry(models_dir, kind, path, name, cn_type)
                        except (OSError, ValueError) as exc:
                            entry, problems = None, [str(exc)]
                    # the catalog's own header warning is repeated, more precisely, by _header_problems
                    problems += [m for m in capture.messages if not m.startswith("cannot read the safetensors header")]
                    problems += _header_problems(path)
                    row = {"kind": kind, "name": name, "path": path, "ok": entry is not None and not problems, "problems": problems}
                    if entry is not None:
                        row.update(params=entry.params, disk_bytes=entry.disk_bytes, vram_mb_fp16=entry.vram_mb("fp16"),
                                   single_file=entry.single_file)
                        if entry.controlnet_type:
                            row["controlnet_type"] = entry.controlnet_type
                        if entry.scale:
                            row["scale"] = entry.scale
                    rows.append(row)
    finally:
        log.removeHandler(capture)
    return rows


def _header_problems(path: str) -> list[str]:
    """Every .safetensors under `path` must have a readable header."""
    from .backends.diffusers_parts.catalog import safetensors_params

    files = [path] if os.path.isfile(path) else [str(p) for p in Path(path).rglob("*.safetensors")]
    out = []
    for f in files:
        if not f.endswith(".safetensors"):
            continue
        try:
            safetensors_params(f)
        except Exception as exc:  # noqa: BLE001 — any failure is the file's
            out.append(f"{os.path.relpath(f, path) if f != path else os.path.basename(f)}: unreadable safetensors header ({exc})")
    return out


# -- benchmark -----------------------------------------------------------------------------------


def _tiny_models_dir(root: str) -> str:
    """The tests' tiny random SDXL suite (base, refiner, LoRA) under MODELS_DIR's layout."""
    sys.path.insert(0, str(WORKERS_PY / "tests"))
    from diffusers_support.tiny_sdxl import build_tiny_lora, build_tiny_refiner, build_tiny_sdxl

    stage, models = os.path.join(root, "stage"), os.path.join(root, "models")
    for sub in ("base", "refiner", "lora"):
        os.makedirs(os.path.join(models, sub))
    base = os.path.join(models, "base", "kiln--tiny-sdxl")
    shutil.move(build_tiny_sdxl(stage), base)
    shutil.move(build_tiny_refiner(stage), os.path.join(models, "refiner", "kiln--tiny-sdxl-refiner"))
    shutil.move(build_tiny_lora(stage, base), os.path.join(models, "lora", "kiln--tiny-lora.safetensors"))
    return models


def _request(base: str, size: int, steps: int, scheduler: str = "EulerDiscreteScheduler", **extra) -> dict:
    req = {
        "model": {"base": base},
        "scheduler": {"type": scheduler, "steps": steps},
        "hyperparameters": {"guidance_scale": 5.0, "seed": 1234, "width": size, "height": size, "num_images": 1},
        "conditioning": {"prompt": "a lighthouse on a cliff at dawn, detailed", "negative_prompt": ""},
        "output": {"format": "png", "quality": 90, "embed_metadata": True},
        "priority": "normal",
        "timeout_s": 3600,
    }
    for k, v in extra.items():
        req[k] = v
    return req


def _stopped(exc: BaseException) -> bool:
    """A cancel of the whole check (the self-test's request), not a failure of one case."""
    from .errors import WorkerError

    return isinstance(exc, WorkerError) and exc.code == "canceled"


class Bench:
    """Runs cases through one backend and keeps a row per case (a failed case is a row; a cancel
    of the whole check, through `cancel`, is raised). `on_case(row)` is told after each one."""

    def __init__(self, backend: Any, job_root: str, cuda: bool, cancel: threading.Event | None = None,
                 on_case: Callable[[dict], None] | None = None):
        self.backend, self.job_root, self.cuda = backend, job_root, cuda
        self.torch = None
        if cuda:
            import torch

            self.torch = torch
        self.cancel = cancel or threading.Event()
        self.on_case = on_case or (lambda row: None)
        self.rows: list[dict] = []
        self._n = 0

    def _row(self, row: dict) -> None:
        self.rows.append(row)
        self.on_case(row)

    def _peak_reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def _peak_mb(self) -> int | None:
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        return int(self.torch.cuda.max_memory_allocated() // 2**20)

    def generate(self, case: str, request: dict) -> None:
        self._n += 1
        job_dir = os.path.join(self.job_root, f"job-{self._n}")
        steps: dict[str, int] = {}

        def progress(stage: str, step: int, total: int, *_: Any) -> None:
            if stage in ("base", "refiner"):
                steps[stage] = step
        self._peak_reset()
        started = time.perf_counter()
        try:
            result = self.backend.generate(request, job_dir, progress, self.cancel, None, files={})
        except Exception as exc:  # noqa: BLE001 — a failed case is a row, not the end of the check
            if _stopped(exc):
                raise
            self._row({"case": case, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        wall = (time.perf_counter() - started) * 1000
        timings = result.outputs[0]["metadata"]["timings"]
        denoise_steps = sum(steps.values())
        denoise_ms = timings.get("base_ms", 0) + timings.get("refiner_ms", 0)
        self._row({"case": case, "ok": True, "wall_ms": round(wall, 1), "steps": steps,
                   "ms_per_step": round(denoise_ms / denoise_steps, 2) if denoise_steps else None,
                   "timings": timings, "peak_vram_mb": self._peak_mb(), "loaded": result.loaded_models})

    def load(self, case: str, models: list[str], location: str) -> None:
        self._peak_reset()
        try:
            res = self.backend.load(models, location, False, lambda *a: None, self.cancel)
        except Exception as exc:  # noqa: BLE001
            if _stopped(exc):
                raise
            self._row({"case": case, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        self._row({"case": case, "ok": True, "wall_ms": round(res.load_ms, 1), "moved": res.models, "peak_vram_mb": self._peak_mb()})

    def skip(self, case: str, why: str) -> None:
        self._row({"case": case, "ok": None, "skipped": why})


def _names(caps: dict, kind: str) -> list[str]:
    return sorted(m["name"] for m in caps["models"] if m["kind"] == kind)


def plan_cases(backend: Any, mode: str, size: int, steps: int, schedulers: list[str] | None) -> tuple[str | None, list[tuple[str, Callable[["Bench"], None]]]]:
    """The base model benchmarked and the cases on `backend`, from the models it has: (name, run); no
    base model, no cases. Loads first, so
    the generation rows are warm: cold from disk, out to host RAM and back; then the base per
    scheduler, base + refiner, with a LoRA, fp16 and bf16, a one-step turbo-class model. A case
    the models or the device cannot run is a skipped row."""
    caps = backend.capabilities()
    bases = _names(caps, "base")
    if not bases:
        return None, []
    turbo = [b for b in bases if any(w in b.lower() for w in ("turbo", "lightning", "hyper"))]
    base = next((b for b in bases if b not in turbo), bases[0])
    refiners, loras = _names(caps, "refiner"), _names(caps, "lora")
    cases: list[tuple[str, Callable[[Bench], None]]] = []

    def add(name: str, run: Callable[[Bench], None]) -> None:
        cases.append((name, run))

    def cold(b: Bench) -> None:
        b.backend.unload([base])  # a pin is lifted here; the self-test restores it afterwards
        b.load(f"load {base} from disk", [base], "vram")

    def warm_up(b: Bench) -> None:
        b.generate(f"warm-up ({base}, 1 step)", _request(base, size, 1))
        b.rows.pop()  # not a figure: the first run pays one-time costs

    add(f"load {base} from disk", cold)
    add(f"move {base} to host RAM", lambda b: b.load(f"move {base} to host RAM", [base], "ram"))
    add(f"load {base} from host RAM", lambda b: b.load(f"load {base} from host RAM", [base], "vram"))
    for i, sched in enumerate(schedulers or tables.schedulers()):
        name = f"base {size}² {steps} steps, {sched}"

        def per_scheduler(b: Bench, name: str = name, sched: str = sched, first: bool = i == 0) -> None:
            if first:
                warm_up(b)
            b.generate(name, _request(base, size, steps, sched))

        add(name, per_scheduler)
    if refiners:
        name = f"base + refiner ({refiners[0]}), switch 0.8"
        add(name, lambda b: b.generate(name, _request(base, size, steps, model={"base": base, "refiner": refiners[0]},
                                                      refiner={"denoising_switch": 0.8, "steps": steps})))
    else:
        add("base + refiner", lambda b: b.skip("base + refiner", "no refiner in MODELS_DIR"))
    if loras:
        add(f"with LoRA {loras[0]}", lambda b: b.generate(f"with LoRA {loras[0]}", _request(base, size, steps, loras=[{"name": loras[0], "weight": 0.8}])))
    else:
        add("with a LoRA", lambda b: b.skip("with a LoRA", "no LoRA in MODELS_DIR"))
    perf = {"attention_slicing": False, "vae_slicing": False, "vae_tiling": False, "cpu_offload": "none", "channels_last": False, "compile": False}
    for dtype in ("fp16", "bf16"):
        if dtype in caps["dtypes"]:
            add(f"base at {dtype}", lambda b, dtype=dtype: b.generate(f"base at {dtype}", _request(base, size, steps, performance={"dtype": dtype, **perf})))
        else:
            add(f"base at {dtype}", lambda b, dtype=dtype: b.skip(f"base at {dtype}", f"this device runs {', '.join(caps['dtypes'])} only"))
    if turbo:
        req = _request(turbo[0], 512 if mode == "real" else size, 1, scheduler="EulerAncestralDiscreteScheduler")
        req["hyperparameters"]["guidance_scale"] = 0.0
        add(f"turbo-class {turbo[0]}, 1 step", lambda b: b.generate(f"turbo-class {turbo[0]}, 1 step", req))
    else:
        add("one-step turbo-class model", lambda b: b.skip("one-step turbo-class model", "none in MODELS_DIR (a base named *turbo*, *lightning* or *hyper*)"))
    return base, cases


def tiny_backend(root: str, device: str = "auto") -> Any:
    """A diffusers backend over the tests' tiny random SDXL suite, built offline under `root`."""
    from .backends.diffusers_backend import DiffusersBackend
    from .backends.diffusers_parts.settings import DiffusersSettings
    from .config import Config

    return DiffusersBackend(Config(backend="diffusers"), DiffusersSettings(models_dir=_tiny_models_dir(root), scan_hf_cache=False, device=device))


def run_cases(backend: Any, mode: str, note: str | None, size: int, steps: int, schedulers: list[str] | None, job_root: str,
              cuda: bool, cancel: threading.Event | None = None, on_case: Callable[[dict], None] | None = None) -> dict:
    """The benchmark section of a report: {mode, note, base, size, steps, device, rows}."""
    base, cases = plan_cases(backend, mode, size, steps, schedulers)
    bench = Bench(backend, job_root, cuda, cancel, on_case)
    for _, run in cases:
        run(bench)
    return {"mode": mode, "note": note, "base": base, "size": size, "steps": steps, "device": backend.device(), "rows": bench.rows}


def benchmark(models_dir: str, size: int | None, steps: int | None, schedulers: list[str] | None) -> dict:
    """Run the cases on a diffusers backend of its own; returns {mode, note, base, size, steps, device, rows}."""
    import torch

    from .backends.diffusers_backend import DiffusersBackend
    from .backends.diffusers_parts.catalog import discover
    from .backends.diffusers_parts.settings import DiffusersSettings
    from .config import Config

    cuda = torch.cuda.is_available()
    found = discover(models_dir, hf_cache=False) if os.path.isdir(models_dir) else {}
    tmp = tempfile.mkdtemp(prefix="kiln-gpu-check-")
    try:
        if cuda and any(e.kind == "base" for e in found.values()):
            mode, defaults, note = "real", REAL, None
            backend = DiffusersBackend(Config(backend="diffusers"), DiffusersSettings(models_dir=models_dir, scan_hf_cache=False, device="auto"))
        else:
            mode, defaults = "tiny", TINY
            note = tiny_note(cuda)
            backend = tiny_backend(tmp)
        return run_cases(backend, mode, note, size or defaults["size"], steps or defaults["steps"], schedulers, os.path.join(tmp, "jobs"), cuda)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_note(cuda: bool) -> str:
    return ("no GPU here" if not cuda else "no base model in MODELS_DIR") + \
        ": benchmarked the tiny random SDXL pipeline the tests build; the numbers only show the check runs"


# -- report --------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(report: dict) -> str:
    env = report["environment"]
    out = ["Kiln GPU check", ""]
    devices = ", ".join(f"{d['name']} ({d['vram_mb']} MB, sm {d['compute_capability']})" for d in env["devices"]) or "none (CPU only)"
    out.append(f"device: {devices}; driver {env['driver'] or 'n/a'}; CUDA {env['cuda'] or 'n/a'}")
    out.append(f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, spandrel {env['spandrel'] or 'not installed'}, python {env['python']}")
    out.append("")
    models = report["models"]
    out.append(f"models in {report['models_dir']}: {sum(1 for m in models if m['ok'])} ok, {sum(1 for m in models if not m['ok'])} with problems")
    if models:
        out.append(_table(["kind", "name", "ok", "params", "disk MB", "VRAM MB fp16", "problems"],
                          [[m["kind"], m["name"], "yes" if m["ok"] else "NO", f"{m.get('params', 0):,}",
                            f"{m.get('disk_bytes', 0) / 2**20:.1f}", str(m.get("vram_mb_fp16", "")), "; ".join(m["problems"])] for m in models]))
    out.append("")
    b = report.get("benchmark")
    if b:
        out.append(f"benchmark ({b['mode']}: {b['base']} at {b['size']}², {b['steps']} steps on {b['device']['name']})")
        if b["note"]:
            out.append(f"NOTE: {b['note']}")
        rows = []
        for r in b["rows"]:
            if r["ok"] is None:
                rows.append([r["case"], "skipped", "", "", "", "", r["skipped"]])
            elif not r["ok"]:
                rows.append([r["case"], "FAILED", "", "", "", "", r["error"][:100]])
            else:
                t = r.get("timings", {})
                stages = " ".join(f"{k[:-3]} {v:.0f}" for k, v in t.items() if k != "model_load_ms")
                steps = "+".join(str(v) for v in r.get("steps", {}).values())
                rows.append([r["case"], f"{r['wall_ms']:.0f}", steps, "" if r.get("ms_per_step") is None else f"{r['ms_per_step']:.1f}",
                             "" if r.get("peak_vram_mb") is None else str(r["peak_vram_mb"]), stages, ", ".join(r.get("moved", []))])
        out.append(_table(["case", "wall ms", "steps", "ms/step", "peak VRAM MB", "stages (ms)", "notes"], rows))
    elif report.get("benchmark_skipped"):
        out.append(f"benchmark skipped: {report['benchmark_skipped']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="npm run gpu-check --", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default=os.environ.get("MODELS_DIR", "/models"))
    parser.add_argument("--json", default=str(WORKERS_PY.parent / ".kiln" / "gpu-check.json"), help="where to write the JSON report")
    parser.add_argument("--size", type=int, help="image side (default 1024 on a GPU, 128 on the tiny pipeline)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30, 10 on the tiny pipeline)")
    parser.add_argument("--schedulers", help="comma-separated scheduler classes (default: all ten)")
    parser.add_argument("--no-benchmark", action="store_true", help="report and validate only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        ensure_torchvision_importable()
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"gpu-check needs the diffusers extras ({exc}): run `npm run setup:diffusers`", file=sys.stderr)
        return 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": environment(),
                              "models_dir": args.models_dir, "models": validate_models(args.models_dir)}
    if args.no_benchmark:
        report["benchmark_skipped"] = "--no-benchmark"
    else:
        scheds = [s.strip() for s in args.schedulers.split(",")] if args.schedulers else None
        unknown = [s for s in scheds or [] if s not in tables.schedulers()]
        if unknown:
            parser.error(f"unknown schedulers: {', '.join(unknown)} (known: {', '.join(tables.schedulers())})")
        report["benchmark"] = benchmark(args.models_dir, args.size, args.steps, scheds)
    print(render(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"\nJSON report: {args.json}")
    bad_models = [m for m in report["models"] if not m["ok"]]
    failed = [r for r in (report.get("benchmark") or {}).get("rows", []) if r["ok"] is False]
    return 1 if bad_models or failed else 0


if __name__ == "__main__":
    sys.exit(main())

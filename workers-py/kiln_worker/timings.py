"""Per-stage timings of a generation, reported in `outputs[].metadata.timings` (never embedded in
the file). Both backends time their stages with `StageTimer`, so they report the same keys: the
contracts' STAGE_TIMING_KEYS (`schemas/tables.json`), `<stage>_ms` for model_load, compile, base,
refiner, upscale, safety, encode. A stage that did not run has no key; model_load, base and
encode are always there (model_load is ~0 when the suite was already resident).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from .tables import stage_timing_keys


class StageTimer:
    def __init__(self) -> None:
        self._keys = stage_timing_keys()
        self._ms: dict[str, float] = {}

    def _key(self, stage: str) -> str:
        key = f"{stage}_ms"
        if key not in self._keys:
            raise ValueError(f"{stage!r} is not a stage the contracts time ({', '.join(self._keys)})")
        return key

    @contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Time the body as `stage` (added to what the stage already took)."""
        key = self._key(stage)
        started = time.perf_counter()
        try:
            yield
        finally:
            self._ms[key] = self._ms.get(key, 0.0) + (time.perf_counter() - started) * 1000.0

    def record(self, stage: str, ms: float) -> None:
        key = self._key(stage)
        self._ms[key] = self._ms.get(key, 0.0) + ms

    def ms(self, stage: str) -> float:
        return self._ms.get(self._key(stage), 0.0)

    def as_dict(self) -> dict[str, float]:
        """The timings in the contracts' key order, rounded to µs."""
        return {k: round(self._ms[k], 3) for k in self._keys if k in self._ms}

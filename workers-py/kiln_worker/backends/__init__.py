"""Backends behind one interface (base.Backend); `load_backend` picks one by name."""

from __future__ import annotations

from ..config import Config
from .base import Backend, GenerateResult, LoadResult, TrainResult


class BackendUnavailable(Exception):
    """The configured backend cannot run in this build or on this machine."""


def load_backend(name: str, config: Config | None = None) -> Backend:
    config = config or Config(backend=name)
    if name == "synthetic":
        from .synthetic import SyntheticBackend

        return SyntheticBackend(config)
    if name == "diffusers":
        try:
            from .diffusers_backend import DiffusersBackend
        except ImportError as exc:
            raise BackendUnavailable(
                f"the diffusers backend isn't available in this build of kiln_worker ({exc}); run "
                "`npm run setup:diffusers` (workers-py/requirements-diffusers.txt), or set KILN_BACKEND=synthetic (the default) to run without a GPU"
            ) from exc
        return DiffusersBackend(config)
    raise BackendUnavailable(f"unknown backend {name!r} (expected synthetic or diffusers)")


__all__ = ["Backend", "BackendUnavailable", "GenerateResult", "LoadResult", "TrainResult", "load_backend"]

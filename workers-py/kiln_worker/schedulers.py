"""Scheduler specs as the worker receives them: a canonical diffusers class name plus options
(the API has already resolved aliases such as "DPM++ 2M Karras")."""

from __future__ import annotations

from .errors import invalid_request
from .tables import scheduler_aliases, scheduler_options, schedulers

# the request fields that become from_config overrides, in a fixed order
OPTION_FIELDS = ("use_karras_sigmas", "algorithm_type", "timestep_spacing", "solver_order")


def validate_scheduler(spec: dict) -> None:
    """Raise invalid_request naming `scheduler.<option>` when the scheduler lacks that option.

    Defence in depth: the API checks the same table (SCHEDULER_OPTIONS in the contracts).
    """
    kind = spec.get("type")
    opts = scheduler_options(kind) if isinstance(kind, str) else None
    if opts is None:
        raise invalid_request("scheduler.type", f"{kind!r} is not one of {', '.join(schedulers())}")
    if spec.get("use_karras_sigmas") and not opts["use_karras_sigmas"]:
        raise invalid_request("scheduler.use_karras_sigmas", f"{kind} has no Karras sigmas option")
    algorithm = spec.get("algorithm_type")
    if algorithm is not None and algorithm not in opts["algorithm_types"]:
        accepted = ", ".join(opts["algorithm_types"])
        raise invalid_request(
            "scheduler.algorithm_type",
            f"{kind} accepts {accepted}" if accepted else f"{kind} has no algorithm_type option",
        )
    if spec.get("solver_order") is not None and not opts["solver_order"]:
        raise invalid_request("scheduler.solver_order", f"{kind} has no solver_order option")
    if spec.get("timestep_spacing") is not None and not opts["timestep_spacing"]:
        raise invalid_request("scheduler.timestep_spacing", f"{kind} has no timestep_spacing option")


def scheduler_kwargs(spec: dict) -> dict:
    """The from_config overrides the spec asks for (only the options it gives)."""
    return {k: spec[k] for k in OPTION_FIELDS if spec.get(k) is not None}


def build_scheduler(spec: dict, base_config):
    """A diffusers scheduler of `spec["type"]` from a pipeline's scheduler config plus the options."""
    import diffusers

    validate_scheduler(spec)
    return getattr(diffusers, spec["type"]).from_config(base_config, **scheduler_kwargs(spec))


def display_name(spec: dict) -> str:
    """The familiar (A1111) name for a spec when one alias matches it exactly, else the class name."""
    options = scheduler_kwargs(spec)
    for alias, implied in scheduler_aliases().items():
        implied_opts = {k: v for k, v in implied.items() if k != "type"}
        if implied["type"] == spec["type"] and implied_opts == options:
            return alias
    return spec["type"]

"""Agent ↔ worker protocol v1: JSON lines, validated against the schemas generated from
packages/contracts (schemas/*.json; regenerate with `npm run gen:schemas`, never edit by hand).

- `protect_stdout()` keeps a private dup of fd 1 for frames and points fd 1 at stderr, so stray
  prints from libraries (or C code writing to fd 1) land in the logs instead of the protocol.
- `parse_line()` turns one input line into a validated message or an `InvalidMessage` that says
  which field broke which rule.
- `FrameWriter.send()` writes one frame per line, under a lock, flushed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import IO, Any, Callable

import fastjsonschema
from jsonschema import Draft202012Validator

PROTOCOL_VERSION = 1
log = logging.getLogger("kiln_worker.protocol")


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """`agent-to-worker` or `worker-to-agent`, as generated from the contracts."""
    text = resources.files("kiln_worker").joinpath("schemas", f"{name}.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def _branches(name: str) -> dict[str, Draft202012Validator]:
    """One validator per message type, so errors name the field, not 'is not valid under oneOf'."""
    schema = load_schema(name)
    out: dict[str, Draft202012Validator] = {}
    for branch in schema["oneOf"]:
        msg_type = branch["properties"]["type"]["const"]
        out[msg_type] = Draft202012Validator({"$schema": schema["$schema"], **branch})
    return out


def message_types(name: str) -> list[str]:
    return list(_branches(name))


def scheduler_names() -> list[str]:
    """The scheduler enum from the generated request schema (one list, owned by the contracts)."""
    generate = _branches("agent-to-worker")["generate"].schema
    return list(generate["properties"]["request"]["properties"]["scheduler"]["properties"]["type"]["enum"])


def _describe(error) -> list[str]:
    """'field: rule — message' for one jsonschema error, naming missing/extra keys individually."""
    path = [str(p) for p in error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        return [f"{'.'.join(path + [k])}: required — is missing" for k in missing]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in known)
        return [f"{'.'.join(path + [k])}: additionalProperties — not a field the protocol accepts here" for k in extra]
    field = ".".join(path) or "(message)"
    return [f"{field}: {error.validator} — {error.message}"]


@lru_cache(maxsize=None)
def _fast(name: str, msg_type: str) -> Callable[[Any], Any]:
    """The branch compiled to Python (fastjsonschema): a valid request is checked in microseconds,
    not the jsonschema walk's fraction of a millisecond, which the GPU would spend idle between
    jobs. It fills no defaults and checks no formats, as jsonschema does not: the two agree
    (tests/test_protocol_unit.py holds them to it), and only jsonschema says what is wrong."""
    schema = {k: v for k, v in _branches(name)[msg_type].schema.items() if k != "$schema"}
    return fastjsonschema.compile(schema, use_default=False, use_formats=False)


def validation_problems(name: str, message: Any) -> list[str]:
    """Every way `message` breaks schema `name`, as 'field: rule — message' lines; [] when valid."""
    if not isinstance(message, dict):
        return [f"(message): type — must be a JSON object, got {type(message).__name__}"]
    branches = _branches(name)
    msg_type = message.get("type")
    validator = branches.get(msg_type) if isinstance(msg_type, str) else None
    if validator is None:
        return [f"type: enum — {msg_type!r} is not one of {sorted(branches)}"]
    try:
        _fast(name, msg_type)(message)
        return []
    except Exception:  # noqa: BLE001 — a refusal (or fastjsonschema's own TypeError on some wrong types)
        pass  # jsonschema says what is wrong, and has the last word
    problems: list[str] = []
    for error in sorted(validator.iter_errors(message), key=lambda e: [str(p) for p in e.absolute_path]):
        problems.extend(_describe(error))
    return problems


@dataclass
class InvalidMessage:
    """An input line that is not a valid message; `id`/`type` are whatever could be pulled out."""

    id: str | None
    type: str | None
    problems: list[str]

    @property
    def description(self) -> str:
        return "; ".join(self.problems)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes | str) -> dict | InvalidMessage:
    """One input line → a validated agent-to-worker message, or InvalidMessage."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return InvalidMessage(None, None, [f"(line): encoding — not UTF-8 ({exc})"])
    try:
        message = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:
        snippet = line.strip()
        snippet = snippet if len(snippet) <= 120 else snippet[:117] + "..."
        return InvalidMessage(None, None, [f"(line): json — not JSON ({exc}): {snippet!r}"])
    problems = validation_problems("agent-to-worker", message)
    if not problems:
        return message
    msg_id = message.get("id") if isinstance(message, dict) else None
    msg_type = message.get("type") if isinstance(message, dict) else None
    usable_id = msg_id if isinstance(msg_id, str) and 1 <= len(msg_id) <= 200 else None
    return InvalidMessage(usable_id, msg_type if isinstance(msg_type, str) else None, problems)


class FrameWriter:
    """Writes protocol frames to the private stream; safe to call from any thread."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._lock = threading.Lock()
        self._broken = False

    def send(self, message: dict) -> None:
        frame = {"v": PROTOCOL_VERSION, **message}
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"
        with self._lock:
            if self._broken:
                return
            try:
                self._stream.write(text)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                # the agent is gone; stdin EOF or PDEATHSIG ends us, nothing to tell anyone
                self._broken = True
                log.error("protocol stream closed, dropping frames: %s", exc)

    def log(self, request_id: str | None, level: str, message: str) -> None:
        self.send({"type": "log", "id": request_id, "level": level, "message": message})

    def error(self, request_id: str, error: dict, state: dict | None) -> None:
        self.send({"type": "error", "id": request_id, "error": error, "state": state})


def protect_stdout() -> IO[str]:
    """Keep a private copy of fd 1 for frames; send fd 1 and sys.stdout to stderr from now on."""
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto

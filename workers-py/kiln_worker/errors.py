"""Errors the worker reports. Codes come from the ErrorCode enum in packages/contracts/src/errors.ts.

Whether a failure is worth another attempt is decided once, in `is_retryable`, mirroring the
contracts' `isRetryable`; a test checks that every code in the generated schema is decided here.
"""

from __future__ import annotations

RETRYABLE_CODES = frozenset(
    {
        "out_of_memory",  # another agent (or a fresh worker) may have room
        "worker_crashed",
        "worker_protocol",
        "agent_lost",
        "storage_failed",
        "unavailable",
    }
)
NON_RETRYABLE_CODES = frozenset(
    {
        "validation_failed",
        "unauthorized",
        "forbidden",
        "rate_limited",
        "quota_exceeded",
        "idempotency_mismatch",
        "request_timeout",
        "uri_too_long",
        "headers_too_large",
        "unsupported_media_type",
        "not_found",
        "conflict",
        "payload_too_large",
        "unschedulable",
        "internal",
        "invalid_request",
        "model_not_found",
        "timeout",
        "canceled",
        "max_attempts_exceeded",
        "integrity_failed",
    }
)
ERROR_CODES = RETRYABLE_CODES | NON_RETRYABLE_CODES


def is_retryable(code: str) -> bool:
    if code in RETRYABLE_CODES:
        return True
    if code in NON_RETRYABLE_CODES:
        return False
    raise ValueError(f"unknown error code {code!r}")


class WorkerError(Exception):
    """A failure with a stable code; `retryable` defaults to the contracts' decision for it."""

    def __init__(self, code: str, message: str, retryable: bool | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = is_retryable(code) if retryable is None else retryable

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    def __repr__(self) -> str:
        return f"WorkerError({self.code!r}, {self.message!r}, retryable={self.retryable})"


def coerce_error(exc: BaseException) -> WorkerError:
    """Any exception as a WorkerError: ours pass through, anything else is `internal`."""
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, MemoryError):
        return WorkerError("out_of_memory", f"host out of memory: {exc}")
    text = str(exc) or exc.__class__.__name__
    return WorkerError("internal", f"{exc.__class__.__name__}: {text}")


def invalid_request(field: str, message: str) -> WorkerError:
    """`invalid_request` naming the request field at fault (relative to the request, as the API names it)."""
    return WorkerError("invalid_request", f"{field}: {message}")


def model_not_found(field: str, message: str) -> WorkerError:
    """`model_not_found` naming the request field that asked for the model."""
    return WorkerError("model_not_found", f"{field}: {message}")

"""The adapter's exceptions: callers handle these, never the official client's own exception type."""

from __future__ import annotations

import json


class KubeError(Exception):
    """A request the API server refused or could not answer; `status` is the HTTP code (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: a stale resourceVersion, or a field owned by another manager."""


class AlreadyExists(Conflict):
    """409 on create: an object of that name exists."""


class Forbidden(KubeError):
    """401 or 403: the credentials may not do this."""


class Invalid(KubeError):
    """400 or 422: the object fails validation (schema, CEL rules, immutable fields)."""


class Unavailable(KubeError):
    """429, 5xx, a timeout or a broken connection, still so after the adapter's retries."""


def retryable(status: int) -> bool:
    """Answers worth another try after a pause: throttling and server-side failures."""
    return status == 429 or status >= 500


def from_response(status: int, body: bytes, what: str = "") -> KubeError:
    """The exception for a non-2xx answer to `what` (e.g. `GET /api/v1/...`); the message is the API server's
    `Status.message` when it sent one."""
    reason = ""
    message = body.decode(errors="replace")[:1024]
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        reason = str(decoded.get("reason") or "")
        message = str(decoded.get("message") or message)
    text = f"{what}: " if what else ""
    text += f"{status} {reason}: {message}" if reason else f"{status}: {message}"
    if status == 404:
        return NotFound(text, status)
    if status == 409:
        return AlreadyExists(text, status) if reason == "AlreadyExists" else Conflict(text, status)
    if status in (401, 403):
        return Forbidden(text, status)
    if status in (400, 422):
        return Invalid(text, status)
    if retryable(status):
        return Unavailable(text, status)
    return KubeError(text, status)

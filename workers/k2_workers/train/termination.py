"""Why a training worker stopped, in the pod's termination message (the kubelet copies the file into the status).

The file is `$K2_TERMINATION_LOG` (the operator sets it to the container's terminationMessagePath); without that
variable nothing is written, so local runs leave no files behind. The operator reads the message of the failed pod
into the K2Training's Failed and Restarting conditions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from k2_api.contract import Env, Files

log = logging.getLogger(__name__)


def preempted_message(step: int, checkpoint: str | None) -> str:
    return f"preempted at step {step}, checkpoint {checkpoint or 'none'}"


def crash_message(error: BaseException) -> str:
    """`<ExceptionType>: <message>`, the cause first (a chained exception's cause is appended)."""
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__
    if cause is not None:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def truncate(message: str, limit: int = Files.TERMINATION_MESSAGE_MAX_BYTES) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary (the kubelet would cut bytes)."""
    return message.encode()[:limit].decode(errors="ignore")


def termination_log(env: Mapping[str, str] = os.environ) -> Path | None:
    path = env.get(Env.TERMINATION_LOG)
    return Path(path) if path else None


def write_termination_message(message: str, env: Mapping[str, str] = os.environ) -> None:
    """Write `message` (truncated) to the termination log, if one is configured; never raises."""
    path = termination_log(env)
    if path is None:
        return
    try:
        path.write_text(truncate(message))
    except OSError as error:
        log.warning("could not write the termination message to %s: %s", path, error)

"""Manifest parts for the control-plane tests."""

from __future__ import annotations

from typing import Any

NEVER_PULLED_IMAGE = "registry.invalid/k2/worker:test"  # kwok runs no containers, so nothing pulls it


def container(name: str = "main", gpus: int | None = None, **extra: Any) -> dict[str, Any]:
    """A container spec, optionally asking for `gpus` nvidia.com/gpu."""
    spec: dict[str, Any] = {"name": name, "image": NEVER_PULLED_IMAGE, **extra}
    if gpus is not None:
        spec["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return spec

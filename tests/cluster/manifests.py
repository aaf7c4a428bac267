"""Manifest parts for the control-plane tests."""

from __future__ import annotations

from typing import Any

NEVER_PULLED_IMAGE = "registry.invalid/k2/worker:test"  # kwok runs no containers, so nothing pulls it
# Pods whose lifecycle kwok's stages fake must stay off the real node, which would try to run them.
KWOK_NODES = {"type": "kwok"}


def container(name: str = "main", gpus: int | None = None, **extra: Any) -> dict[str, Any]:
    """A container spec, optionally asking for `gpus` nvidia.com/gpu."""
    spec: dict[str, Any] = {"name": name, "image": NEVER_PULLED_IMAGE, **extra}
    if gpus is not None:
        spec["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return spec


def kwok_pod_spec(*containers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A pod spec pinned to the kwok nodes, holding `containers` (one default container when none are given)."""
    return {"nodeSelector": KWOK_NODES, "containers": list(containers) or [container()], **extra}

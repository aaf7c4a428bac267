"""A `Kube` wrapper that delays every server-side apply: catches the operator in the middle of a reconcile."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from k2_api.kube import Kube, Object, ObjectRef, Selector


class SlowApplyKube:
    """Delegates to `kube`; `apply` first sleeps `delay_s` seconds."""

    def __init__(self, kube: Kube, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s: {delay_s} must be >= 0")
        self.kube, self.delay_s = kube, delay_s

    @property
    def field_manager(self) -> str:
        return self.kube.field_manager

    def apply(self, manifest: Object) -> Object:
        time.sleep(self.delay_s)
        return self.kube.apply(manifest)

    def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        return self.kube.get(kind, namespace, name)

    def list(self, kind: str, namespace: str | None = None, selector: Selector | None = None) -> list[Object]:
        return self.kube.list(kind, namespace, selector)

    def apply_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Object:
        return self.kube.apply_status(kind, namespace, name, status)

    def create(self, manifest: Object, *, field_manager: str | None = None) -> Object | None:
        return self.kube.create(manifest, field_manager=field_manager)

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Mapping[str, Any], resource_version: str
    ) -> Object:
        return self.kube.merge_patch(kind, namespace, name, patch, resource_version)

    def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        grace_period_s: int | None = None,
    ) -> bool:
        return self.kube.delete(kind, namespace, name, propagation, grace_period_s)

    def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        self.kube.event(ref, event_type, reason, message)

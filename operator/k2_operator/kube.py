"""The operator's door to the Kubernetes API: the shared adapter (`k2_api.kube`), awaited from kopf's event loop.

Each call runs the synchronous adapter in a worker thread (`asyncio.to_thread`), so the loop never blocks. Every
write is made under the field manager `k2-operator` with server-side apply and force, so the operator owns exactly
the fields it sets: the workers' `status.progress`, the EPLB controller's placement spec and status fields, and the
users' own labels are left alone.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from k2_api.contract import FieldManagers
from k2_api.kube import Kube, Object, ObjectRef, Selector

FIELD_MANAGER = FieldManagers.OPERATOR


class AsyncKube:
    """`k2_api.kube.Kube`, awaitable."""

    def __init__(self, kube: Kube) -> None:
        self.sync = kube

    @classmethod
    def connect(cls, kubeconfig: Path | None = None) -> AsyncKube:
        """From `kubeconfig`, else $KUBECONFIG or ~/.kube/config, else the in-cluster ServiceAccount."""
        from k2_api.kube.client import connect

        return cls(connect(kubeconfig, field_manager=FIELD_MANAGER))

    async def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        return await asyncio.to_thread(self.sync.get, kind, namespace, name)

    async def list(self, kind: str, namespace: str | None, selector: Selector | None = None) -> list[Object]:
        return await asyncio.to_thread(self.sync.list, kind, namespace, selector)

    async def apply(self, manifest: Object) -> Object:
        return await asyncio.to_thread(self.sync.apply, manifest)

    async def apply_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Object:
        return await asyncio.to_thread(self.sync.apply_status, kind, namespace, name, status)

    async def create(self, manifest: Object, *, field_manager: str | None = None) -> Object | None:
        return await asyncio.to_thread(functools.partial(self.sync.create, manifest, field_manager=field_manager))

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        return await asyncio.to_thread(self.sync.delete, kind, namespace, name)

    async def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        await asyncio.to_thread(self.sync.event, ref, event_type, reason, message)

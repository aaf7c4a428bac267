"""The operator's door to the Kubernetes API: the shared adapter (`k2_api.kube`), awaited from kopf's event loop.

Each call runs the synchronous adapter in a worker thread of the adapter's own pool, so the loop never blocks: as
many threads as the official client keeps connections (its default pool: 5 per CPU), rather than the event loop's
default pool (4 more than the CPUs), so that concurrent reconciles are not queued behind a few threads. Every
write is made under the field manager `k2-operator` with server-side apply and force, so the operator owns exactly
the fields it sets: the workers' `status.progress`, the EPLB controller's placement spec and status fields, and the
users' own labels are left alone.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from k2_api.contract import FieldManagers
from k2_api.kube import Kube, Object, ObjectRef, Selector

FIELD_MANAGER = FieldManagers.OPERATOR
T = TypeVar("T")


API_THREADS = 5 * (os.cpu_count() or 1)


class AsyncKube:
    """`k2_api.kube.Kube`, awaitable."""

    def __init__(self, kube: Kube, threads: int = API_THREADS) -> None:
        self.sync = kube
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="k2-kube")

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    @classmethod
    def connect(cls, kubeconfig: Path | None = None) -> AsyncKube:
        """From `kubeconfig`, else $KUBECONFIG or ~/.kube/config, else the in-cluster ServiceAccount."""
        from k2_api.kube.client import connect

        return cls(connect(kubeconfig, field_manager=FIELD_MANAGER))

    async def get(self, kind: str, namespace: str | None, name: str) -> Object | None:
        return await self._run(functools.partial(self.sync.get, kind, namespace, name))

    async def list(self, kind: str, namespace: str | None, selector: Selector | None = None) -> list[Object]:
        return await self._run(functools.partial(self.sync.list, kind, namespace, selector))

    async def apply(self, manifest: Object) -> Object:
        return await self._run(functools.partial(self.sync.apply, manifest))

    async def apply_status(self, kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> Object:
        return await self._run(functools.partial(self.sync.apply_status, kind, namespace, name, status))

    async def create(self, manifest: Object, *, field_manager: str | None = None) -> Object | None:
        return await self._run(functools.partial(self.sync.create, manifest, field_manager=field_manager))

    async def delete(self, kind: str, namespace: str | None, name: str, grace_period_s: int | None = None) -> bool:
        return await self._run(
            functools.partial(self.sync.delete, kind, namespace, name, grace_period_s=grace_period_s)
        )

    async def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        await self._run(functools.partial(self.sync.event, ref, event_type, reason, message))

"""Reconciles at a chosen time: one timer per resource, for a decision that has to wait (a gang restart held back by
its backoff). Besides kopf's events and the resync, this is the third way a reconcile starts; it goes through
`runtime.trigger` like the others, so it never runs beside another reconcile of the same resource."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from k2_operator.runtime import now, trigger

log = logging.getLogger("k2_operator")

Key = tuple[str, str, str]
"""(kind, namespace, name)."""


class Requeues:
    """At most one pending timer per resource: an earlier time replaces a later one; a later one leaves it be."""

    def __init__(self) -> None:
        self.timers: dict[Key, tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def at(self, kind: str, namespace: str, name: str, when: dt.datetime) -> None:
        """Reconciles the resource at `when` (at once when it has passed); call from the operator's event loop."""
        loop = asyncio.get_running_loop()
        fire_at = loop.time() + max(0.0, (when - now()).total_seconds())
        key = (kind, namespace, name)
        current = self.timers.get(key)
        if current is not None and current[0] is loop and not current[1].cancelled():
            if current[1].when() <= fire_at:
                return
            current[1].cancel()
        self.timers[key] = (loop, loop.call_at(fire_at, self._fire, key))

    def _fire(self, key: Key) -> None:
        self.timers.pop(key, None)
        task = asyncio.ensure_future(self._reconcile(key))
        self.tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _reconcile(key: Key) -> None:
        kind, namespace, name = key
        try:
            await trigger(kind, namespace, name)
        except Exception as error:  # counted in k2_operator_reconcile_errors_total; the resync retries
            log.warning("requeued reconcile of %s %s/%s failed: %r", kind, namespace, name, error)


REQUEUES = Requeues()

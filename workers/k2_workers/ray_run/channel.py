"""The run's mailbox, a Ray actor between the driver and the ranks: how many times the gang started (rank 0 counts
its starts), rank 0's step records, which the driver takes to print, the stop request of a Ctrl-C or SIGTERM, which
every rank reads after each step, and the exit code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Channel:
    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._starts = 0
        self._stop = False
        self._code: int | None = None

    def started(self) -> None:
        self._starts += 1

    def put(self, record: Mapping[str, Any]) -> None:
        self._records.append(dict(record))

    def take(self) -> tuple[int, list[dict[str, Any]]]:
        """The gang's starts so far and the records put since the last take, oldest first."""
        records, self._records = self._records, []
        return self._starts, records

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def finish(self, code: int) -> None:
        self._code = code

    def code(self) -> int | None:
        """The exit code rank 0's training returned; None while it runs (or after it raised)."""
        return self._code


class ChannelClient:
    """Typed calls on a Channel actor; picklable, so the driver hands it to the ranks."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    @classmethod
    def start(cls) -> ChannelClient:
        import ray

        return cls(ray.remote(num_cpus=0)(Channel).remote())

    def put(self, record: Mapping[str, Any]) -> None:
        """Without waiting: the step goes on."""
        self._handle.put.remote(dict(record))

    def started(self) -> None:
        import ray

        ray.get(self._handle.started.remote())

    def take(self) -> tuple[int, list[dict[str, Any]]]:
        import ray

        starts, records = ray.get(self._handle.take.remote())
        return int(starts), list(records)

    def request_stop(self) -> None:
        self._handle.request_stop.remote()

    def stop_requested(self) -> bool:
        import ray

        return bool(ray.get(self._handle.stop_requested.remote()))

    def finish(self, code: int) -> None:
        import ray

        ray.get(self._handle.finish.remote(code))

    def code(self) -> int | None:
        import ray

        code = ray.get(self._handle.code.remote())
        return None if code is None else int(code)

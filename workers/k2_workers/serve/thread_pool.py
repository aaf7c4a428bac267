"""A bounded pool of daemon threads that runs blocking calls for an asyncio event loop.

The HTTP server's routes block (an engine's tokens, a group's answer), so each call into a route or its stream runs
here: at most `size` threads, started when needed and kept. Daemon threads, unlike `concurrent.futures`' (joined at
interpreter exit), never hold up a stopping process with a call that still waits on a group or an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class DaemonThreadPool:
    """`await pool.run(call)`: `call()` on one of at most `size` daemon threads; its result or exception."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError(f"thread pool: size must be >= 1, got {size}")
        self._size = size
        self._name = name
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    @property
    def threads(self) -> int:
        """Threads started so far (never more than `size`)."""
        return self._threads

    async def run(self, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self._threads}", daemon=True).start()
            else:
                self._idle -= 1  # taken by this call (it may wait when every thread is busy: never past `size`)
        self._calls.put((call, loop, future))
        return await future

    def _work(self) -> None:
        while True:
            call, loop, future = self._calls.get()
            try:
                result = call()
            except BaseException as error:  # handed to the awaiting coroutine, as asyncio's executors do
                _deliver(loop, future, None, error)
            else:
                _deliver(loop, future, result, None)
            with self._lock:
                self._idle += 1


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    def settle() -> None:
        if future.done():  # the awaiting coroutine was cancelled (a server shutting down)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for this any more
        loop.call_soon_threadsafe(settle)

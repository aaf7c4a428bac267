"""Continuous client traffic for the Ray serving tests: clients send one completion request after another until
stopped, and every answer and every failure is counted."""

from __future__ import annotations

import json
import threading
import urllib.request


class Traffic:
    """`clients` threads sending `{"prompt", "max_tokens"}` to `url` until `stop()`; `ok` answers, `failures` the rest
    (a refused connection, an HTTP error status: urllib's are OSErrors)."""

    def __init__(self, url: str, prompt: str, clients: int = 2, max_tokens: int = 2) -> None:
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        body = json.dumps({"prompt": self.prompt, "max_tokens": self.max_tokens}).encode()
        while not self._stop.is_set():
            request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    json.loads(response.read())
                with self._lock:
                    self.ok += 1
            except (OSError, ValueError) as error:
                with self._lock:
                    self.failures.append(str(error))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)

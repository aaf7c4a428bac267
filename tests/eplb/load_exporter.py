"""A fake serving for tests: one /metrics endpoint per rank on 127.0.0.1, fed a controllable, drifting expert load.

Each rank counts an equal share of the tokens routed to every logical expert (as routing ranks do) and, given the
placement in force, the tokens of its own slots (an expert's tokens split evenly over its replicas). A background
thread advances the counters every `tick` seconds at `tokens_per_s` for the current profile until `stop()`; tests
make the load drift by changing the profile (`set_profile`) while it runs.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from k2_workers.serve.metrics import ExpertLoadCollector, MetricsServer, serve_metrics

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def skewed_load(num_layers: int, num_experts: int, hot: dict[int, float], base: float = 1.0) -> FloatArray:
    """Relative load [L, E]: `base` everywhere, `hot[e]` for the hot experts."""
    load = np.full((num_layers, num_experts), base)
    for expert, weight in hot.items():
        load[:, expert] = weight
    return load


class FakeRank:
    """One rank's counters and its endpoint; `reset()` restarts the counters (a worker restart)."""

    def __init__(self, serving: str, group: int, rank: int, shape: tuple[int, int, int]):
        self.serving, self.group, self.rank = serving, group, rank
        self.shape = shape
        self.registry = CollectorRegistry()
        self.collector = self._new_collector()
        self.registry.register(self.collector)
        self.server: MetricsServer | None = serve_metrics(self.registry, port=0, address="127.0.0.1")
        self.port = self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _new_collector(self) -> ExpertLoadCollector:
        num_layers, num_experts, num_slots = self.shape
        return ExpertLoadCollector(self.serving, self.group, self.rank, num_layers, num_experts, num_slots)

    def reset(self) -> None:
        fresh = self._new_collector()
        self.registry.unregister(self.collector)
        self.collector = fresh
        self.registry.register(fresh)

    def down(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def up(self) -> None:
        if self.server is None:
            self.server = serve_metrics(self.registry, port=self.port, address="127.0.0.1")


class FakeServing:
    """`num_ranks` ranks of one group with `slots` slots each, routing `tokens_per_s` of the current profile."""

    def __init__(
        self,
        serving: str,
        *,
        num_layers: int,
        num_experts: int,
        num_ranks: int,
        slots: int,
        tokens_per_s: float = 10_000.0,
        tick: float = 0.1,
    ):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.tokens_per_s, self.tick = tokens_per_s, tick
        self.ranks = [FakeRank(serving, 0, r, (num_layers, num_experts, slots)) for r in range(num_ranks)]
        self.profile: FloatArray = np.ones((num_layers, num_experts))
        self.placement_LGS: IntArray | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [rank.url for rank in self.ranks]

    @property
    def targets(self) -> list[str]:
        return [rank.target for rank in self.ranks]

    def set_profile(self, profile: FloatArray) -> None:
        with self._lock:
            self.profile = np.asarray(profile, dtype=np.float64)

    def set_placement(self, placement_LGS: IntArray) -> None:
        with self._lock:
            self.placement_LGS = np.asarray(placement_LGS, dtype=np.int64)

    def advance(self, seconds: float) -> None:
        """Route `seconds` worth of tokens at once (the background thread calls this every tick)."""
        with self._lock:
            tokens_LE = self.profile / self.profile.sum(axis=1, keepdims=True) * self.tokens_per_s * seconds
            placement = self.placement_LGS
        num_ranks = len(self.ranks)
        for index, rank in enumerate(self.ranks):
            slots = None
            if placement is not None:
                counts_LE = np.zeros_like(tokens_LE)
                for layer in range(self.num_layers):
                    np.add.at(counts_LE[layer], placement[layer].ravel(), 1.0)
                share_LE = tokens_LE / np.maximum(counts_LE, 1.0)
                slots = np.take_along_axis(share_LE, placement[:, index, :], axis=1)
            rank.collector.add(tokens_LE / num_ranks, slots)

    def start(self) -> FakeServing:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            self.advance(now - last)
            last = now

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for rank in self.ranks:
            rank.down()

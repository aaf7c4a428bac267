"""The engine's metrics as a scrape reads them: queue, batch, cache blocks and capacity, preemptions, prefix reuse,
and one time-to-first-token and one time-per-output-token observation per finished request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, generate_latest

from k2_workers.model import K2Config, K2ForCausalLM
from k2_workers.serve.engine import GroupEngine
from k2_workers.serve.engine_metrics import EngineCollector
from k2_workers.serve.placement import ActivePlacement
from k2_workers.serve.request import GenerateParams
from k2_workers.serve.resharding import ResidentExpertWeights
from k2_workers.tokenizer import ByteTokenizer


@pytest.fixture
def engine() -> Iterator[GroupEngine]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # type: ignore[attr-defined]
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    engine = GroupEngine(
        model, ByteTokenizer(), ResidentExpertWeights(model), 0, 1, cache_tokens=256, block_size=8, batch_wait_s=0
    )
    experts = model.config.n_routed_experts
    engine.apply_placement(ActivePlacement.round_robin(len(list(model.moe_blocks())), experts, 1, experts))
    try:
        yield engine
    finally:
        engine.stop()
        dist.destroy_process_group()


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """`name{labels}` -> value, as the exposition text has them."""
    found = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def test_a_scrape_shows_the_queue_the_cache_and_the_latencies(engine: GroupEngine) -> None:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, "s", 0))
    labels = 'group="0",rank="0",serving="s"'
    before = samples(registry)
    assert before[f"k2_serving_cache_capacity_tokens{{{labels}}}"] == 256
    assert before[f'k2_serving_cache_blocks{{{labels},state="free"}}'] == 32
    assert before[f"k2_serving_running_sequences{{{labels}}}"] == 0
    prompt = list(range(20, 40))
    for _ in range(2):  # the second reuses the first's two full blocks
        assert len(engine.generate(prompt, GenerateParams(max_new_tokens=5)).tokens) == 5
    after = samples(registry)
    assert after[f"k2_serving_time_to_first_token_seconds_count{{{labels}}}"] == 2
    assert after[f"k2_serving_time_per_output_token_seconds_count{{{labels}}}"] == 2
    assert after['k2_serving_time_to_first_token_seconds_bucket{group="0",le="+Inf",rank="0",serving="s"}'] == 2
    assert after[f"k2_serving_prefix_reused_blocks_total{{{labels}}}"] == 2
    assert after[f"k2_serving_preemptions_total{{{labels}}}"] == 0
    assert after[f'k2_serving_cache_blocks{{{labels},state="used"}}'] == 0  # both left: their blocks are free
    assert after[f"k2_serving_queued_requests{{{labels}}}"] == after[f"k2_serving_waiting_sequences{{{labels}}}"] == 0

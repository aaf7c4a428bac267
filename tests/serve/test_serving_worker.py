"""`k2 worker serve` as real processes on loopback: generation, bad requests, live placement changes that drop no
request, expert-load metrics, a two-rank expert-parallel group, and the frontend routing across groups."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from k2_workers.model import K2Config, K2ForCausalLM, generate
from k2_workers.tokenizer import ByteTokenizer
from tests.serve.worker_process import (
    metrics_text,
    request,
    serve_processes,
    wait_healthy,
    wait_until,
    write_placement,
)
from tests.support.listeners import LOOPBACK_HEX, listening_addresses
from tests.support.ports import free_port

EXAMPLE = Path(__file__).parents[2] / "examples" / "k2serving-debug.yaml"
NUM_EXPERTS, NUM_MOE_LAYERS = 8, 3
PROMPT = "The expert placement is a Kubernetes object"


def manifest(tmp_path: Path, ranks: int, redundant: int) -> Path:
    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    document["spec"]["ranksPerGroup"] = ranks
    document["spec"]["redundantSlotsPerRank"] = redundant
    path = tmp_path / f"serving-{ranks}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def reference_completion(max_new_tokens: int, text: str = PROMPT) -> list[int]:
    """What the single-process model generates greedily for `text`, with the weights a worker builds (seed 0)."""
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    prompt = torch.tensor([ByteTokenizer().encode(text)])
    with torch.no_grad():
        out = generate(model, prompt, max_new_tokens)
    return out[0, prompt.shape[1] :].tolist()


def token_sums(text: str, metric: str) -> dict[str, float]:
    """Sum of a counter's samples per `rank` label."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line.rsplit(" ", 1)
            rank = labels.split('rank="', 1)[1].split('"', 1)[0]
            sums[rank] = sums.get(rank, 0.0) + float(value)
    return sums


def weight_bytes(text: str) -> dict[str, float]:
    """`k2_expert_weight_bytes_total` per `source` label."""
    found = {}
    for line in text.splitlines():
        if line.startswith("k2_expert_weight_bytes_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('source="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def test_single_rank_serves_applies_placements_live_and_exports_load(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    placement = tmp_path / "placement.json"
    write_placement(placement, 1, [[list(range(NUM_EXPERTS))]] * NUM_MOE_LAYERS, NUM_EXPERTS)
    argv = ["--config", str(manifest(tmp_path, 1, 0)), "--placement", str(placement), "--port", str(port)]
    argv += ["--metrics-port", str(metrics_port), "--placement-poll-seconds", "0.2"]
    url = f"http://127.0.0.1:{port}"
    with serve_processes([argv], [{"RANK": "0", "WORLD_SIZE": "1"}]) as (worker,):
        assert wait_healthy(url, worker)["placementGeneration"] == 1
        expected = reference_completion(12)
        status, body = request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 12})
        assert status == 200, body
        assert body["tokens"] == expected
        assert body["placementGeneration"] == 1

        bad: list[tuple[dict[str, Any] | bytes, str]] = [
            (b"{not json", "body"),
            ({"max_new_tokens": 3}, "prompt"),
            ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
            ({"prompt": "x", "max_new_tokens": 100_000}, "max_new_tokens"),
            ({"prompt": "x", "temperature": "hot"}, "temperature"),
            ({"prompt": "x", "stream": True}, "unknown fields"),
        ]
        for payload, field in bad:
            status, body = request(url + "/v1/generate", payload)
            assert status == 400 and field in body["error"], (payload, body)
        assert request(url + "/nope")[0] == 404

        # A new generation (permuted slots) lands while requests are in flight: none fails, output is unchanged.
        results: list[tuple[int, dict[str, Any]]] = []

        def client() -> None:
            for _ in range(3):
                results.append(request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 12}))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        permuted = [[[7, 6, 5, 4, 3, 2, 1, 0]], [[1, 0, 3, 2, 5, 4, 7, 6]], [[0, 2, 4, 6, 1, 3, 5, 7]]]
        write_placement(placement, 2, permuted, NUM_EXPERTS)
        for thread in threads:
            thread.join(timeout=300)
        assert len(results) == 9
        assert all(status == 200 and body["tokens"] == expected for status, body in results), results
        body = wait_until(url + "/v1/placement", lambda b: b["generation"] == 2)
        assert body["generation"] == 2 and body["layers"] == permuted and body["ignoredFileError"] is None
        assert request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 12})[1]["tokens"] == expected

        # An invalid file (expert 7 lost) is ignored, saying why: generation 2 stays in force.
        write_placement(placement, 3, [[[0, 1, 2, 3, 4, 5, 6, 6]]] * NUM_MOE_LAYERS, NUM_EXPERTS)
        body = wait_until(url + "/v1/placement", lambda b: b["ignoredFileError"] is not None)
        assert "experts without a replica: 7" in body["ignoredFileError"] and body["generation"] == 2
        assert request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 2})[1]["placementGeneration"] == 2

        text = metrics_text(metrics_port)
        expert, slot = token_sums(text, "k2_expert_tokens_total"), token_sums(text, "k2_slot_tokens_total")
        assert expert["0"] > 0 and expert == slot  # one rank holds every slot: every routed token is computed here


@pytest.mark.distributed
def concurrent_requests_are_batched_and_unchanged(url: str) -> None:
    """A long request keeps the group busy; the requests that arrive meanwhile (different prompt lengths and
    lengths to generate) queue and are decoded together, each completion the same as the model's alone."""
    asks = [(PROMPT, 120), ("Hi", 5), ("Experts move rank to rank", 12), ("A", 1), (PROMPT[:20], 8)]
    results: dict[int, tuple[int, dict[str, Any]]] = {}

    def send(index: int) -> None:
        text, max_new = asks[index]
        results[index] = request(url + "/v1/generate", {"prompt": text, "max_new_tokens": max_new})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(asks))]
    threads[0].start()
    time.sleep(0.3)  # the long request runs first, the others queue behind it and share a batch
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for index, (text, max_new) in enumerate(asks):
        status, body = results[index]
        assert status == 200 and body["tokens"] == reference_completion(max_new, text), (text, body)
    assert max(body["batchSize"] for _, body in results.values()) > 1


def test_two_rank_group_matches_the_single_process_model_and_moves_experts(tmp_path: Path) -> None:
    ports, metrics_ports, master = [free_port(), free_port()], [free_port(), free_port()], free_port()
    placement = tmp_path / "placement.json"
    # 5 slots per rank: the hot experts 0 and 1 get a second replica.
    layout = [[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]]
    write_placement(placement, 1, [layout] * NUM_MOE_LAYERS, NUM_EXPERTS)
    config = manifest(tmp_path, 2, 1)
    argvs = [
        [*("--config", str(config), "--placement", str(placement), "--port", str(port)), "--metrics-port", str(mport)]
        for port, mport in zip(ports, metrics_ports, strict=True)
    ]
    # A 100 ms batch wait: the queued requests below share a batch even when a loaded machine starts their threads
    # far apart (the 2 ms default made the batching assertion flaky).
    argvs = [[*argv, "--placement-poll-seconds", "0.2", "--batch-wait-ms", "100"] for argv in argvs]
    group_env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
    envs = [{**group_env, "RANK": str(rank)} for rank in range(2)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with serve_processes(argvs, envs) as workers:
        for url, worker in zip(urls, workers, strict=True):
            assert wait_healthy(url, worker)["placementGeneration"] == 1
        listeners = listening_addresses(*(worker.pid for worker in workers))
        assert listeners and listeners <= LOOPBACK_HEX, listeners  # HTTP, metrics, the group's store: loopback only
        assert request(urls[1] + "/v1/generate", {"prompt": PROMPT})[0] == 404  # only rank 0 takes requests
        expected = reference_completion(10)
        status, body = request(urls[0] + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
        assert status == 200 and body["tokens"] == expected and body["batchSize"] == 1, body
        concurrent_requests_are_batched_and_unchanged(urls[0])

        loaded = [weight_bytes(metrics_text(port)) for port in metrics_ports]
        assert [b["peer"] for b in loaded] == [0, 0]  # the first placement is read from storage: 5 experts a rank
        moved = [[3, 4, 5, 6, 7], [0, 1, 2, 3, 7]]
        write_placement(placement, 2, [moved] * NUM_MOE_LAYERS, NUM_EXPERTS)
        for url in urls:  # rank 0 broadcasts the new tables; both ranks load their new experts
            assert wait_until(url + "/healthz", lambda b: b["placementGeneration"] == 2)["placementGeneration"] == 2
        status, body = request(urls[0] + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
        assert status == 200 and body["tokens"] == expected and body["placementGeneration"] == 2
        # Rank 0 newly needs experts 5, 6, 7 and rank 1 needs 2, 3: all come from the other rank, none from storage
        # (the greedy output above shows that they arrived intact).
        after = [weight_bytes(metrics_text(port)) for port in metrics_ports]
        assert [b["storage"] for b in after] == [b["storage"] for b in loaded]
        assert [b["peer"] * 5 for b in after] == [3 * loaded[0]["storage"], 2 * loaded[1]["storage"]]

        texts = [metrics_text(port) for port in metrics_ports]
        routed = token_sums(texts[0], "k2_expert_tokens_total")["0"]
        computed = [token_sums(text, "k2_slot_tokens_total")[str(rank)] for rank, text in enumerate(texts)]
        assert all(c > 0 for c in computed)
        # Both ranks decode the same tokens; each (token, expert) pair is computed once per rank that routed it.
        assert sum(computed) == 2 * routed

        frontend_port = free_port()
        dead = f"http://127.0.0.1:{free_port()}"
        frontend_argv = ["--frontend", "--port", str(frontend_port), "--endpoints", f"{dead},{urls[0]}"]
        with serve_processes([frontend_argv], [{}]) as (frontend,):
            front = f"http://127.0.0.1:{frontend_port}"
            wait_healthy(front, frontend)
            for _ in range(2):  # round-robin starts at the dead group once; it moves on to the live one
                status, body = request(front + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
                assert status == 200 and body["tokens"] == expected and body["group"] == urls[0]
            status, body = request(front + "/v1/generate", {"prompt": ""})
            assert status == 400 and "prompt" in body["error"]

"""Serving Mixtral: a two-rank `k2 worker serve` group on the mixtral-debug example generates what the model
generates, and keeps doing so after a new expert placement moves experts between its ranks live; a placement change
reads experts from a Mixtral checkpoint under Mixtral's tensor names."""

from __future__ import annotations

from pathlib import Path

import torch

from k2_workers.model import K2Config, K2ForCausalLM, generate, load_pretrained
from k2_workers.serve.resharding.storage import CheckpointExpertWeights
from k2_workers.tokenizer import ByteTokenizer
from tests.model.mixtral_reference import TINY_MIXTRAL_CONFIGS, save_hf_mixtral
from tests.serve.worker_process import request, serve_processes, wait_healthy, wait_until, write_placement
from tests.support.ports import free_port

EXAMPLE = Path(__file__).parents[2] / "examples" / "k2serving-mixtral-debug.yaml"
NUM_EXPERTS, NUM_MOE_LAYERS = 8, 3
PROMPT = "Mixtral routes every token to two of eight experts"


def test_placement_changes_read_mixtral_expert_tensors(tmp_path: Path) -> None:
    save_hf_mixtral(TINY_MIXTRAL_CONFIGS["mixtral-like"], tmp_path)
    model = load_pretrained(tmp_path)
    gate, up, down = CheckpointExpertWeights(tmp_path, model, torch.float32).experts(2, [5, 0, 5])
    experts = list(model.moe_blocks())[2].experts
    index = torch.tensor([5, 0, 5])
    assert torch.equal(gate, experts.gate_proj[index]) and torch.equal(up, experts.up_proj[index])
    assert torch.equal(down, experts.down_proj[index])


def _reference(max_new_tokens: int) -> list[int]:
    torch.manual_seed(0)  # the weights a worker builds for a preset without a checkpoint
    model = K2ForCausalLM(K2Config.from_preset("mixtral-debug")).eval()
    prompt = torch.tensor([ByteTokenizer().encode(PROMPT)])
    with torch.no_grad():
        return generate(model, prompt, max_new_tokens)[0, prompt.shape[1] :].tolist()


def test_a_two_rank_mixtral_group_serves_and_moves_experts_live(tmp_path: Path) -> None:
    """The example's group (2 ranks x 5 slots, hot experts replicated); a new placement moves experts between
    the ranks while serving, and the greedy output stays the single-process model's."""
    manifest = tmp_path / "serving.yaml"
    manifest.write_text(EXAMPLE.read_text())
    placement = tmp_path / "placement.json"
    write_placement(placement, 1, [[[0, 1, 2, 3, 4], [5, 6, 7, 0, 1]]] * NUM_MOE_LAYERS, NUM_EXPERTS)
    ports, master = [free_port(), free_port()], free_port()
    common = ["--config", str(manifest), "--placement", str(placement), "--placement-poll-seconds", "0.2"]
    argvs = [[*common, "--port", str(port), "--metrics-port", str(free_port())] for port in ports]
    group_env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with serve_processes(argvs, [{**group_env, "RANK": str(rank)} for rank in range(2)]) as workers:
        for url, worker in zip(urls, workers, strict=True):
            assert wait_healthy(url, worker)["placementGeneration"] == 1
        expected = _reference(10)
        status, body = request(urls[0] + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
        assert status == 200 and body["tokens"] == expected, body

        moved = [[3, 4, 5, 6, 7], [0, 1, 2, 3, 7]]
        write_placement(placement, 2, [moved] * NUM_MOE_LAYERS, NUM_EXPERTS)
        for url in urls:
            assert wait_until(url + "/healthz", lambda b: b["placementGeneration"] == 2)["placementGeneration"] == 2
        status, body = request(urls[0] + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
        assert status == 200 and body["tokens"] == expected and body["placementGeneration"] == 2

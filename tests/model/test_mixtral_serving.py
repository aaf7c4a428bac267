"""Serving Mixtral: a `k2 worker serve` rank on the mixtral-debug example generates what the model generates, and
keeps doing so while a new expert placement is applied live; a placement change reads experts from a Mixtral
checkpoint under Mixtral's tensor names."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

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


def test_a_mixtral_rank_serves_and_applies_a_placement_live(tmp_path: Path) -> None:
    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    document["spec"].update({"ranksPerGroup": 1, "redundantSlotsPerRank": 0})
    manifest = tmp_path / "serving.yaml"
    manifest.write_text(yaml.safe_dump(document))
    placement = tmp_path / "placement.json"
    write_placement(placement, 1, [[list(range(NUM_EXPERTS))]] * NUM_MOE_LAYERS, NUM_EXPERTS)
    port = free_port()
    argv = ["--config", str(manifest), "--placement", str(placement), "--port", str(port)]
    argv += ["--metrics-port", str(free_port()), "--placement-poll-seconds", "0.2"]
    url = f"http://127.0.0.1:{port}"
    with serve_processes([argv], [{"RANK": "0", "WORLD_SIZE": "1"}]) as (worker,):
        assert wait_healthy(url, worker)["placementGeneration"] == 1
        expected = _reference(10)
        status, body = request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
        assert status == 200 and body["tokens"] == expected, body

        permuted = [[[7, 6, 5, 4, 3, 2, 1, 0]], [[1, 0, 3, 2, 5, 4, 7, 6]], [[0, 2, 4, 6, 1, 3, 5, 7]]]
        write_placement(placement, 2, permuted, NUM_EXPERTS)
        body = wait_until(url + "/v1/placement", lambda b: b["generation"] == 2)
        assert body["layers"] == permuted
        status, body = request(url + "/v1/generate", {"prompt": PROMPT, "max_new_tokens": 10})
        assert status == 200 and body["tokens"] == expected and body["placementGeneration"] == 2

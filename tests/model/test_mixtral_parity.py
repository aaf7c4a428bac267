"""Mixtral parity with transformers' MixtralForCausalLM: its save_pretrained checkpoint (Mixtral's tensor names),
our load_pretrained, the same fp32 logits (max abs difference <= 1e-4) and the same greedy continuation; our
save_pretrained read back by transformers; and GQA decoding with the cache equal to the full forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from k2_workers.model import K2ForCausalLM, generate, generate_batch, load_pretrained, save_pretrained
from k2_workers.model.kv_cache import GQACache
from tests.model.mixtral_reference import TINY_MIXTRAL_CONFIGS, save_hf_mixtral

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_MIXTRAL_CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    directory = tmp_path_factory.mktemp(request.param)
    return save_hf_mixtral(TINY_MIXTRAL_CONFIGS[request.param], directory), directory


def _input_ids(batch: int = 2, seq: int = 37) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(7))


def test_checkpoint_has_mixtral_tensor_names(pair: tuple[object, Path]) -> None:
    _, directory = pair
    index = directory / "model.safetensors.index.json"
    names = set(json.loads(index.read_text())["weight_map"]) if index.exists() else _single_file_names(directory)
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert {f"model.layers.0.block_sparse_moe.experts.1.w{i}.weight" for i in (1, 2, 3)} <= names
    assert not any(".mlp." in name for name in names)


def _single_file_names(directory: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_logits_match_transformers(pair: tuple[object, Path]) -> None:
    hf, directory = pair
    ours = load_pretrained(directory).eval()
    assert ours.config.attention_type == "gqa"
    input_ids = _input_ids()
    with torch.no_grad():
        expected = hf(input_ids).logits  # type: ignore[operator]
        fast = ours(input_ids).logits
        ours.record_attention_logits = True
        recorded = ours(input_ids).logits
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero outputs
    assert (fast - expected).abs().max().item() <= TOLERANCE
    assert (recorded - expected).abs().max().item() <= TOLERANCE


def test_greedy_generation_matches_transformers(pair: tuple[object, Path]) -> None:
    hf, directory = pair
    ours = load_pretrained(directory).eval()
    prompt = _input_ids(batch=1, seq=11)
    new = 24  # 35 tokens: past the sliding window of 16
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)  # type: ignore[attr-defined]
    assert torch.equal(generate(ours, prompt, new), expected)


def test_our_checkpoint_loads_in_transformers(pair: tuple[object, Path], tmp_path: Path) -> None:
    from transformers import MixtralForCausalLM

    hf, directory = pair
    ours = load_pretrained(directory).eval()
    save_pretrained(ours, tmp_path, max_shard_bytes=64 * 1024)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    back = MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    input_ids = _input_ids()
    with torch.no_grad():
        assert (back(input_ids).logits - hf(input_ids).logits).abs().max().item() <= TOLERANCE  # type: ignore[operator]


def test_step_by_step_decoding_equals_full_forward(pair: tuple[object, Path]) -> None:
    _, directory = pair
    model = load_pretrained(directory).eval()
    input_ids = _input_ids(seq=30)
    cache = GQACache(model.config, 2, 30)
    with torch.no_grad():
        full = model(input_ids).logits
        steps = [model(input_ids[:, :6], cache=cache).logits]
        steps += [model(input_ids[:, t : t + 1], cache=cache).logits for t in range(6, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    kv = model.config.num_key_value_heads * model.config.gqa_head_dim
    assert cache.values_per_token_per_layer == 2 * kv  # K and V per KV head, not per query head
    assert cache.k_LBTGK.shape == (model.config.num_hidden_layers, 2, 30, model.config.num_key_value_heads, 16)


def test_a_batch_of_different_lengths_decodes_each_prompt_as_if_alone(pair: tuple[object, Path]) -> None:
    _, directory = pair
    model = load_pretrained(directory).eval()
    prompts = [_input_ids(1, n)[0] for n in (3, 19, 9)]
    together = generate_batch(model, prompts, 8)
    for prompt, tokens in zip(prompts, together, strict=True):
        assert torch.equal(generate(model, prompt[None], 8)[0, prompt.numel() :], tokens)


def test_max_logits_are_recorded_per_query_head(pair: tuple[object, Path]) -> None:
    """The recorded S_max of each query head equals the explicit maximum over the visible logits."""
    _, directory = pair
    model: K2ForCausalLM = load_pretrained(directory).eval()
    model.record_attention_logits = True
    input_ids = _input_ids(batch=1, seq=30)
    with torch.no_grad():
        model(input_ids)
    recorded = model.max_attention_logits()
    assert recorded.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert torch.isfinite(recorded).all() and recorded.abs().max() > 0

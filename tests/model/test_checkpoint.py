"""Checkpoint I/O: sharded HF-format save/load, lazy subset-of-experts loading, FP8 dequantisation, and errors that
name the tensor and the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from k2_workers.model import K2Config, K2ForCausalLM, load_pretrained, save_pretrained
from k2_workers.model import checkpoint as ckpt
from k2_workers.model.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8


def _debug_model(seed: int = 0) -> K2ForCausalLM:
    torch.manual_seed(seed)
    model = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    with torch.no_grad():
        for moe in model.moe_blocks():
            assert moe.gate.e_score_correction_bias is not None
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture
def saved(tmp_path: Path) -> tuple[K2ForCausalLM, Path]:
    model = _debug_model()
    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    return model, tmp_path


def test_save_writes_sharded_hf_layout(saved: tuple[K2ForCausalLM, Path]) -> None:
    model, directory = saved
    index = json.loads((directory / ckpt.INDEX_FILE).read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = _all_tensors(directory)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # per-expert names on disk, stacked in memory
    assert tensors["model.layers.1.mlp.experts.5.gate_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.1.mlp.experts.5.down_proj.weight"].shape == (64, 32)
    assert torch.equal(
        tensors["model.layers.1.mlp.experts.5.up_proj.weight"], model.model.layers[1].mlp.experts.up_proj[5]
    )
    assert "model.layers.1.mlp.experts.gate_proj" not in tensors
    assert tensors["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.0.mlp.gate_proj.weight" in tensors and "lm_head.weight" in tensors
    config = json.loads((directory / ckpt.CONFIG_FILE).read_text())
    assert config["n_routed_experts"] == 8 and config["architectures"] == ["DeepseekV3ForCausalLM"]


def test_every_saved_file_is_readable_by_other_users(saved: tuple[K2ForCausalLM, Path]) -> None:
    """The serving pods read a checkpoint as another uid than its writer's (safetensors alone creates 0600 files)."""
    _, directory = saved
    files = sorted(directory.iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o044) for f in files} == {f.name: oct(0o044) for f in files}


def test_round_trip_gives_identical_logits(saved: tuple[K2ForCausalLM, Path]) -> None:
    model, directory = saved
    loaded = load_pretrained(directory).eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    input_ids = torch.randint(0, 258, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_bf16_save_and_load(tmp_path: Path) -> None:
    model = _debug_model()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    tensors = _all_tensors(tmp_path)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias is not None and bias.dtype == torch.float32


class _CountingHandle:
    def __init__(self, inner: Any, reads: list[str]) -> None:
        self._inner, self._reads = inner, reads

    def keys(self) -> list[str]:
        return list(self._inner.keys())

    def get_slice(self, name: str) -> Any:
        return self._inner.get_slice(name)

    def get_tensor(self, name: str) -> torch.Tensor:
        self._reads.append(name)
        return self._inner.get_tensor(name)

    def __exit__(self, *exc_info: object) -> object:
        return self._inner.__exit__(*exc_info)


def test_subset_of_experts_reads_only_those(saved: tuple[K2ForCausalLM, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    model, directory = saved
    reads: list[str] = []
    monkeypatch.setattr(ckpt, "safe_open", lambda path, framework: _CountingHandle(safe_open(path, framework), reads))
    slots = {1: [6, 2, 6], 2: [0], 3: [7, 1]}  # a slot table with a replicated expert
    partial = load_pretrained(directory, experts=slots)

    expert_reads = {name for name in reads if ".mlp.experts." in name}
    expected = {
        f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
        for layer, ids in slots.items()
        for e in ids
        for proj in ("gate_proj", "up_proj", "down_proj")
    }
    assert expert_reads == expected
    assert len(reads) == len(set(reads))  # a replicated expert is read once, a foreign one never
    for layer, ids in slots.items():
        held = partial.model.layers[layer].mlp.experts
        full = model.model.layers[layer].mlp.experts
        assert held.expert_ids == ids
        table = {e: ids.index(e) for e in ids}  # logical id -> its first slot; the rest are "not held"
        assert held.slot_of_expert.tolist() == [table.get(e, len(ids)) for e in range(8)]
        for slot, e in enumerate(ids):
            assert torch.equal(held.gate_proj[slot], full.gate_proj[e])
            assert torch.equal(held.down_proj[slot], full.down_proj[e])


def test_subset_load_survives_deleted_foreign_experts(saved: tuple[K2ForCausalLM, Path]) -> None:
    """Rewrite the shards without experts 2..7: a rank holding {0, 1} still loads."""
    _, directory = saved
    index_path = directory / ckpt.INDEX_FILE
    index = json.loads(index_path.read_text())
    for path in directory.glob("*.safetensors"):
        kept = {
            name: t
            for name, t in load_file(str(path)).items()
            if not any(f".mlp.experts.{e}." in name for e in range(2, 8))
        }
        save_file(kept, str(path))
    index["weight_map"] = {
        n: f for n, f in index["weight_map"].items() if not any(f".mlp.experts.{e}." in n for e in range(2, 8))
    }
    index_path.write_text(json.dumps(index))

    partial = load_pretrained(directory, experts={0, 1})
    assert partial.model.layers[1].mlp.experts.gate_proj.shape[0] == 2
    with pytest.raises(ckpt.CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight"):
        load_pretrained(directory)


def test_missing_tensor_names_tensor_and_file(saved: tuple[K2ForCausalLM, Path]) -> None:
    _, directory = saved
    index = json.loads((directory / ckpt.INDEX_FILE).read_text())
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    file_name = index["weight_map"][name]
    tensors = load_file(str(directory / file_name))
    del tensors[name]
    save_file(tensors, str(directory / file_name))
    with pytest.raises(ckpt.CheckpointError) as err:
        load_pretrained(directory)
    assert name in str(err.value) and file_name in str(err.value)


def test_misshaped_tensor_names_tensor_and_file(saved: tuple[K2ForCausalLM, Path]) -> None:
    _, directory = saved
    index = json.loads((directory / ckpt.INDEX_FILE).read_text())
    name = "model.layers.3.mlp.experts.4.up_proj.weight"
    file_name = index["weight_map"][name]
    tensors = load_file(str(directory / file_name))
    tensors[name] = torch.zeros(31, 64)
    save_file(tensors, str(directory / file_name))
    with pytest.raises(ckpt.CheckpointError) as err:
        load_pretrained(directory)
    message = str(err.value)
    assert name in message and file_name in message and "(31, 64)" in message and "(32, 64)" in message


def test_missing_config_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json"):
        load_pretrained(tmp_path)


def test_fp8_quantise_dequantise_error_is_small() -> None:
    torch.manual_seed(0)
    w = torch.randn(300, 200)  # partial last blocks in both dims
    w_fp8, scale_inv = quantize_fp8(w)
    assert w_fp8.dtype == FP8_DTYPE and scale_inv.shape == (3, 2)
    restored = dequantize_fp8(w_fp8, scale_inv)
    assert restored.shape == w.shape
    assert ((restored - w).abs() / w.abs().amax()).max() < 0.07  # e4m3 has a 3-bit mantissa
    with pytest.raises(ValueError, match="scale_inv"):
        dequantize_fp8(w_fp8, scale_inv[:2])


def test_fp8_weights_are_dequantised_on_load(saved: tuple[K2ForCausalLM, Path]) -> None:
    """Quantise every 2-D linear weight of a saved checkpoint to e4m3 with 128x128 scales, as DeepSeek ships them."""
    model, directory = saved
    index_path = directory / ckpt.INDEX_FILE
    index = json.loads(index_path.read_text())
    expected: dict[str, torch.Tensor] = {}
    for path in directory.glob("*.safetensors"):
        tensors = load_file(str(path))
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            quantise = t.dim() == 2 and "proj" in name and "layernorm" not in name
            if quantise:
                w_fp8, scale_inv = quantize_fp8(t)
                out[name], out[name + "_scale_inv"] = w_fp8, scale_inv
                index["weight_map"][name + "_scale_inv"] = path.name
                expected[name] = dequantize_fp8(w_fp8, scale_inv)
            else:
                out[name] = t
        save_file(out, str(path))
    index_path.write_text(json.dumps(index))
    config = json.loads((directory / ckpt.CONFIG_FILE).read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (directory / ckpt.CONFIG_FILE).write_text(json.dumps(config))

    loaded = load_pretrained(directory)
    state = loaded.state_dict()
    assert torch.equal(
        state["model.layers.0.self_attn.q_b_proj.weight"], expected["model.layers.0.self_attn.q_b_proj.weight"]
    )
    assert torch.equal(
        state["model.layers.2.mlp.experts.down_proj"][3], expected["model.layers.2.mlp.experts.3.down_proj.weight"]
    )
    original = model.state_dict()["model.layers.2.mlp.experts.down_proj"][3]
    assert not torch.equal(original, state["model.layers.2.mlp.experts.down_proj"][3])  # really went through FP8
    torch.testing.assert_close(state["model.layers.2.mlp.experts.down_proj"][3], original, atol=0.01, rtol=0.1)

    # the scale must be there
    name = "model.layers.1.self_attn.o_proj.weight"
    file_name = index["weight_map"][name]
    tensors = load_file(str(directory / file_name))
    del tensors[name + "_scale_inv"]
    save_file(tensors, str(directory / file_name))
    with pytest.raises(ckpt.CheckpointError, match=r"o_proj\.weight_scale_inv") as err:
        load_pretrained(directory)
    assert file_name in str(err.value)

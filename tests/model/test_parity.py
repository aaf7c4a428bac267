"""Numerical parity with transformers' DeepseekV3ForCausalLM: its save_pretrained checkpoint, our load_pretrained,
the same fp32 logits (max abs difference <= 1e-4), for K2-like, DeepSeek-like and plain-RoPE tiny configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from k2_workers.model import K2Config, load_pretrained
from k2_workers.model.rope import rope_frequencies, softmax_scale
from tests.model.hf_reference import TINY_CONFIGS, save_hf_checkpoint

TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    directory = tmp_path_factory.mktemp(request.param)
    return save_hf_checkpoint(TINY_CONFIGS[request.param], directory), directory


def _input_ids(batch: int = 2, seq: int = 37) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(7))


def test_logits_match_transformers(pair: tuple[object, Path]) -> None:
    hf, directory = pair
    ours = load_pretrained(directory).eval()
    input_ids = _input_ids()
    with torch.no_grad():
        expected = hf(input_ids).logits  # type: ignore[operator]
        fast = ours(input_ids).logits  # scaled-dot-product attention
        ours.record_attention_logits = True
        recorded = ours(input_ids).logits  # explicit logits with the max-logit recording
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero outputs
    assert (fast - expected).abs().max().item() <= TOLERANCE
    assert (recorded - expected).abs().max().item() <= TOLERANCE


def test_correction_bias_changes_the_choice(pair: tuple[object, Path]) -> None:
    """The non-zero biases matter: zeroing them in our model moves the logits away from the reference."""
    hf, directory = pair
    ours = load_pretrained(directory).eval()
    for moe in ours.moe_blocks():
        assert moe.gate.e_score_correction_bias is not None
        assert moe.gate.e_score_correction_bias.abs().max() > 0
        moe.gate.e_score_correction_bias.zero_()
    input_ids = _input_ids()
    with torch.no_grad():
        diff = (ours(input_ids).logits - hf(input_ids).logits).abs().max().item()  # type: ignore[operator]
    assert diff > 1e-2


@pytest.mark.parametrize("preset", ["kimi-k2", "deepseek-v3"])
def test_rope_frequencies_and_softmax_scale_match_transformers(preset: str) -> None:
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    config = K2Config.from_preset(preset)
    hf_fields = {k: v for k, v in config.to_hf_config().items() if k not in ("extra", "auto_map")}
    hf = DeepseekV3Config(**hf_fields)
    hf_inv_freq, hf_cos_sin_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv_freq, cos_sin_scale = rope_frequencies(config)
    assert torch.equal(inv_freq, hf_inv_freq)
    assert cos_sin_scale == hf_cos_sin_scale == 1.0
    expected_scale = yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim**-0.5)
    assert softmax_scale(config) == pytest.approx(expected_scale, rel=1e-12)


def test_kimi_k2_rope_facts() -> None:
    """K2: pairs 0..19 keep θ_i = 50000^(-2i/64), pairs 20..31 use θ_i/32; scale 192^-0.5·(0.1·ln 32 + 1)²."""
    config = K2Config.from_preset("kimi-k2")
    inv_freq, _ = rope_frequencies(config)
    theta = 50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    torch.testing.assert_close(inv_freq[:20], theta[:20], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq[20:], theta[20:] / 32, rtol=1e-6, atol=0)
    assert softmax_scale(config) == pytest.approx(192**-0.5 * (0.1 * math.log(32) + 1) ** 2, rel=1e-12)
    assert softmax_scale(config) == pytest.approx(0.13086079996295005, rel=1e-12)

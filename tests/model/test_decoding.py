"""Decoding with the MLA latent cache: what the cache stores, step-by-step equals the full forward, greedy and
sampled generation, and batches of prompts of different lengths."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from k2_workers.model import K2Config, K2ForCausalLM, MLACache
from k2_workers.model.decoding import generate, generate_batch, sample_next


@pytest.fixture(scope="module")
def model() -> K2ForCausalLM:
    torch.manual_seed(0)
    m = K2ForCausalLM(K2Config.from_preset("k2-debug")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
        for moe in m.moe_blocks():
            assert moe.gate.e_score_correction_bias is not None
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    return m


def test_cache_holds_only_the_compressed_latent() -> None:
    config = K2Config.from_preset("kimi-k2")
    cache = MLACache(config, batch_size=1, max_seq_len=3)
    assert cache.values_per_token_per_layer == 512 + 64
    tensors = {name: t for name, t in vars(cache).items() if isinstance(t, torch.Tensor)}
    assert tensors.pop("pad_B").shape == (1,)  # one padding count per sequence
    assert sum(t.numel() for t in tensors.values()) == config.num_hidden_layers * 3 * 576


def test_step_by_step_equals_full_forward(model: K2ForCausalLM) -> None:
    input_ids = torch.randint(0, 258, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = MLACache(model.config, 2, 14)
        pieces = [model(input_ids[:, :5], cache=cache).logits]  # prefill
        pieces.append(model(input_ids[:, 5:8], cache=cache).logits)  # a chunk
        for t in range(8, 14):  # single tokens
            pieces.append(model(input_ids[:, t : t + 1], cache=cache).logits)
    assert cache.seq_len == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    # the cache rows are the RMS-normalised latents, not per-head keys
    assert cache.latent_LBTC.shape == (model.config.num_hidden_layers, 2, 14, model.config.kv_lora_rank)


def test_cache_overflow_is_an_error(model: K2ForCausalLM) -> None:
    cache = MLACache(model.config, 1, 4)
    with pytest.raises(ValueError, match="max_seq_len"), torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_greedy_generation_follows_the_argmax(model: K2ForCausalLM) -> None:
    prompt = torch.randint(0, 258, (2, 6), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, max_new_tokens=8)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        for t in range(6, 14):
            assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))


def test_sampled_generation_is_seeded(model: K2ForCausalLM) -> None:
    prompt = torch.randint(0, 258, (2, 4), generator=torch.Generator().manual_seed(5))

    def run(seed: int, **kwargs: float | int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, max_new_tokens=10, temperature=1.0, generator=g, **kwargs)  # type: ignore[arg-type]

    assert torch.equal(run(1), run(1))
    assert any(not torch.equal(run(1), run(seed)) for seed in range(2, 6))
    assert torch.equal(run(7, top_k=1), generate(model, prompt, max_new_tokens=10))


def test_eos_stops_a_row(model: K2ForCausalLM) -> None:
    prompt = torch.randint(0, 258, (1, 4), generator=torch.Generator().manual_seed(6))
    greedy = generate(model, prompt, max_new_tokens=6)
    eos = int(greedy[0, 6])
    stopped = generate(model, prompt, max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape[1] <= 7 and int(stopped[0, -1]) == eos


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0)


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 258, (n,), generator=g) for n in (3, 11, 6)]


def test_a_batch_of_different_lengths_decodes_each_prompt_as_if_alone(model: K2ForCausalLM) -> None:
    prompts = _prompts()
    batched = generate_batch(model, prompts, max_new_tokens=8)
    for prompt, completion in zip(prompts, batched, strict=True):
        alone = generate(model, prompt[None], max_new_tokens=8)[0, prompt.numel() :]
        assert completion.tolist() == alone.tolist()


def test_joined_cache_logits_equal_each_sequence_alone(model: K2ForCausalLM) -> None:
    """Right-aligned rows: padding is invisible and RoPE positions start at each row's first token."""
    prompts = _prompts()
    with torch.no_grad():
        caches = []
        for prompt in prompts:
            caches.append(MLACache(model.config, 1, prompt.numel()))
            model(prompt[None], cache=caches[-1])
        joined = MLACache.join(caches, max_seq_len=20)
        assert joined.pad_B.tolist() == [8, 0, 5]
        step = torch.tensor([[5], [6], [7]])
        together = model(step, cache=joined).logits[:, -1]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, step[row]])[None]).logits[:, -1]
            torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_each_row_samples_with_its_own_generator(model: K2ForCausalLM) -> None:
    prompts = _prompts()

    def sampler(seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return functools.partial(sample_next, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    batched = generate_batch(model, prompts, 6, [sampler(1), sample_next, sampler(3)])
    assert batched[0].tolist() == generate_batch(model, prompts[:1], 6, [sampler(1)])[0].tolist()
    assert batched[2].tolist() == generate_batch(model, prompts[2:], 6, [sampler(3)])[0].tolist()
    assert batched[1].tolist() == generate(model, prompts[1][None], 6)[0, prompts[1].numel() :].tolist()


def test_generate_batch_rejects_bad_arguments(model: K2ForCausalLM) -> None:
    with pytest.raises(ValueError, match="prompts"):
        generate_batch(model, [torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch(model, _prompts(), 0)
    with pytest.raises(ValueError, match="samplers"):
        generate_batch(model, _prompts(), 2, [sample_next])

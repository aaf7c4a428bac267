"""The paged cache against the dense one: a prompt prefilled in chunks into scattered blocks, then decoded a token
at a time, and rows of different lengths decoded together, give the logits of `generate` (MLA latents and GQA
keys/values alike), and a bad block table is refused."""

from __future__ import annotations

import pytest
import torch

from k2_workers.model import K2Config, K2ForCausalLM, generate
from k2_workers.model.paged_cache import PagedPool

BLOCK = 4


def _model(preset: str) -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset(preset)).eval()


@pytest.mark.parametrize("preset", ["k2-debug", "mixtral-debug"])
@torch.no_grad()
def test_rows_of_different_lengths_in_scattered_blocks_decode_as_each_alone(preset: str) -> None:
    model = _model(preset)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 250, (n,), generator=generator).tolist() for n in (11, 3, 7)]
    new = 5
    expected = [generate(model, torch.tensor([p]), new)[0, len(p) :].tolist() for p in prompts]
    pool = PagedPool(model.config, num_blocks=40, block_size=BLOCK)
    tables = [[37, 5, 22, 2, 9], [14, 30], [1, 33, 8, 19]]  # not contiguous, not in order
    tokens: list[list[int]] = []
    for prompt, table in zip(prompts, tables, strict=True):
        first = len(prompt) // 2  # two chunks: the second attends to the first through the pool
        model(torch.tensor([prompt[:first]]), cache=pool.view([table], [0], first))
        rest = len(prompt) - first
        logits = model(torch.tensor([prompt[first:]]), cache=pool.view([table], [first], rest)).logits
        tokens.append([int(logits[0, -1].argmax())])
    lengths = [len(p) for p in prompts]
    for _ in range(new - 1):
        view = pool.view(tables, lengths, 1)
        logits = model(torch.tensor([[t[-1]] for t in tokens]), cache=view).logits
        for row, next_token in enumerate(logits[:, -1].argmax(-1).tolist()):
            tokens[row].append(next_token)
        lengths = [n + 1 for n in lengths]
    assert tokens == expected


def test_a_table_too_short_for_the_new_tokens_is_refused() -> None:
    pool = PagedPool(K2Config.from_preset("k2-debug"), num_blocks=4, block_size=BLOCK)
    with pytest.raises(ValueError, match="row 0 has 1 blocks for 5 tokens"):
        pool.view([[0]], [3], 2)


def test_a_token_costs_its_latent_and_rope_key_per_layer() -> None:
    config = K2Config.from_preset("k2-debug")
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    assert PagedPool.bytes_per_token(config, torch.bfloat16) == config.num_hidden_layers * per_layer * 2

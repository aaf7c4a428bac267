"""The paged cache's block manager on its own: reference counts and the free list, whole-block prefix sharing by a
hash chain (equal blocks after different prefixes are not shared), and freed blocks reusable until handed out."""

from __future__ import annotations

import pytest

from k2_workers.serve.blocks import BlockManager


def test_blocks_come_from_the_free_list_and_go_back_when_released() -> None:
    blocks = BlockManager(num_blocks=4, block_size=4)
    assert blocks.reserve(1, 9) and len(blocks.table(1)) == 3 and blocks.used == 3
    assert not blocks.reserve(2, 8) and blocks.table(2) == []  # two needed, one free: nothing taken
    assert blocks.reserve(2, 4) and blocks.free == 0
    blocks.release(1)
    assert blocks.free == 3 and blocks.table(1) == []
    assert blocks.reserve(2, 16) and len(blocks.table(2)) == 4


def test_a_shared_prefix_reuses_whole_blocks_and_leaves_the_last_token_to_compute() -> None:
    blocks = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    assert blocks.admit(1, prompt) == 0 and blocks.reserve(1, len(prompt))
    blocks.commit(1, prompt, len(prompt))  # two full blocks registered, the third is partial
    assert blocks.admit(2, [*prompt[:8], 99, 98]) == 8  # the two full blocks, shared
    assert blocks.table(2) == blocks.table(1)[:2] and blocks.reused_blocks == 2
    assert blocks.admit(3, prompt[:8]) == 4  # its last token is computed again: one block only
    blocks.release(1)
    assert blocks.used == 2  # the shared blocks stay held by 2 and 3
    assert blocks.admit(4, [5, 6, 7, 8, *prompt[4:8], 0]) == 0  # same second block after another first one


def test_a_freed_block_stays_reusable_until_the_free_list_hands_it_out() -> None:
    blocks = BlockManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    blocks.admit(1, prompt)
    blocks.reserve(1, 5)
    blocks.commit(1, prompt, 5)
    blocks.release(1)
    assert blocks.free == 3
    assert blocks.admit(2, prompt) == 4 and blocks.free == 1  # both full blocks, back from the free list
    blocks.release(2)
    assert blocks.reserve(3, 6)  # takes every block: their old content is gone
    blocks.release(3)
    assert blocks.admit(4, prompt) == 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)

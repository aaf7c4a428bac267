"""The block manager of the paged cache: which of the pool's blocks each sequence holds (pure, no torch).

The pool (`k2_workers.model.paged_cache.PagedPool`) has `num_blocks` blocks of `block_size` token slots. A sequence
holds a block table, the blocks of its tokens in order; blocks come from a free list and go back to it when no
sequence holds them any more (reference counts).

Prefix sharing, whole blocks only: once a block is full its content is fixed, and it is registered under a digest of
its tokens and of every token before it (a hash chain, so equal digests mean equal prefixes). A new sequence whose
first blocks' digests are registered takes those blocks instead of computing them again. A freed block keeps its
registration until the free list hands it out again (least recently freed first), so a prefix stays reusable after
the request that computed it has left. A sequence always computes at least its last token itself (its logits give
the next token), so a match covers at most the full blocks before it.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_CACHE_TOKENS = 32768  # the paged cache's capacity, in tokens of every layer
DEFAULT_BLOCK_SIZE = 16  # tokens per cache block


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The digest of a full block: its tokens after the prefix whose digest is `parent` (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Block tables, reference counts, the free list and the prefix registry of one pool."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self._refs = [0] * num_blocks
        self._digest_of: list[bytes | None] = [None] * num_blocks
        self._registry: dict[bytes, int] = {}
        self._tables: dict[int, list[int]] = {}
        self._digests: dict[int, list[bytes]] = {}  # a sequence's digests of its full, committed blocks
        self.reused_blocks = 0  # blocks a sequence took from the registry instead of computing them

    @property
    def free(self) -> int:
        """Blocks no sequence holds (a registered one among them may still be reused)."""
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def admit(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Start `seq_id`'s table with the registered blocks of its longest cached prefix (full blocks, its last
        token excluded); return how many tokens they hold."""
        assert seq_id not in self._tables, f"sequence {seq_id} holds blocks already"
        table: list[int] = []
        digests: list[bytes] = []
        parent = b""
        for index in range((len(tokens) - 1) // self.block_size):
            digest = block_digest(parent, tokens[index * self.block_size : (index + 1) * self.block_size])
            block = self._registry.get(digest)
            if block is None:
                break
            self._take(block)
            table.append(block)
            digests.append(digest)
            parent = digest
        self._tables[seq_id], self._digests[seq_id] = table, digests
        self.reused_blocks += len(table)
        return len(table) * self.block_size

    def reserve(self, seq_id: int, num_tokens: int) -> bool:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; False (nothing taken) when too few blocks are free."""
        table = self._tables.setdefault(seq_id, [])
        self._digests.setdefault(seq_id, [])
        needed = self.blocks_for(num_tokens) - len(table)
        if needed > len(self._free):
            return False
        for _ in range(max(0, needed)):
            block, _ = self._free.popitem(last=False)
            if (digest := self._digest_of[block]) is not None:  # its old content is gone
                del self._registry[digest]
                self._digest_of[block] = None
            self._refs[block] = 1
            table.append(block)
        return True

    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None:
        """`seq_id`'s first `num_computed` tokens (of `tokens`) are in the cache: register its newly full blocks."""
        table, digests = self._tables[seq_id], self._digests[seq_id]
        for index in range(len(digests), num_computed // self.block_size):
            parent = digests[-1] if digests else b""
            digest = block_digest(parent, tokens[index * self.block_size : (index + 1) * self.block_size])
            block = table[index]
            if self._digest_of[block] is None and digest not in self._registry:
                self._registry[digest] = block
                self._digest_of[block] = digest
            digests.append(digest)

    def release(self, seq_id: int) -> None:
        """`seq_id` holds no block any more; a block nobody else holds goes back to the free list."""
        for block in self._tables.pop(seq_id, []):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} released more often than taken"
            if self._refs[block] == 0:
                self._free[block] = None
        self._digests.pop(seq_id, None)

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

"""Tokenizers: a byte-level one for tiny configs, and Kimi's tiktoken BPE loaded offline from a checkpoint directory.

`load_tokenizer(checkpoint_dir)` picks tiktoken when the directory holds `tiktoken.model`, else the byte tokenizer.
Nothing is ever downloaded: tiktoken reads the local rank file only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

# Kimi-K2's pre-tokenizer pattern (tokenization_kimi.py): eight alternatives joined by `|`. The `&&` class
# intersections need tiktoken's Rust regex engine.
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
KIMI_NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_FILE = "tiktoken.model"


class Tokenizer(Protocol):
    """What training and serving need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS = 256, EOS = 257. Needs a model vocabulary of at least 258."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """Kimi-K2's BPE: the base ranks from `tiktoken.model` plus 256 reserved specials ([BOS] first, [EOS] second)."""

    def __init__(self, model_file: Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(model_file))  # a local path: read directly, never fetched
        num_base = len(ranks)
        specials = {f"<|reserved_token_{i}|>": num_base + i for i in range(KIMI_NUM_RESERVED_SPECIAL_TOKENS)}
        specials["[BOS]"] = specials.pop("<|reserved_token_0|>")
        specials["[EOS]"] = specials.pop("<|reserved_token_1|>")
        self._encoding = tiktoken.Encoding(
            name=model_file.parent.name or "kimi", pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens=specials
        )
        self._num_base = num_base
        self.bos_id = specials["[BOS]"]
        self.eos_id = specials["[EOS]"]
        self.vocab_size = num_base + KIMI_NUM_RESERVED_SPECIAL_TOKENS

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)


def load_tokenizer(checkpoint_dir: str | Path | None = None) -> Tokenizer:
    """tiktoken when `checkpoint_dir/tiktoken.model` exists, else the byte-level tokenizer."""
    if checkpoint_dir is not None:
        model_file = Path(checkpoint_dir) / TIKTOKEN_FILE
        if model_file.is_file():
            return TiktokenTokenizer(model_file)
    return ByteTokenizer()

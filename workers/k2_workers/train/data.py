"""Training data: tokenised shards on local disk and a deterministic, resumable sample order.

Layout of a shard directory: `index.json` ({"format": "k2-tokens-v1", "dtype": "uint16" | "uint32", "vocab_size": V,
"shards": [{"file": "shard-00000.npy", "num_tokens": N}, ...]}) beside the `.npy` files (1-D token arrays, documents
separated by EOS). Shards are memory-mapped.

The sample order is a pure function of (seed, global sample index): sample windows of `seq_len + 1` tokens never
cross a shard boundary, each epoch visits every window once in a seeded permutation, and global step s (1-based) gives
rank r the samples [(s-1)·G + r·B, (s-1)·G + (r+1)·B) with B the per-rank batch and G = B·world. The data position is
therefore the number of global samples consumed, one integer that a checkpoint stores, valid for any world size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from k2_workers.tokenizer import Tokenizer
from k2_workers.train.corpus import generate_corpus

INDEX_FILE = "index.json"
FORMAT = "k2-tokens-v1"
BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("synthetic",)


def token_dtype(vocab_size: int) -> np.dtype[np.unsignedinteger]:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """One flat token array: each document followed by EOS."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))


def write_shards(tokens: np.ndarray, out_dir: str | Path, vocab_size: int, shard_tokens: int = 1 << 20) -> Path:
    """Split a flat token array into `.npy` shards plus `index.json` (written last: its presence means complete)."""
    if shard_tokens < 2:
        raise ValueError("shard_tokens must be at least 2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    shards = []
    for i, start in enumerate(range(0, len(tokens), shard_tokens)):
        name = f"shard-{i:05d}.npy"
        chunk = np.asarray(tokens[start : start + shard_tokens], dtype=dtype)
        np.save(out / name, chunk)
        shards.append({"file": name, "num_tokens": len(chunk)})
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": vocab_size, "shards": shards}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return out


def read_shards(directory: str | Path) -> list[np.ndarray]:
    """The memory-mapped shards listed in `directory/index.json`."""
    root = Path(directory)
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise ValueError(f"dataset: {root} has no {INDEX_FILE}; write shards with k2_workers.train.data.write_shards")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"dataset: {index_path} has format {index.get('format')!r}, expected {FORMAT!r}")
    return [np.load(root / shard["file"], mmap_mode="r") for shard in index["shards"]]


def load_dataset(uri: str, tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token shards for a dataset URI: `builtin:synthetic` (the bundled corpus, generated in memory), `file:///dir` or
    a plain directory holding `index.json`, or a `.txt` file (one document per blank-line-separated paragraph,
    tokenised in memory)."""
    if uri.startswith(BUILTIN_PREFIX):
        name = uri.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_CORPORA:
            raise ValueError(f"dataset: unknown builtin corpus {name!r}; known: {', '.join(BUILTIN_CORPORA)}")
        return [tokenize_documents(generate_corpus(), tokenizer)]
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise ValueError(f"dataset: unsupported URI scheme {parsed.scheme!r} in {uri!r} (use file:// or a path)")
    path = Path(parsed.path if parsed.scheme == "file" else uri)
    if path.is_file() and path.suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        return [tokenize_documents(paragraphs, tokenizer)]
    return read_shards(path)


@dataclass
class SampleOrder:
    """Maps a global sample index to a window (shard, start) of `seq_len + 1` tokens, epoch by epoch."""

    shards: Sequence[np.ndarray]
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        windows_per_shard = [max(0, (len(s) - 1) // self.seq_len) for s in self.shards]
        self._cumulative = np.cumsum([0, *windows_per_shard])
        self.num_windows = int(self._cumulative[-1])
        if self.num_windows == 0:
            raise ValueError(f"dataset: too few tokens for one sample of seq_len {self.seq_len}")
        self._epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _window(self, sample_index: int) -> np.ndarray:
        epoch, position = divmod(sample_index, self.num_windows)
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        window = int(self._permutation[position])
        shard = int(np.searchsorted(self._cumulative, window, side="right")) - 1
        start = (window - int(self._cumulative[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)

    def samples(self, first: int, count: int) -> np.ndarray:
        """Samples [first, first + count) as an int64 array [count, seq_len + 1]."""
        return np.stack([self._window(i) for i in range(first, first + count)])


@dataclass
class DataLoader:
    """Per-rank batches for consecutive global steps; `consumed_samples` is the whole resumable position."""

    order: SampleOrder
    batch_size: int
    rank: int
    world_size: int
    consumed_samples: int = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def next_batch(self) -> np.ndarray:
        """This rank's [batch_size, seq_len + 1] tokens of the next global step; advances the position."""
        first = self.consumed_samples + self.rank * self.batch_size
        batch = self.order.samples(first, self.batch_size)
        self.consumed_samples += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])

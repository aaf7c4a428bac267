from pathlib import Path

import numpy as np
import pytest

from k2_workers.tokenizer import ByteTokenizer
from k2_workers.train.corpus import generate_corpus
from k2_workers.train.data import DataLoader, SampleOrder, load_dataset, read_shards, write_shards


def test_corpus_is_deterministic_and_small() -> None:
    a, b = generate_corpus(seed=3), generate_corpus(seed=3)
    assert a == b and a != generate_corpus(seed=4)
    assert 100_000 < sum(map(len, a)) < 2_000_000


def test_shards_round_trip(tmp_path: Path) -> None:
    tokens = np.arange(1000) % 258
    write_shards(tokens, tmp_path, vocab_size=258, shard_tokens=300)
    shards = read_shards(tmp_path)
    assert [len(s) for s in shards] == [300, 300, 300, 100]
    assert shards[0].dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate(shards), tokens)
    assert [len(s) for s in load_dataset(f"file://{tmp_path}", ByteTokenizer())] == [300, 300, 300, 100]


def test_missing_index_and_bad_scheme_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"index\.json"):
        read_shards(tmp_path)
    with pytest.raises(ValueError, match="scheme"):
        load_dataset("s3://bucket/x", ByteTokenizer())
    with pytest.raises(ValueError, match="builtin"):
        load_dataset("builtin:nope", ByteTokenizer())


def test_builtin_corpus_ends_documents_with_eos() -> None:
    (tokens,) = load_dataset("builtin:synthetic", ByteTokenizer())
    assert (tokens == ByteTokenizer.eos_id).sum() == len(generate_corpus())


def _order(num_tokens: int = 2000, seq_len: int = 16) -> SampleOrder:
    shards = [np.arange(num_tokens // 2), np.arange(num_tokens // 2, num_tokens)]
    return SampleOrder(shards, seq_len=seq_len, seed=7)


def test_windows_never_cross_shards_and_each_epoch_visits_every_window_once() -> None:
    order = _order()
    samples = order.samples(0, order.num_windows)
    assert samples.shape == (order.num_windows, 17)
    assert np.all(np.diff(samples, axis=1) == 1)  # contiguous within one shard
    starts = sorted(samples[:, 0].tolist())
    assert len(set(starts)) == order.num_windows
    next_epoch = order.samples(order.num_windows, order.num_windows)
    assert sorted(next_epoch[:, 0].tolist()) == starts and not np.array_equal(next_epoch, samples)


def test_ranks_split_each_global_batch_and_resume_exactly() -> None:
    order = _order()
    loaders = [DataLoader(order, batch_size=3, rank=r, world_size=2) for r in range(2)]
    steps = [[loader.next_batch() for loader in loaders] for _ in range(5)]
    for per_rank in steps:  # disjoint samples on the two ranks
        assert not set(per_rank[0][:, 0].tolist()) & set(per_rank[1][:, 0].tolist())
    resumed = DataLoader(_order(), batch_size=3, rank=1, world_size=2)
    state = DataLoader(order, batch_size=3, rank=1, world_size=2, consumed_samples=3 * 6).state_dict()
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.next_batch(), steps[3][1])


def test_a_world_of_one_sees_the_same_global_batches() -> None:
    two = [DataLoader(_order(), batch_size=2, rank=r, world_size=2) for r in range(2)]
    one = DataLoader(_order(), batch_size=4, rank=0, world_size=1)
    for _ in range(3):
        np.testing.assert_array_equal(np.concatenate([loader.next_batch() for loader in two]), one.next_batch())

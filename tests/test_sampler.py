import pytest

from guard_train.training.sampler import EpochShardSampler


def test_shards_disjoint_cover_and_deterministic():
    n, world, bs = 103, 2, 4
    shards = [list(EpochShardSampler(n, 7, r, world, bs)) for r in range(world)]
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == len(shards[1]) == n // (world * bs) * bs
    assert shards[0] == list(EpochShardSampler(n, 7, 0, world, bs))
    s = EpochShardSampler(n, 7, 0, world, bs)
    s.set_epoch(1)
    assert list(s) != shards[0]


def test_start_at_skips_consumed_items():
    s = EpochShardSampler(40, 0, 1, 2, 4)
    full = list(s)
    s.start_at(8)
    assert list(s) == full[8:] and len(s) == len(full) - 8
    s.set_epoch(2)
    assert s.start == 0


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochShardSampler(5, 0, 0, 2, 4)

import random

import pytest

from kiln.runtime.kv_cache import KVCacheManager


def test_allocate_grows_and_frees():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate("a", 5)  # 2 blocks
    assert len(kv.block_table("a")) == 2 and kv.num_free_blocks == 2
    assert kv.allocate("a", 8)  # still 2 blocks
    assert kv.num_free_blocks == 2
    assert not kv.allocate("b", 13)  # needs 4: all-or-nothing
    assert kv.num_free_blocks == 2 and kv.block_table("b") == []
    kv.free("a")
    assert kv.num_free_blocks == 4


def test_rejects_empty_pool():
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=0, block_size=16)


def test_random_operations_never_leak_or_share():
    rng = random.Random(7)
    kv = KVCacheManager(num_blocks=64, block_size=8)
    lengths: dict[str, int] = {}
    for step in range(5000):
        op = rng.random()
        if op < 0.5:
            seq = f"s{rng.randrange(40)}"
            want = lengths.get(seq, 0) + rng.randrange(1, 30)
            if kv.allocate(seq, want):
                lengths[seq] = want
        elif lengths:
            seq = rng.choice(sorted(lengths))
            kv.free(seq)
            del lengths[seq]
        owners = kv.owners()
        owned = [b for table in owners.values() for b in table]
        assert len(owned) == len(set(owned)), f"step {step}: a block has two owners"
        assert len(owned) + kv.num_free_blocks == kv.num_blocks, f"step {step}: blocks leaked"
        for seq, n in lengths.items():
            assert len(owners[seq]) >= kv.blocks_for(n)
    for seq in list(lengths):
        kv.free(seq)
    assert kv.num_free_blocks == kv.num_blocks

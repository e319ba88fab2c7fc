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


# ---- prefix caching -------------------------------------------------------------------------------


def _compute(kv: KVCacheManager, seq_id: str, tokens: list[int]) -> int:
    """Admit a sequence as the scheduler does: attach its cached prefix, allocate the rest, 'compute' it."""
    cached = kv.match_prefix(seq_id, tokens)
    assert kv.allocate(seq_id, len(tokens))
    kv.register_computed(seq_id, lambda a, b: tokens[a:b], len(tokens))
    return cached


def test_shared_prefix_reuses_full_blocks_and_keeps_the_tail_private():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prefix = list(range(100, 110))  # 2 full blocks + 2 tokens
    assert _compute(kv, "a", prefix + [1, 2, 3]) == 0
    assert _compute(kv, "b", prefix + [7, 8]) == 8  # the 2 full blocks of the shared prefix
    a, b = kv.block_table("a"), kv.block_table("b")
    assert a[:2] == b[:2] and kv.ref_count(a[0]) == 2
    assert a[2] != b[2] and kv.ref_count(b[2]) == 1  # the block still being written is b's alone


def test_at_least_one_token_is_left_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    tokens = list(range(8))  # exactly two blocks
    _compute(kv, "a", tokens)
    assert kv.match_prefix("b", tokens) == 4  # not 8: the last token must run to give logits


def test_finished_prompts_stay_cached_until_the_pool_needs_their_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    tokens = list(range(9))
    _compute(kv, "a", tokens)
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.num_cached_blocks == 2
    assert kv.match_prefix("b", tokens) == 8
    kv.free("b")
    assert kv.allocate("c", 16)  # takes every block: the old registrations are evicted
    assert kv.num_cached_blocks == 0
    kv.free("c")
    assert kv.match_prefix("d", tokens) == 0


def test_a_reused_parent_block_orphans_its_old_children():
    kv = KVCacheManager(num_blocks=3, block_size=2)  # no never-used block left once "a" runs
    _compute(kv, "a", [1, 2, 3, 4, 5])  # blocks [1,2] -> [3,4] registered, plus a partial one
    parent, child = kv.block_table("a")[:2]
    kv.free("a")
    kv._free.move_to_end(parent, last=False)  # LRU never evicts a parent before its child: force it here
    _compute(kv, "x", [7, 8, 9])  # takes the parent block for new content [7, 8] (and the spare block)
    assert kv.block_table("x")[0] == parent and kv.is_registered(child)
    # [7, 8] is cached now, in the very block that used to precede [3, 4]; the old child must not follow it.
    assert kv.match_prefix("b", [7, 8, 3, 4, 5]) == 2


def test_hash_collisions_are_misses_not_wrong_hits():
    kv = KVCacheManager(num_blocks=16, block_size=2, hash_fn=lambda key: 0)  # every key collides
    _compute(kv, "a", [1, 2, 3, 4, 5])
    assert kv.match_prefix("b", [9, 9, 3, 4, 5]) == 0
    assert kv.match_prefix("c", [1, 2, 3, 4, 5]) == 2  # first block registered; the second collided
    assert kv.match_prefix("d", [1, 2, 8, 8, 5]) == 2


def test_extra_keys_separate_equal_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    tokens = [5, 5, 5, 5, 1]  # e.g. image placeholder tokens for two different images
    kv.match_prefix("a", tokens, ["img-A", "img-A"])
    assert kv.allocate("a", 5)
    kv.register_computed("a", lambda s, e: tokens[s:e], 5, ["img-A", "img-A"])
    assert kv.match_prefix("b", tokens, ["img-B", "img-B"]) == 0
    assert kv.match_prefix("c", tokens, ["img-A", "img-A"]) == 4


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=2, enable_prefix_caching=False)
    _compute(kv, "a", [1, 2, 3, 4, 5])
    assert kv.match_prefix("b", [1, 2, 3, 4, 5]) == 0 and kv.num_cached_blocks == 0


def _check_pool(kv: KVCacheManager, computed: dict[str, int], where: str) -> None:
    owners = kv.owners()
    held = {b for table in owners.values() for b in table}
    refs = [b for table in owners.values() for b in table]
    for block in range(kv.num_blocks):
        assert kv.ref_count(block) == refs.count(block), f"{where}: block {block} has a wrong reference count"
    assert len(held) + kv.num_free_blocks == kv.num_blocks, f"{where}: blocks leaked"
    for seq_id, table in owners.items():
        # Blocks from the first not-fully-computed one on are written by this sequence: never shared.
        for block in table[computed.get(seq_id, 0) // kv.block_size :]:
            assert kv.ref_count(block) == 1 and not kv.is_registered(block), f"{where}: writable block shared"


def test_thousands_of_random_add_cancel_finish_operations_leak_nothing():
    rng = random.Random(11)
    kv = KVCacheManager(num_blocks=48, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(6)]
    live: dict[str, list[int]] = {}  # sequence -> its tokens
    computed: dict[str, int] = {}
    hits = 0
    for step in range(5000):
        op = rng.random()
        if op < 0.35 and len(live) < 12:  # a request arrives
            seq = f"r{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            cached = kv.match_prefix(seq, tokens)
            assert cached % kv.block_size == 0 and cached < len(tokens)
            if kv.allocate(seq, min(len(tokens), cached + rng.randrange(1, 9))):
                live[seq], computed[seq] = tokens, cached
                hits += cached > 0
            else:
                kv.free(seq)
        elif op < 0.75 and live:  # a step computes some tokens (and decodes one past the prompt)
            seq = rng.choice(sorted(live))
            tokens = live[seq]
            if computed[seq] == len(tokens):
                tokens.append(rng.randrange(50))
            target = min(len(tokens), computed[seq] + rng.randrange(1, 9))
            if kv.allocate(seq, target):
                computed[seq] = target
                kv.register_computed(seq, lambda a, b, t=tokens: t[a:b], target)
        elif live:  # finish or cancel: both release everything
            seq = rng.choice(sorted(live))
            kv.free(seq)
            del live[seq], computed[seq]
        _check_pool(kv, computed, f"step {step}")
    for seq in list(live):
        kv.free(seq)
    assert kv.num_free_blocks == kv.num_blocks and all(kv.ref_count(b) == 0 for b in range(kv.num_blocks))
    assert hits > 100, "the workload should exercise prefix hits"


def test_blocks_are_taken_unregistered_first_then_never_used_then_least_recently_freed():
    kv = KVCacheManager(num_blocks=10_000_000, block_size=2)  # never-used blocks cost nothing
    assert kv.num_free_blocks == 10_000_000 and kv.usage == 0.0
    _compute(kv, "a", [1, 2, 3, 4, 5])  # blocks 0, 1 registered; 2 partial
    _compute(kv, "b", [6, 7, 8])  # 3 registered; 4 partial
    assert kv.block_table("a") == [0, 1, 2] and kv.block_table("b") == [3, 4]
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == 10_000_000 and kv.ref_count(7_000_000) == 0
    assert kv.allocate("c", 2 * 3)  # the two unregistered partial blocks, then a never-used one
    assert kv.block_table("c") == [4, 2, 5]
    assert kv.match_prefix("d", [1, 2, 3, 4, 9]) == 4  # the registered blocks are still there
    small = KVCacheManager(num_blocks=3, block_size=2)
    _compute(small, "a", [1, 2, 3, 4, 5])
    small.free("a")
    assert small.allocate("e", 2 * 3) and small.block_table("e") == [2, 1, 0]  # partial, then tail before head
    with pytest.raises(IndexError):
        small.ref_count(3)

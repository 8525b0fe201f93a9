import random
import sys

import pytest

from meshserve.orchestrator.block_manager import BlockManager


def test_block_zero_is_never_handed_out_and_counts_add_up():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert (bm.num_free, bm.num_used) == (4, 0)
    got = bm.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and (bm.num_free, bm.num_used) == (0, 4)
    with pytest.raises(RuntimeError):
        bm.allocate(1)
    bm.free(got)
    assert (bm.num_free, bm.num_used) == (4, 0)
    with pytest.raises(RuntimeError):
        bm.free([got[0]])  # a second free is a bug, not a no-op
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_shared_blocks_are_freed_with_their_last_reference():
    bm = BlockManager(num_blocks=4, block_size=2)
    (b,) = bm.allocate(1)
    bm.acquire([b])
    assert bm.ref_count(b) == 2 and bm.num_used == 1
    bm.free([b])
    assert bm.ref_count(b) == 1 and bm.num_free == 2
    bm.free([b])
    assert bm.ref_count(b) == 0 and bm.num_free == 3 and bm.num_used == 0


def test_registered_chain_is_matched_and_survives_free_until_evicted():
    bm = BlockManager(num_blocks=6, block_size=2)
    toks = [1, 2, 3, 4, 5, 6]
    blocks = bm.allocate(3)
    cid = 0
    for i, b in enumerate(blocks):
        cid = bm.register(b, cid, toks[2 * i:2 * i + 2])
    assert bm.match(toks + [7], 10)[0] == blocks
    assert bm.match(toks, 2)[0] == blocks[:2]
    assert bm.match([1, 2, 9, 9, 5, 6], 10)[0] == blocks[:1]  # the chain stops at the first miss
    assert bm.match([3, 4, 5, 6], 10)[0] == []  # same tokens after another prefix: no hit
    bm.free(blocks)
    assert bm.num_free == 5 and bm.num_cached == 3
    hit, _ = bm.match(toks, 10)
    assert hit == blocks  # evictable blocks are still found
    bm.acquire(hit[:1])  # reviving takes it out of the free pool
    assert bm.num_free == 4 and bm.ref_count(blocks[0]) == 1
    # the two never-cached blocks go first; then the chain's tail before its head
    fresh = bm.allocate(2)
    assert set(fresh).isdisjoint(blocks) and bm.num_cached == 3
    assert bm.allocate(1) == [blocks[2]] and bm.num_cached == 2
    assert bm.match(toks, 10)[0] == blocks[:2]
    assert bm.allocate(1) == [blocks[1]]
    assert bm.match(toks, 10)[0] == blocks[:1]


def test_duplicate_content_keeps_the_first_block_and_its_id():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = bm.allocate(2)
    cid = bm.register(a, 0, [1, 2])
    assert bm.register(b, 0, [1, 2]) == cid and bm.num_cached == 1
    assert bm.match([1, 2, 3], 1)[0] == [a]
    assert bm.register(a, 0, [1, 2]) == cid  # the same block again (siblings of a fork): the same id
    with pytest.raises(RuntimeError):
        bm.register(a, 0, [1, 3])  # already registered, with other content
    with pytest.raises(RuntimeError):
        bm.register(bm.allocate(1)[0], 0, [1])  # not a full block


def test_hash_collisions_never_alias():
    """CPython hashes n and n + (2**61 - 1) alike, so these blocks' keys collide: a lookup
    must still compare the tokens."""
    m = sys.hash_info.modulus
    bm = BlockManager(num_blocks=4, block_size=2)
    assert hash((0, (5, 6))) == hash((0, (5 + m, 6)))
    (b,) = bm.allocate(1)
    bm.register(b, 0, [5, 6])
    assert bm.match([5 + m, 6], 1)[0] == []
    assert bm.match([5, 6], 1)[0] == [b]


def test_content_ids_are_never_reused_after_eviction():
    """A child registered under an evicted parent must not be reachable from the new parent."""
    bm = BlockManager(num_blocks=3, block_size=1)
    p, c = bm.allocate(2)
    pid = bm.register(p, 0, [1])
    bm.register(c, pid, [2])
    bm.free([p])  # the least recently freed: evicted first
    bm.free([c])
    (x,) = bm.allocate(1)
    assert x == p and bm.match([1, 2], 2)[0] == []
    new_pid = bm.register(x, 0, [1])  # same content, fresh id
    assert new_pid != pid and bm.match([1, 2], 2)[0] == [x]


def test_random_operations_keep_counts_consistent():
    rng = random.Random(7)
    bm = BlockManager(num_blocks=9, block_size=2)
    held: list[int] = []  # one entry per reference
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 and bm.num_free:
            got = bm.allocate(rng.randint(1, bm.num_free))
            for b in got:
                if rng.random() < 0.7:
                    bm.register(b, rng.randrange(3), [rng.randrange(3), rng.randrange(3)])
            held += got
        elif op < 0.5:
            toks = [rng.randrange(3) for _ in range(6)]
            hit, _ = bm.match(toks, 3)
            bm.acquire(hit)
            held += hit
        elif held:
            held.remove(b := rng.choice(held))
            bm.free([b])
        assert bm.num_used == len(set(held)) and bm.num_free == 8 - len(set(held))
        assert all(bm.ref_count(b) == held.count(b) for b in range(1, 9))

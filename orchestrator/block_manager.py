"""Paged KV cache bookkeeping: fixed-size blocks with reference counts and a prefix cache.

Block 0 is a scratch block and never handed out. A block with refcount 0 is free; if it still holds
a registered full block of tokens it stays findable by the prefix cache (evictable) until its id
is needed for a new allocation, least recently freed first.

Prefix cache keys. A full block is keyed by (content id of the block before it, its token tuple);
registering a new key hands out a fresh content id, never reused, which names the whole token
prefix up to the block's end (0 names the empty prefix). A dict lookup compares the token tuple
itself, so by induction a hit holds exactly the looked-up prefix: a hash collision can cost a
dict probe, never wrong K/V.
"""
from __future__ import annotations

from collections import OrderedDict

Key = tuple[int, tuple[int, ...]]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least 2 blocks")
        if block_size < 1:
            raise ValueError(f"block_size={block_size}: use at least 1 token per block")
        self.block_size = block_size
        self.num_blocks = num_blocks  # including scratch block 0
        self._refs = [0] * num_blocks
        # refcount-0 blocks; allocation takes from the front. Uncached blocks go to the front,
        # cached ones to the back, so cached K/V is evicted last and least recently freed first.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._num_used = 0
        self._cache: dict[Key, int] = {}         # key -> block holding it
        self._key: dict[int, tuple[Key, int]] = {}  # block -> (key, content id)
        self._next_cid = 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take, evictable cached ones included."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with refcount > 0."""
        return self._num_used

    @property
    def num_cached(self) -> int:
        """Blocks holding a registered prefix (in use or evictable)."""
        return len(self._key)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with refcount 1; evicts cached blocks when no uncached one is left."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._refs[b] = 1
            out.append(b)
        self._num_used += n
        return out

    def acquire(self, blocks: list[int]) -> None:
        """Share blocks found by match(): refcount + 1, reviving evictable ones."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
                self._num_used += 1
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A table's tail is released first so that, among its
        cached blocks, the tail (the least shareable part) is evicted before the head."""
        for b in reversed(blocks):
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed more often than it was taken")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._num_used -= 1
                self._free[b] = None
                if b not in self._key:
                    self._free.move_to_end(b, last=False)

    def match(self, token_ids: list[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """Blocks (and their content ids) holding the longest cached prefix of token_ids, at most
        max_blocks full blocks. Read-only: call acquire() on the blocks to use them."""
        bs, parent = self.block_size, 0
        blocks, cids = [], []
        for i in range(min(max_blocks, len(token_ids) // bs)):
            b = self._cache.get((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            if b is None:
                break
            parent = self._key[b][1]
            blocks.append(b)
            cids.append(parent)
        return blocks, cids

    def register(self, block: int, parent_cid: int, tokens: list[int]) -> int:
        """Record that `block` (in use) now holds `tokens`, a full block whose prefix is parent_cid.
        Returns the content id of the extended prefix. If that prefix is already cached in another
        block, this block stays unregistered and the existing id is returned. A block several
        sequences hold (a forked prompt's) is registered by each of them: once registered it keeps
        its key, and its content id is returned (the parent ids may differ: a prefix whose cached
        chain was evicted and registered again has a new id, the same tokens)."""
        key = (parent_cid, tuple(tokens))
        if block in self._key and self._refs[block] > 0 and self._key[block][0][1] == key[1]:
            return self._key[block][1]
        if len(tokens) != self.block_size or self._refs[block] <= 0 or block in self._key:
            raise RuntimeError(f"KV block {block} cannot be registered in the prefix cache")
        holder = self._cache.get(key)
        if holder is not None:
            return self._key[holder][1]
        cid = self._next_cid
        self._next_cid += 1
        self._cache[key] = block
        self._key[block] = (key, cid)
        return cid

    def _evict(self, block: int) -> None:
        entry = self._key.pop(block, None)
        if entry is not None:
            del self._cache[entry[0]]

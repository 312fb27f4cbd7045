"""The paged KV cache's bookkeeping: ref-counted blocks, block tables, prefix cache.

A block holds `block_size` tokens' keys and values. A full block whose tokens
have been computed is hashed by its tokens and the hash of the block before
it, so a later sequence with the same prefix reuses it instead of recomputing.
A block nobody holds stays in the free queue with its hash until it is reused.
"""

from collections import deque

from xllm.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.hashed: dict[int, tuple[int, int]] = {}  # id(seq) -> (blocks hashed, last hash)
        self.queries = 0
        self.hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _hashes(self, seq: Sequence, first: int, last: int, prev: int = 0) -> list[int]:
        """Chained hashes of blocks first..last-1 of `seq`, `prev` being block first-1's."""
        hashes, bs = [], self.block_size
        for i in range(first, last):
            prev = hash((prev, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
            hashes.append(prev)
        return hashes

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest known prefix.

        At least one token is left to compute, so the sequence gets logits.
        Returns the number of tokens found in the cache.
        """
        if not self.prefix_caching:
            return 0
        candidates = (seq.num_tokens - 1) // self.block_size
        self.queries += candidates
        last = 0
        for h in self._hashes(seq, 0, candidates):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            last = h
            if self.ref_counts[block] == 0:
                self.free_queue.remove(block)
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        self.hits += len(seq.block_table)
        self.hashed[id(seq)] = (len(seq.block_table), last)
        return len(seq.block_table) * self.block_size

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`; False (and no change) if short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free_queue):
            return False
        for _ in range(needed):
            block = self.free_queue.popleft()
            old = self.block_hash[block]
            if old is not None and self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks that `seq` has filled with computed tokens."""
        if not self.prefix_caching:
            return
        done, prev = self.hashed.get(id(seq), (0, 0))
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if full <= done:
            return
        for i, h in enumerate(self._hashes(seq, done, full, prev), start=done):
            block = seq.block_table[i]
            if self.block_hash[block] is None:
                self.block_hash[block] = h
                self.hash_to_block.setdefault(h, block)
            prev = h
        self.hashed[id(seq)] = (full, prev)

    def free(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks; the last holder puts a block in the free queue."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue.append(block)
        seq.block_table = []
        self.hashed.pop(id(seq), None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block hash (the KV contents are gone); only with no holders."""
        if any(self.ref_counts):
            raise RuntimeError("cannot reset the prefix cache while blocks are held")
        self.block_hash = [None] * self.num_blocks
        self.hash_to_block.clear()
        self.hashed.clear()

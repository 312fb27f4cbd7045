"""The paged KV cache's bookkeeping: ref-counted blocks, block tables, prefix cache, forks.

A block holds `block_size` tokens' keys and values. A full block whose tokens
have been computed enters the prefix cache under a key made of its tokens and
the digest of everything before it, so a later sequence with the same prefix
reuses it instead of recomputing. A hit compares the stored tokens, not just a
hash; the digest of the prefix is a 128-bit BLAKE2b, so two prefixes never
share one in practice. A block nobody holds stays in the free queue with its
key until it is reused.
"""

from array import array
from collections import deque
from hashlib import blake2b
from typing import NamedTuple

from xllm.engine.sequence import Sequence


class BlockKey(NamedTuple):
    """What a cached block holds: its tokens, after the prefix with digest `parent`, and
    the digests of the images whose placeholder tokens it holds (equal placeholders of
    different images never share a block)."""

    parent: bytes
    tokens: tuple[int, ...]
    images: bytes = b""

    def digest(self) -> bytes:
        """The digest of the prefix that ends with this block."""
        data = self.parent + self.images + array("q", self.tokens).tobytes()
        return blake2b(data, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))
        self.block_key: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self.queries = 0
        self.hits = 0
        self.copies: list[tuple[int, int]] = []  # copy on write, for the next step

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _key(self, seq: Sequence, index: int, parent: bytes) -> BlockKey:
        start, end = index * self.block_size, (index + 1) * self.block_size
        tokens = tuple(seq.token_ids[start:end])
        if not seq.prompt.images:
            return BlockKey(parent, tokens)
        images = b"".join(image.digest for image in seq.prompt.images_in(start, end))
        return BlockKey(parent, tokens, images)

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a new sequence the cached blocks of its longest known prefix.

        At least one token is left to compute, so the sequence gets logits.
        Returns the number of tokens found in the cache.
        """
        if not self.prefix_caching:
            return 0
        candidates = (seq.num_tokens - 1) // self.block_size
        self.queries += candidates
        parent = b""
        for i in range(candidates):
            key = self._key(seq, i, parent)
            block = self.cached.get(key)  # equal keys: same prefix digest and same tokens
            if block is None:
                break
            if self.ref_counts[block] == 0:
                self.free_queue.remove(block)
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            parent = key.digest()
        self.hits += len(seq.block_table)
        seq.num_hashed_blocks, seq.prefix_digest = len(seq.block_table), parent
        return len(seq.block_table) * self.block_size

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`, first giving it its own copy of a
        shared partial block it is about to write (copy on write, see `take_copies`);
        False (and no change) if short of blocks."""
        shared = self._shared_partial(seq)
        grow = self.blocks_needed(seq, num_tokens)
        if grow + (shared is not None) > len(self.free_queue):
            return False
        if shared is not None:
            block = seq.block_table[shared]
            seq.block_table[shared] = self._take()
            self.ref_counts[block] -= 1
            self.copies.append((block, seq.block_table[shared]))
        for _ in range(grow):
            seq.block_table.append(self._take())
        return True

    def _shared_partial(self, seq: Sequence) -> int | None:
        """The index of the partly filled block `seq` writes next, if another holds it too."""
        index, filled = divmod(seq.num_computed, self.block_size)
        if filled and index < len(seq.block_table) and \
                self.ref_counts[seq.block_table[index]] > 1:
            return index
        return None

    def _take(self) -> int:
        """A free block, taken out of the prefix cache, held once."""
        block = self.free_queue.popleft()
        old = self.block_key[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies that allocations asked for since the last call; they
        must be done before the step's forward pass writes anything."""
        copies, self.copies = self.copies, []
        return copies

    def commit(self, seq: Sequence) -> None:
        """Enter the blocks that `seq` has filled with computed tokens into the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        parent = seq.prefix_digest
        for i in range(seq.num_hashed_blocks, full):
            key = self._key(seq, i, parent)
            block = seq.block_table[i]
            if self.block_key[block] is None:
                self.block_key[block] = key
                self.cached.setdefault(key, block)
            parent = key.digest()
        if full > seq.num_hashed_blocks:
            seq.num_hashed_blocks, seq.prefix_digest = full, parent

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` (holding no blocks) share all of `parent`'s blocks by reference.

        Full blocks are never written again; a shared partial last block must be
        copied before either sequence writes to it (copy on write, the caller's job).
        """
        if child.block_table:
            raise ValueError("fork: the child already holds blocks")
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.prefix_digest = parent.prefix_digest

    def free(self, seq: Sequence) -> None:
        """Give back all of `seq`'s blocks; the last holder puts a block in the free queue."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue.append(block)
        seq.block_table = []
        seq.num_hashed_blocks, seq.prefix_digest = 0, b""

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the KV contents are gone); only with no holders."""
        if any(self.ref_counts):
            raise RuntimeError("cannot reset the prefix cache while blocks are held")
        self.block_key = [None] * self.num_blocks
        self.cached.clear()

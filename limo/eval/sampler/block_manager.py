"""Pages of the KV cache: a free list and reference counts, in pure Python (no torch).

Token i of a sequence lives in page `block_table[i // block_size]`. The n samples of one prompt
share the prompt's pages (each page's reference count says by how many sequences); a sample about
to write into a shared, partly filled last page first gets its own copy (copy-on-write), so the
siblings never see each other's tokens. Full pages are never written again, so they stay shared.

Every entry written into a running sequence's table is also logged as (table row, index, page):
the runner keeps the block tables on the device and applies only these changes each step,
instead of rebuilding B x pages entries from Python lists (O(context) host work per step).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class PagedSequence(Protocol):
    block_table: list[int]
    table_row: int  # its row in the device's block tables; -1: none (its entries are not logged)

    @property
    def num_tokens(self) -> int: ...


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.table_updates: list[tuple[int, int, int]] = []  # (table row, index, page) since the last drain

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def all_free(self) -> bool:
        return self.num_free == self.num_blocks and not any(self.ref_counts)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0, f"page {block} is on the free list with {self.ref_counts[block]} references"
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"page {block} released more often than taken"
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    def drain_table_updates(self) -> list[tuple[int, int, int]]:
        """The table entries written since the last call, in order (a later write to a slot wins)."""
        updates, self.table_updates = self.table_updates, []
        return updates

    def _log(self, seq: PagedSequence, start: int = 0) -> None:
        if seq.table_row >= 0:
            self.table_updates.extend((seq.table_row, i, seq.block_table[i]) for i in range(start, len(seq.block_table)))

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        """Whether a prefill of num_tokens fits and still leaves `reserve` pages free."""
        return self.blocks_for(num_tokens) + reserve <= self.num_free

    def allocate(self, seq: PagedSequence) -> None:
        """Fresh pages for all of a waiting sequence's tokens (its prefill writes every one)."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds pages")
        needed = self.blocks_for(seq.num_tokens)
        if needed > self.num_free:
            raise RuntimeError(f"{seq} needs {needed} pages, {self.num_free} free")
        seq.block_table = [self._take() for _ in range(needed)]
        self._log(seq)

    def share(self, parent: PagedSequence, child: PagedSequence) -> None:
        """Give `child` the parent's pages (a fork: one more reference to each)."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        self._log(child)

    def _needs_block(self, seq: PagedSequence) -> bool:
        pos = seq.num_tokens - 1  # the slot the next decode step writes
        index = pos // self.block_size
        return index == len(seq.block_table) or self.ref_counts[seq.block_table[index]] > 1

    def can_append(self, seq: PagedSequence) -> bool:
        """Whether the next decode step's slot (a new page or a private copy) can be had."""
        return not self._needs_block(seq) or self.num_free > 0

    def append_slot(self, seq: PagedSequence) -> tuple[int, int] | None:
        """Make the slot of token num_tokens - 1 writable; returns (src, dst) when a page must be copied."""
        if not self._needs_block(seq):
            return None
        index = (seq.num_tokens - 1) // self.block_size
        if index == len(seq.block_table):
            seq.block_table.append(self._take())
            self._log(seq, index)
            return None
        shared = seq.block_table[index]
        seq.block_table[index] = self._take()
        self._release(shared)
        self._log(seq, index)
        return shared, seq.block_table[index]

    def free(self, seq: PagedSequence) -> None:
        for block in seq.block_table:
            self._release(block)
        seq.block_table = []

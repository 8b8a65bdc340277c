"""Continuous batching: which sequences run the next step, and what happens when pages run out.

Each step is either a prefill (waiting sequences admitted while pages, rows and the token budget
last) or a decode of every running sequence. When a running sequence needs a page and none is
free, the newest running sequence is preempted: its pages are freed and it goes back to the front
of the queue, to be recomputed later from its prompt and the tokens it already generated (under
greedy decoding it continues exactly as it would have). The oldest sequences therefore always
progress, and a request that fits the cache alone always finishes: no deadlock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from limo.eval.sampler.block_manager import BlockManager
from limo.eval.sampler.sequence import Sequence, Status

WATERMARK = 0.01  # fraction of pages a prefill leaves free while others run, so decodes rarely preempt it


@dataclass
class Batch:
    """One step: `seqs` run through the model; `targets[i]` gets the token sampled from logits row `rows[i]`.

    A prefill has one row per prompt, shared by the n samples forked from it. `copies` are
    (src, dst) pages to copy before the step (copy-on-write of shared partial pages);
    `table_updates` the block-table entries written since the last step, for the runner's
    persistent tables (each running sequence owns one table row, `seq.table_row`).
    """

    seqs: list[Sequence]
    is_prefill: bool
    targets: list[Sequence]
    rows: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)
    table_updates: list[tuple[int, int, int]] = field(default_factory=list)  # (table row, index, page) to apply first

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs) if self.is_prefill else len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, stop: Callable[[Sequence], str | None]):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stop = stop
        self.reserve = int(WATERMARK * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))  # table rows, a stack: at most max_num_seqs run at once
        self.num_preemptions = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def check_fits(self, seq: Sequence) -> None:
        """Raise if the request could never run, even alone with every page free."""
        params, bm = seq.params, self.block_manager
        kv_tokens = seq.num_tokens + params.max_tokens - 1  # the last sampled token's K/V is never written
        if bm.blocks_for(kv_tokens) > bm.num_blocks:
            raise ValueError(f"prompt {seq.prompt_index}: {seq.num_tokens} prompt tokens + max_tokens={params.max_tokens} need "
                             f"{bm.blocks_for(kv_tokens)} pages of {bm.block_size} tokens; the cache has {bm.num_blocks} "
                             "(raise num_blocks or lower max_tokens)")
        if seq.num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"prompt {seq.prompt_index}: {seq.num_tokens} tokens exceed max_num_batched_tokens="
                             f"{self.max_num_batched_tokens}, the most one prefill step takes")
        if params.n > self.max_num_seqs:
            raise ValueError(f"prompt {seq.prompt_index}: n={params.n} samples exceed max_num_seqs={self.max_num_seqs}")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def schedule(self) -> Batch:
        batch = self._schedule_prefill() or self._schedule_decode()
        if not batch.seqs:
            raise RuntimeError(f"nothing could be scheduled: {len(self.waiting)} waiting, {self.block_manager.num_free} pages free")
        batch.table_updates = self.block_manager.drain_table_updates()
        return batch

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's pages and its table row."""
        self.block_manager.free(seq)
        self.free_rows.append(seq.table_row)
        seq.table_row = -1

    def _schedule_prefill(self) -> Batch | None:
        bm = self.block_manager
        seqs: list[Sequence] = []
        targets: list[Sequence] = []
        rows: list[int] = []
        tokens, num_rows = 0, len(self.running)
        while self.waiting:
            seq = self.waiting[0]
            reserve = self.reserve if self.running or seqs else 0
            if (num_rows + seq.num_forks > self.max_num_seqs or tokens + seq.num_tokens > self.max_num_batched_tokens
                    or not bm.can_allocate(seq.num_tokens, reserve)):  # fmt: skip
                break
            self.waiting.popleft()
            seq.table_row = self.free_rows.pop()
            bm.allocate(seq)
            seq.status = Status.RUNNING
            group = [seq] + [seq.fork(j) for j in range(1, seq.num_forks)]
            for child in group[1:]:
                child.table_row = self.free_rows.pop()
                bm.share(seq, child)
            seq.num_forks = 1
            targets += group
            rows += [len(seqs)] * len(group)
            self.running.extend(group)
            seqs.append(seq)
            tokens += seq.num_tokens
            num_rows += len(group)
        return Batch(seqs, True, targets, rows) if seqs else None

    def _schedule_decode(self) -> Batch:
        bm = self.block_manager
        scheduled: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        while self.running:
            seq = self.running.popleft()
            while not bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                copy = bm.append_slot(seq)
                if copy is not None:
                    copies.append(copy)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return Batch(scheduled, False, scheduled, list(range(len(scheduled))), copies)

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: Batch, token_ids: list[int]) -> list[Sequence]:
        """Append each target's sampled token; free and return the sequences that finished."""
        finished = []
        for seq, token in zip(batch.targets, token_ids, strict=True):
            seq.token_ids.append(token)
            reason = self.stop(seq)
            if reason is not None:
                seq.finish_reason = reason
                seq.status = Status.FINISHED
                self._release(seq)
                finished.append(seq)
        if finished:  # one pass over the running queue, not a scan per finished sequence
            self.running = deque(s for s in self.running if s.status is not Status.FINISHED)
        return finished

    def abort_all(self) -> None:
        """Drop every request and free its pages (after an error mid-generation)."""
        for seq in self.running:
            self._release(seq)
        self.running.clear()
        self.waiting.clear()
        self.block_manager.drain_table_updates()

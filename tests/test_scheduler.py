"""Continuous batching against a simulated paged KV cache (pure Python).

The fake model stores every token it is fed into the pages the batch names, reads each
sequence's whole context back through its block table (so a page that was shared when it should
have been copied, freed while in use, or written in the wrong slot shows up as a wrong context),
and picks the next token as a function of that context and the sample index. Every schedule,
whatever the cache size and however often it preempts, must then produce exactly the tokens of
running each sample alone.
"""

import pytest

from limo.eval.sampler.block_manager import BlockManager
from limo.eval.sampler.scheduler import Scheduler
from limo.eval.sampler.sequence import SamplingParams, Sequence, Status
from limo.eval.sampler.stopping import StopChecker

VOCAB, EOS = 50, 0


def next_token(context: list[int], sample_index: int) -> int:
    h = sample_index + 7
    for t in context:
        h = (h * 1_000_003 + t) % 2**61
    return h % VOCAB


def expected(prompt, params, sample_index):
    tokens = list(prompt)
    while True:
        tokens.append(next_token(tokens, sample_index))
        generated = len(tokens) - len(prompt)
        if (tokens[-1] == EOS and not params.ignore_eos) or generated >= params.max_tokens:
            return tokens[len(prompt) :]


class FakeRunner:
    """Reads and writes pages through its own block tables, kept only from the batches' logged
    updates (as the real runner's device tables are), never from the sequences' lists."""

    def __init__(self, bm: BlockManager, max_num_seqs: int):
        self.bs = bm.block_size
        self.pages = [[None] * bm.block_size for _ in range(bm.num_blocks)]
        self.tables = [dict() for _ in range(max_num_seqs)]

    def _page(self, seq, pos):
        return self.tables[seq.table_row][pos // self.bs]

    def _write(self, seq, pos):
        self.pages[self._page(seq, pos)][pos % self.bs] = seq.token_ids[pos]

    def _read(self, seq):
        return [self.pages[self._page(seq, p)][p % self.bs] for p in range(seq.num_tokens)]

    def run(self, batch):
        for row, index, page in batch.table_updates:
            self.tables[row][index] = page
        rows = [s.table_row for s in batch.targets]
        assert len(set(rows)) == len(rows) and min(rows) >= 0, f"table rows {rows} are not one per running sequence"
        sources = [list(self.pages[src]) for src, _ in batch.copies]  # all reads before any write
        for (_, dst), page in zip(batch.copies, sources):
            self.pages[dst] = page
        contexts = []
        for seq in batch.seqs:
            for pos in range(seq.num_tokens) if batch.is_prefill else [seq.num_tokens - 1]:
                self._write(seq, pos)
        for seq in batch.seqs:
            context = self._read(seq)
            assert context == seq.token_ids, f"{seq} reads a corrupted context"
            contexts.append(context)
        return [next_token(contexts[row], t.sample_index) for t, row in zip(batch.targets, batch.rows)]


def run_all(requests, num_blocks, block_size=4, max_num_seqs=8, max_num_batched_tokens=64):
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens, StopChecker({EOS}))
    runner = FakeRunner(bm, max_num_seqs)
    for i, (prompt, params) in enumerate(requests):
        sched.add(Sequence(prompt, params, seed=0, prompt_index=i))
    done, steps = [], 0
    while not sched.done:
        batch = sched.schedule()
        assert len(sched.running) <= max_num_seqs
        if batch.is_prefill:
            assert len(batch.seqs) == 1 or batch.num_tokens <= max_num_batched_tokens
            assert all(s.num_forks == 1 and s.status == Status.RUNNING for s in batch.targets)
        done += sched.postprocess(batch, runner.run(batch))
        steps += 1
        assert steps < 10_000, "no progress"
    assert bm.all_free()
    got = {(s.prompt_index, s.sample_index): (s.generated, s.finish_reason) for s in done}
    assert len(got) == sum(p.n for _, p in requests)
    return got, sched.num_preemptions


def workload():
    prompts = [[3 + i % 40 for i in range(n)] for n in (5, 12, 1, 9, 16, 3, 7)]
    params = [
        SamplingParams(max_tokens=20, n=3),
        SamplingParams(max_tokens=9),
        SamplingParams(max_tokens=25, n=2, ignore_eos=True),
        SamplingParams(max_tokens=14),
        SamplingParams(max_tokens=4, n=4),
        SamplingParams(max_tokens=30),
        SamplingParams(max_tokens=18, n=2),
    ]
    return list(zip(prompts, params))


@pytest.mark.parametrize("num_blocks,block_size,preempts", [(200, 4, False), (24, 4, True), (13, 4, True), (40, 1, True), (4, 16, True)])
def test_every_schedule_gives_each_sample_its_solo_tokens(num_blocks, block_size, preempts):
    requests = workload()
    got, preemptions = run_all(requests, num_blocks, block_size)
    for i, (prompt, params) in enumerate(requests):
        for j in range(params.n):
            tokens, reason = got[(i, j)]
            assert tokens == expected(prompt, params, j), (i, j)
            assert reason == ("stop" if tokens[-1] == EOS and not params.ignore_eos else "length")
    assert (preemptions > 0) == preempts, preemptions  # an ample cache never preempts; tight ones must


def test_samples_of_one_prompt_differ_and_share_one_prefill():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 8, 64, StopChecker({EOS}))
    sched.add(Sequence([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=5, n=3), seed=0, prompt_index=0))
    batch = sched.schedule()
    assert batch.is_prefill and len(batch.seqs) == 1 and batch.rows == [0, 0, 0]
    assert [t.sample_index for t in batch.targets] == [0, 1, 2]
    assert all(t.block_table == batch.seqs[0].block_table for t in batch.targets)
    assert bm.num_free == 62 and all(bm.ref_counts[b] == 3 for b in batch.seqs[0].block_table)
    sched.postprocess(batch, [7, 8, 9])
    decode = sched.schedule()
    assert not decode.is_prefill and len(decode.copies) == 2  # two private copies of the shared partial page


def test_a_request_that_can_never_fit_is_an_error():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=2, max_num_batched_tokens=12, stop=StopChecker({EOS}))
    with pytest.raises(ValueError, match="need 5 pages of 4 tokens; the cache has 4"):
        sched.add(Sequence([1] * 10, SamplingParams(max_tokens=8), seed=0, prompt_index=0))
    with pytest.raises(ValueError, match="exceed max_num_batched_tokens=12"):
        sched.add(Sequence([1] * 13, SamplingParams(max_tokens=1), seed=0, prompt_index=1))
    with pytest.raises(ValueError, match="n=3 samples exceed max_num_seqs=2"):
        sched.add(Sequence([1], SamplingParams(max_tokens=1, n=3), seed=0, prompt_index=2))
    sched.add(Sequence([1] * 10, SamplingParams(max_tokens=7), seed=0, prompt_index=3))  # exactly 16 K/V slots: fits
    assert len(sched.waiting) == 1


def test_largest_request_alone_fills_the_whole_cache():
    requests = [([5] * 10, SamplingParams(max_tokens=7, ignore_eos=True)), ([6] * 3, SamplingParams(max_tokens=14, ignore_eos=True, n=2))]
    got, _ = run_all(requests, num_blocks=4, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    assert got[(0, 0)][0] == expected(*requests[0], 0) and got[(1, 1)][0] == expected(*requests[1], 1)


def test_abort_frees_everything():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, 8, 64, StopChecker({EOS}))
    for i in range(3):
        sched.add(Sequence([1] * 9, SamplingParams(max_tokens=50, n=2), seed=0, prompt_index=i))
    sched.postprocess(sched.schedule(), [1] * 6)
    assert bm.num_free < 16
    sched.abort_all()
    assert bm.all_free() and sched.done

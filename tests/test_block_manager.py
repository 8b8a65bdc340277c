"""KV page bookkeeping: free list, reference counts, prefix sharing and copy-on-write (pure Python)."""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from limo.eval.sampler.block_manager import BlockManager


class Seq:
    """The attributes the block manager reads."""

    def __init__(self, num_tokens, table_row=-1):
        self.block_table = []
        self.tokens = num_tokens
        self.table_row = table_row

    @property
    def num_tokens(self):
        return self.tokens


def test_runs_without_torch():
    path = Path(__file__).resolve().parents[1] / "limo" / "eval" / "sampler" / "block_manager.py"
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        f"spec = importlib.util.spec_from_file_location('bm', {str(path)!r})\n"
        "bm = importlib.util.module_from_spec(spec); spec.loader.exec_module(bm)\n"
        "m = bm.BlockManager(4, 2)\n"
        "print(m.num_free)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"


def test_allocate_append_free_round_trip():
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = Seq(9)  # 3 pages, the last holding one token
    assert bm.can_allocate(9) and not bm.can_allocate(9, reserve=3)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and bm.num_free == 2
    seq.tokens = 10  # the sampled token's slot (index 9) is in page 2: nothing new
    assert bm.append_slot(seq) is None and len(seq.block_table) == 3
    seq.tokens = 13  # slot 12 opens page 3
    assert bm.append_slot(seq) is None and len(seq.block_table) == 4 and bm.num_free == 1
    bm.free(seq)
    assert bm.all_free() and seq.block_table == []


def test_forks_share_pages_and_copy_the_partial_one_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    head = Seq(6)  # pages [full, 2 of 4 used]
    bm.allocate(head)
    kids = [Seq(6) for _ in range(2)]
    for kid in kids:
        bm.share(head, kid)
    assert [bm.ref_counts[b] for b in head.block_table] == [3, 3]
    for s in [head, *kids]:
        s.tokens = 7  # each sampled its first token; the next step writes slot 6, in the shared page 1
    copies = [bm.append_slot(s) for s in [head, *kids]]
    shared = head.block_table[1] if copies[0] is None else copies[0][0]
    # two of the three get private copies of the shared page; the last one left writes in place
    assert copies[2] is None and copies[0][0] == copies[1][0] == shared
    assert kids[1].block_table[1] == shared and len({head.block_table[1], kids[0].block_table[1], shared}) == 3
    assert bm.ref_counts[head.block_table[0]] == 3 and bm.ref_counts[shared] == 1  # the full page stays shared
    for s in [head, *kids]:
        bm.free(s)
    assert bm.all_free()


def test_fork_at_a_page_boundary_opens_new_pages_without_copies():
    bm = BlockManager(num_blocks=6, block_size=4)
    head = Seq(8)
    bm.allocate(head)
    kid = Seq(8)
    bm.share(head, kid)
    head.tokens = kid.tokens = 9
    assert bm.append_slot(head) is None and bm.append_slot(kid) is None
    assert head.block_table[:2] == kid.block_table[:2] and head.block_table[2] != kid.block_table[2]
    bm.free(head)
    bm.free(kid)
    assert bm.all_free()


def test_can_append_when_pages_run_out():
    bm = BlockManager(num_blocks=2, block_size=2)
    a, b = Seq(2), Seq(2)
    bm.allocate(a)
    bm.allocate(b)
    a.tokens = 3
    assert not bm.can_append(a)  # needs page 2 of a, none free
    bm.free(b)
    assert bm.can_append(a) and bm.append_slot(a) is None and bm.num_free == 0
    with pytest.raises(RuntimeError, match="needs 1 pages, 0 free"):
        bm.allocate(Seq(1))


def test_invalid_sizes_are_errors():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 16)


def test_random_workload_keeps_counts_consistent():
    """Random allocate / fork / grow / free: reference counts always equal the tables' uses."""
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=3)
    live = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.2 and bm.can_allocate(n := rng.randint(1, 10)):
            s = Seq(n)
            bm.allocate(s)
            live.append(s)
        elif op < 0.35 and live:
            parent = rng.choice(live)
            kid = Seq(parent.tokens)
            bm.share(parent, kid)
            live.append(kid)
        elif op < 0.8 and live:
            s = rng.choice(live)
            s.tokens += 1
            if bm.can_append(s):
                bm.append_slot(s)
            else:
                s.tokens -= 1
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        uses = [0] * bm.num_blocks
        for s in live:
            assert len(s.block_table) == bm.blocks_for(s.tokens - 1) or len(s.block_table) == bm.blocks_for(s.tokens)
            for block in s.block_table:
                uses[block] += 1
        assert uses == bm.ref_counts
        assert sorted(bm.free_blocks) == [i for i, u in enumerate(uses) if u == 0]
    for s in live:
        bm.free(s)
    assert bm.all_free()


def test_the_logged_updates_rebuild_every_table():
    """Replaying the (row, index, page) log into fresh tables gives every sequence's block table,
    through allocation, forks, new pages and copy-on-write."""
    bm = BlockManager(num_blocks=32, block_size=4)
    parent, tables = Seq(6, table_row=2), {}
    bm.allocate(parent)
    children = [Seq(6, table_row=r) for r in (0, 5)]
    for child in children:
        bm.share(parent, child)
    for seq in (parent, *children):
        for _ in range(7):
            seq.tokens += 1
            bm.append_slot(seq)
    for row, index, page in bm.drain_table_updates():
        tables.setdefault(row, {})[index] = page
    for seq in (parent, *children):
        assert [tables[seq.table_row][i] for i in range(len(seq.block_table))] == seq.block_table
    assert bm.drain_table_updates() == []
    unlogged = Seq(3)  # no table row: nothing logged
    bm.allocate(unlogged)
    assert bm.table_updates == []

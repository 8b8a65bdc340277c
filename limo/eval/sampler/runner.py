"""The model side of a step: packed prefill and paged decode over one KV cache, then sampling.

The cache is one tensor [2 (K, V), layers, num_blocks, block_size, Hkv, D]. The model calls
`ctx.attention(layer, q, k, v)` and does not know which of the two contexts below answers:
prefill stores every new token's K/V into its page and attends causally within each packed
prompt (no prompt has cached tokens: forks share a prefill, preempted sequences recompute);
decode stores the one new token's K/V, then attends over the sequence's pages.

On CUDA, decode runs as CUDA graphs, one per batch-size bucket, over static input buffers: a
batch is padded up to its bucket with rows whose slot is -1 (nothing stored) and context length
0 (zero output), and the attention's split plan is fixed by planning for max_model_len. The one
host sync of a step is reading the sampled ids.

The host's work per decode step is kept to a few list comprehensions over the batch and a few
tensor ops, whatever the context: the block tables live on the device, one row per running
sequence, and each step applies only the entries the block manager logged since the last one (a
new page every block_size tokens, a copy-on-write); slots and positions are computed there from
the context lengths; the per-sequence sampling settings are rebuilt only when the batch's
sequences change, and the noise keys are hashed as one tensor. Rebuilding B x pages table
entries from Python lists cost O(context) per step: ~30 ms at batch 256 and 32k tokens, more
than a 32B model's decode step on an H100.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from limo import kernels
from limo.eval.sampler.sampling import Sampler, noise_keys
from limo.eval.sampler.scheduler import Batch
from limo.eval.sampler.sequence import Sequence
from limo.kernels.paged_attention import paged_attention, split_plan, store_kv
from limo.model.qwen2 import Qwen2

log = logging.getLogger(__name__)

CPU_KV_CACHE_GIB = 4.0  # a CPU's default KV budget (vLLM's CPU backend: VLLM_CPU_KVCACHE_SPACE=4)


@dataclass
class PrefillContext:
    kv_cache: torch.Tensor  # [2, L, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor  # [T] int32
    cu_seqlens: torch.Tensor  # [n+1] int32
    max_seqlen: int

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        store_kv(k, v, self.kv_cache[0, layer], self.kv_cache[1, layer], self.slot_mapping)
        return kernels.varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen)


@dataclass
class DecodeContext:
    kv_cache: torch.Tensor  # [2, L, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor  # [B] int32, -1 for padding rows
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, 0 for padding rows
    max_context_len: int
    num_splits: int | None = None

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache[0, layer], self.kv_cache[1, layer]
        store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.max_context_len, num_splits=self.num_splits)


@dataclass
class StepInputs:
    """One step as host lists: all that a tensor-parallel worker needs to run it (rank 0 builds
    it from the scheduler's Batch and broadcasts it; the workers hold no sequences)."""

    table_updates: list[tuple[int, int, int]]
    copies: list[tuple[int, int]]
    prefill: bool
    ids: list[int]
    positions: list[int] | None = None  # prefill
    slots: list[int] | None = None  # prefill
    cu: list[int] | None = None  # prefill
    logit_rows: list[int] | None = None  # prefill: forks of one prompt share its row
    lens: list[int] | None = None  # decode
    rows: list[int] | None = None  # decode: each sequence's block-table row


def graph_buckets(max_num_seqs: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16)) | {max_num_seqs})


class ModelRunner:
    def __init__(
        self,
        model: Qwen2,
        *,
        block_size: int,
        num_blocks: int | None,
        max_num_seqs: int,
        max_model_len: int,
        max_num_batched_tokens: int,
        memory_fraction: float = 0.9,
        kv_cache_gib: float | None = None,
        cuda_graphs: bool = True,
        control_group: "torch.distributed.ProcessGroup | None" = None,
        broadcast: "Callable[[StepInputs], None] | None" = None,
    ):
        self.model = model
        self.broadcast = broadcast  # tensor parallelism, rank 0: sends each step to the workers before running it
        args = model.args
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.sampler = Sampler(args.vocab_size, self.device)
        page_bytes = 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * self.dtype.itemsize
        if num_blocks is None:
            num_blocks = self._plan_blocks(page_bytes, max_num_batched_tokens, memory_fraction, kv_cache_gib)
            if control_group is not None:  # tensor parallelism: one block manager for all ranks, the smallest budget wins
                agreed = torch.tensor([num_blocks])
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=control_group)
                num_blocks = int(agreed)
        self.num_blocks = num_blocks
        # Uninitialised: a slot is written before it is read (the attention masks everything past a
        # sequence's context, whatever it holds), and on a CPU untouched pages then cost no RAM.
        self.kv_cache = torch.empty(2, args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim,
                                    dtype=self.dtype, device=self.device)  # fmt: skip
        # One row per running sequence (Sequence.table_row), kept in step by the logged updates.
        self.block_tables = torch.zeros(max_num_seqs, self.max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self._sampling_ids: list[int] | None = None  # the targets (seq_id) whose settings `_sampling` holds
        self._sampling: dict = {}
        log.info("KV cache: %d pages of %d tokens (%.2f GiB)", num_blocks, block_size, num_blocks * page_bytes / 2**30)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if cuda_graphs and self.device.type == "cuda":
            if kernels.backend("cuda") == "triton":
                self._capture_graphs()
            else:  # the torch references index with boolean masks, a host sync that capture forbids
                log.info("decode runs without CUDA graphs: they need the Triton kernels (kernels on cuda: torch)")
        self.buckets = sorted(self.graphs)

    # -- memory ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _plan_blocks(self, page_bytes: int, max_num_batched_tokens: int, fraction: float, budget_gib: float | None) -> int:
        """Pages that fit the budget: `budget_gib` when given; else, on CUDA, `fraction` of the
        memory left after the weights and a worst-case step; on a CPU, CPU_KV_CACHE_GIB.

        On CUDA the worst step is measured: a full prefill and a full sampling pass, then the
        peak allocation above the weights is kept free. A CPU's RAM is shared with everything
        else on the host, so it gets an explicit, modest budget instead of whatever is free.
        Never more than max_num_seqs full-length sequences can use.
        """
        most = self.max_num_seqs * self.max_blocks_per_seq
        if budget_gib is not None:
            budget = budget_gib * 2**30
        elif self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            T = max_num_batched_tokens
            lens = [min(self.max_model_len, T - i) for i in range(0, T, self.max_model_len)]
            cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=self.device)
            hidden = self.model(torch.zeros(T, dtype=torch.long, device=self.device), cu_seqlens=cu, max_seqlen=max(lens))
            rows = min(self.max_num_seqs, T)
            logits = self.model.logits(hidden[:rows])
            del hidden
            ones = torch.ones(rows, device=self.device)
            self.sampler(logits, ones, ones * 0.5, torch.zeros(rows, dtype=torch.long, device=self.device),
                         torch.zeros(rows, dtype=torch.long, device=self.device), all_greedy=False, filtered=True)  # fmt: skip
            del logits
            peak = torch.cuda.max_memory_allocated(self.device) - base
            torch.cuda.empty_cache()  # so that `total - free` below counts the weights, not the cached peak
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * fraction - (total - free) - peak
        else:
            budget = CPU_KV_CACHE_GIB * 2**30
        num_blocks = min(int(budget // page_bytes), most)
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB, a page is {page_bytes} bytes): "
                               "lower max_num_batched_tokens, or raise memory_fraction (GPU) or kv_cache_gib")
        return num_blocks

    # -- inputs -----------------------------------------------------------------------------------

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list on the device; pinned and asynchronous on CUDA."""
        t = torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def apply_table_updates(self, updates: list[tuple[int, int, int]]) -> None:
        """Write the logged (row, index, page) entries into the device's block tables, in one op."""
        if updates:
            rows, cols, pages = self._tensor(updates, torch.long).T  # [3, K]
            self.block_tables[rows, cols] = pages.int()  # later entries for a slot win, as logged

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: every src page (all layers, K and V) into its dst, all reads before any write."""
        src = self._tensor([s for s, _ in copies], torch.long)
        dst = self._tensor([d for _, d in copies], torch.long)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    # -- steps ------------------------------------------------------------------------------------

    def step_inputs(self, batch: Batch) -> StepInputs:
        """The host lists of one scheduled step (what `execute` needs, and no Sequence)."""
        seqs = batch.seqs
        if not batch.is_prefill:
            return StepInputs(batch.table_updates, batch.copies, False, [s.token_ids[-1] for s in seqs],
                              lens=[s.num_tokens for s in seqs], rows=[s.table_row for s in seqs])  # fmt: skip
        cu = [0]
        for s in seqs:
            cu.append(cu[-1] + s.num_tokens)
        return StepInputs(
            batch.table_updates, batch.copies, True, [t for s in seqs for t in s.token_ids],
            positions=[p for s in seqs for p in range(s.num_tokens)], slots=[self._slot(s, p) for s in seqs for p in range(s.num_tokens)],
            cu=cu, logit_rows=None if batch.rows == list(range(len(seqs))) else batch.rows,
        )  # fmt: skip

    def execute(self, step: StepInputs) -> torch.Tensor:
        """Run one step on this rank's model and cache; the logits [targets, V] (every rank)."""
        self.apply_table_updates(step.table_updates)
        if step.copies:
            self.copy_blocks(step.copies)
        if not step.prefill:
            return self.decode(step.ids, step.lens, step.rows)
        logits = self.prefill(step.ids, step.positions, step.slots, step.cu)
        return logits if step.logit_rows is None else logits[self._tensor(step.logit_rows, torch.long)]

    @torch.no_grad()
    def prefill(self, ids: list[int], positions: list[int], slots: list[int], cu: list[int]) -> torch.Tensor:
        """Packed forward of every prompt, K/V written into pages; logits of each prompt's last token [n, V]."""
        max_seqlen = max(b - a for a, b in zip(cu, cu[1:]))
        ctx = PrefillContext(self.kv_cache, self._tensor(slots, torch.int32), self._tensor(cu, torch.int32), max_seqlen)
        hidden = self.model(self._tensor(ids, torch.long), self._tensor(positions, torch.long), ctx=ctx)  # [T, H]
        last = self._tensor([c - 1 for c in cu[1:]], torch.long)
        return self.model.logits(hidden[last])  # [n, V]

    @torch.no_grad()
    def decode(self, last_ids: list[int], lens: list[int], table_rows: list[int]) -> torch.Tensor:
        """One token per sequence (its last id, its length, its block-table row) over its pages; logits [B, V]."""
        B = len(lens)
        bucket = next((b for b in self.buckets if b >= B), None)
        host = self._tensor([last_ids, lens, table_rows], torch.long)  # [3, B]
        ids, context_lens, rows = host
        positions = context_lens - 1  # the new token's position, and the slot its K/V goes to
        width = -(-max(lens) // self.block_size)
        tables = self.block_tables[rows, :width]  # [B, width]
        pages = tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        slots = pages * self.block_size + positions % self.block_size
        if bucket is None:
            ctx = DecodeContext(self.kv_cache, slots.int(), tables, context_lens.int(), max(lens))
            return self.model.logits(self.model(ids, positions, ctx=ctx))
        s = self.static
        s["ids"][:B].copy_(ids)
        s["positions"][:B].copy_(positions)
        s["slots"][:B].copy_(slots)
        s["context_lens"][:B].copy_(context_lens)
        s["tables"][:B, :width].copy_(tables)  # entries past a context are never read
        s["slots"][B:bucket].fill_(-1)  # padding rows: nothing stored, empty context, zero output
        s["context_lens"][B:bucket].zero_()
        self.graphs[bucket].replay()
        return s["logits"][:B]

    @torch.no_grad()
    def _capture_graphs(self) -> None:
        """One CUDA graph per bucket, largest first, sharing one memory pool; inputs are static buffers."""
        n, V = self.max_num_seqs, self.model.args.vocab_size
        dev = self.device
        self.static = s = {
            "ids": torch.zeros(n, dtype=torch.long, device=dev),
            "positions": torch.zeros(n, dtype=torch.long, device=dev),
            "slots": torch.full((n,), -1, dtype=torch.int32, device=dev),
            "context_lens": torch.zeros(n, dtype=torch.int32, device=dev),
            "tables": torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "logits": torch.zeros(n, V, dtype=self.dtype, device=dev),
        }
        pool = None
        for b in reversed(graph_buckets(n)):
            splits, _ = split_plan(b, self.model.args.num_kv_heads, self.max_model_len, dev)
            ctx = DecodeContext(self.kv_cache, s["slots"][:b], s["tables"][:b], s["context_lens"][:b], self.max_model_len, splits)

            def step(b=b, ctx=ctx):
                s["logits"][:b] = self.model.logits(self.model(s["ids"][:b], s["positions"][:b], ctx=ctx))

            step()  # warm-up: compiles the Triton kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                step()
            if pool is None:
                pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(dev)
        log.info("captured decode CUDA graphs for batch sizes %s", sorted(self.graphs))

    # -- one step ---------------------------------------------------------------------------------

    def sampling_inputs(self, targets: list[Sequence]) -> dict:
        """The sampler's per-row inputs. The settings (temperature, top-p, top-k, seeds) are
        rebuilt only when the targets change; the noise keys follow each target's position."""
        ids = [t.seq_id for t in targets]  # sequence identities: a table row changes owners
        if ids != self._sampling_ids:
            params = [t.params for t in targets]
            self._sampling = dict(
                temperature=self._tensor([p.temperature for p in params], torch.float32),
                top_p=self._tensor([p.top_p for p in params], torch.float32),
                top_k=self._tensor([p.top_k for p in params], torch.long),
                seeds=self._tensor([[t.seed_hi for t in targets], [t.seed_lo for t in targets], [t.sample_index for t in targets]],
                                   torch.long),
                all_greedy=all(p.greedy for p in params),
                filtered=any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params),
            )  # fmt: skip
            self._sampling_ids = ids
        settings = dict(self._sampling)
        seeds = settings.pop("seeds")
        if settings["all_greedy"]:  # greedy rows need no noise
            return {**settings, "keys": seeds[0]}
        positions = self._tensor([t.num_tokens for t in targets], torch.long)
        return {**settings, "keys": noise_keys(seeds[0], seeds[1], seeds[2], positions)}

    def run(self, batch: Batch) -> list[int]:
        """Execute one scheduled step; the sampled token of each target, in order."""
        step = self.step_inputs(batch)
        if self.broadcast is not None:
            self.broadcast(step)
        logits = self.execute(step)
        ids = self.sampler(logits, **self.sampling_inputs(batch.targets))
        return ids.tolist()  # host sync: the step's one read, of the sampled ids

"""A packed micro-batch split over the ranks of a context-parallel group (`parallel.cp`).

Causal attention costs a token in proportion to how far into its document it sits, so cutting
the stream into cp contiguous pieces would leave the last rank most of the work. As in Llama 3's
all-gather context parallelism, every document is cut into 2 x cp equal chunks (padded at its end
to a multiple of 2 x cp with unsupervised tokens) and rank r takes chunk r and chunk 2cp - 1 - r:
a front chunk and the matching back chunk, the same work on every rank. Each rank then holds the
same number of tokens, which the all-gather of K and V needs.

Attention on rank r (limo/engine/context.py): its tokens' K and V are all-gathered over the group
(in rank order, each rank's tokens in its local order); `gather_index` picks, for each of the
rank's chunks, its document's keys from the document's start to the chunk's end, so segment i is
the chunk's queries against that prefix (bottom-right causal). No key crosses a document boundary,
and position ids stay each document's own. Pads come after every real token of their document,
so no real token sees one, and they carry no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from limo.data.packing import MicroBatch

IGNORE = -100


@dataclass
class ContextShard:
    """One rank's share of a micro-batch, and what its attention needs to see the rest."""

    input_ids: torch.Tensor  # [T_local] int64
    labels: torch.Tensor  # [T_local] int64, -100 on pads
    position_ids: torch.Tensor  # [T_local] int64, each document's own positions
    gather_index: torch.Tensor  # [T_keys] int64 into the group's gathered [cp * T_local] K/V
    cu_q: torch.Tensor  # [2 * docs + 1] int32: the rank's chunks
    cu_k: torch.Tensor  # [2 * docs + 1] int32: each chunk's key prefix within gather_index
    max_q: int
    max_k: int
    num_label_tokens: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> ContextShard:
        moved = {k: getattr(self, k).to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids", "gather_index", "cu_q", "cu_k")}
        return ContextShard(**moved, max_q=self.max_q, max_k=self.max_k, num_label_tokens=self.num_label_tokens)


def shard_for_cp(mb: MicroBatch, cp: int, rank: int) -> ContextShard:
    """Rank `rank`'s share of `mb` in a context-parallel group of `cp` (see the module docstring)."""
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} outside a group of {cp}")
    bounds = mb.cu_seqlens.tolist()
    docs = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    parts = 2 * cp
    ids, labels, positions, padded_starts, chunk = [], [], [], [], []
    offset = 0
    for a, b in docs:
        n = b - a
        c = -(-n // parts)  # chunk length; the document padded to parts * c tokens
        pad = parts * c - n
        ids.append(torch.cat([mb.input_ids[a:b], mb.input_ids.new_zeros(pad)]))
        labels.append(torch.cat([mb.labels[a:b], mb.labels.new_full((pad,), IGNORE)]))
        positions.append(torch.arange(parts * c, dtype=mb.position_ids.dtype))
        padded_starts.append(offset)
        chunk.append(c)
        offset += parts * c
    ids_p, labels_p, pos_p = torch.cat(ids), torch.cat(labels), torch.cat(positions)

    def local_indices(r: int) -> torch.Tensor:
        return torch.cat([torch.arange(s + j * c, s + (j + 1) * c) for s, c in zip(padded_starts, chunk) for j in (r, parts - 1 - r)])

    order = torch.cat([local_indices(r) for r in range(cp)])  # gathered position -> padded index
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())  # padded index -> gathered position
    mine = local_indices(rank)
    keys, cu_q, cu_k = [], [0], [0]
    for s, c in zip(padded_starts, chunk):
        for j in (rank, parts - 1 - rank):
            keys.append(where[s:s + (j + 1) * c])  # the document's keys up to this chunk's end
            cu_q.append(cu_q[-1] + c)
            cu_k.append(cu_k[-1] + (j + 1) * c)
    local_labels = labels_p[mine]
    return ContextShard(
        input_ids=ids_p[mine], labels=local_labels, position_ids=pos_p[mine], gather_index=torch.cat(keys),
        cu_q=torch.tensor(cu_q, dtype=torch.int32), cu_k=torch.tensor(cu_k, dtype=torch.int32),
        max_q=max(chunk), max_k=max(parts * c for c in chunk), num_label_tokens=int((local_labels != IGNORE).sum()),
    )  # fmt: skip

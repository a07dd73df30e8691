"""Turns one scheduled step into one forward pass: pack, prepare the KV store, run, pick logits.

Packing, not padding: the new tokens of all scheduled sequences are concatenated into one row
of N tokens (a decode adds 1, a prefill chunk its length), each with its own position. Three
prompts of 5, 300 and 40 tokens cost 345 token-rows of every matmul, where a padded [3, 300]
batch would cost 900. Only attention needs to know where one sequence ends: the KV store does
that per sequence from the ``PackedBatch``.
"""
from __future__ import annotations

import torch

from .kv_pool import PackedBatch
from .scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model, kv):
        self.model, self.kv = model, kv

    def build(self, chunks: list[ScheduledChunk]):
        """-> (input_ids [N], positions [N], PackedBatch, logits_index [M]) on the device."""
        ids, pos, q_lens, ctx_lens, cu_q, last = [], [], [], [], [0], []
        for c in chunks:
            s, n = c.seq, c.num_tokens
            ids += s.token_ids(s.num_computed, s.num_computed + n)
            pos += range(s.num_computed, s.num_computed + n)
            q_lens.append(n)
            ctx_lens.append(s.num_computed)
            cu_q.append(cu_q[-1] + n)
            if c.samples:
                last.append(cu_q[-1] - 1)       # the sequence's last token: its next logits
        dev = self.model.device
        positions = torch.tensor(pos, device=dev)
        batch = PackedBatch([c.seq.seq_id for c in chunks], q_lens, ctx_lens, cu_q, positions)
        return (torch.tensor(ids, device=dev), positions, batch,
                torch.tensor(last, dtype=torch.long, device=dev))

    @torch.no_grad()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run the step; -> logits [M, V] of the chunks that sample, in ``chunks`` order."""
        ids, positions, batch, last = self.build(chunks)
        self.kv.prepare(batch)
        logits = self.model.forward_packed(ids, positions, self.kv, batch, last)
        self.kv.mark_computed(batch)     # written now: a paged store may share these blocks
        return logits

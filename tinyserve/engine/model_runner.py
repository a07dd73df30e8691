"""Turns one ``SchedulerOutput`` into one forward pass and one sampled token per sequence.

The runner owns the KV cache tensors (allocated once, in its attention backend's layout) and
the backend, chosen once: ``PagedBackend`` for a ``KVCacheManager``, ``SlotBackend`` for slots.

Packing, not padding: the new tokens of all scheduled sequences are concatenated into one row
of N tokens (a decode adds 1, a prefill chunk its length), each with its own position. Three
prompts of 5, 300 and 40 tokens cost 345 token-rows of every matmul, where a padded [3, 300]
batch would cost 900. Only attention needs to know where one sequence ends: the backend's
``AttentionMetadata`` says so, built once per step and read by every layer.

Faults stay where they arise. The runner never raises: a forward that fails comes back as
``ModelRunnerOutput.error`` (the scheduler then ends that step's sequences and keeps the rest);
a sequence whose sampling raises (a logits processor, a parameter that slipped past
validation) gets its own error while every other one keeps exactly the token it would have
drawn alone (seeded generators are rewound before the rows are retried one by one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..attention import PagedBackend, SlotBackend
from ..errors import InvalidParameter
from ..kv_cache import KVCache
from ..sampling import sample
from .scheduler import SchedulerOutput


@dataclass
class ModelRunnerOutput:
    token_ids: list[int] = field(default_factory=list)     # per SchedulerOutput.sampled
    errors: list[str | None] = field(default_factory=list)  # per sampled: why sampling failed
    error: str | None = None            # the forward itself failed: nothing of the step holds


def device_memory(dev: torch.device) -> int:
    """Bytes the device has: free memory on a GPU, physical memory on the host."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_kv_fits(config, num_blocks: int | None, model) -> None:
    """Refuse a KV cache larger than the device before anything is allocated (an allocator
    failure names no option; a huge request on the host could swap the machine to a halt)."""
    slots = config.kv == "slots"
    tokens = config.max_num_seqs * config.max_model_len if slots else num_blocks * config.block_size
    nbytes = tokens * model.config.kv_bytes_per_token(model.dtype.itemsize)
    dev = model.device
    option = "max_num_seqs x max_model_len" if slots else "kv_cache_tokens"
    have = device_memory(dev)
    if nbytes > have:
        raise InvalidParameter(f"the KV cache asked for by {option} needs {nbytes / 2**30:,.1f} "
                               f"GiB, more than the {have / 2**30:,.1f} GiB this {dev.type} "
                               f"device has: ask for fewer tokens")


class ModelRunner:
    """``config``: the engine's resolved ``EngineConfig``; ``num_blocks`` sizes a paged cache."""

    def __init__(self, model, config, num_blocks: int | None = None):
        self.model = model
        c, dt, dev = model.config, model.dtype, model.device
        if config.kv == "slots":
            self.attn = SlotBackend(model.backend)
            self.kv_caches = KVCache(c, config.max_num_seqs, config.max_model_len, dt, dev).layers
        else:
            self.attn = PagedBackend(config.block_size, model.backend)
            self.kv_caches = self.attn.allocate(c, num_blocks, dt, dev)

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.kv_caches for t in kv)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        try:
            logits = self._forward(sched)
        except Exception as e:
            return ModelRunnerOutput(error=f"model step failed: {type(e).__name__}: {e}")
        if len(sched.sample_rows) > len(logits):
            logits = logits[sched.sample_rows]          # forks: one row per sample
        if not sched.sampled:
            return ModelRunnerOutput([], [])
        tokens, errors = _sample(logits, sched.sampled)
        # NaN/inf logits would be sampled silently (greedy argmax) or fail with torch's
        # "probability tensor contains inf/nan": fail those requests alone, saying why. The
        # sum is non-finite if any logit is (~10 us per step for SmolLM2's [1, 49152] on the
        # development CPU; the per-row test, ~140 us, runs only then: a sum that merely
        # overflows finds no bad row).
        if not bool(torch.isfinite(logits.sum())):
            for i in (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist():
                tokens[i], errors[i] = -1, NON_FINITE
        return ModelRunnerOutput(tokens, errors)

    @torch.no_grad()
    def _forward(self, sched: SchedulerOutput) -> torch.Tensor:
        """-> logits [M, V] of the chunks that sample, in chunk order."""
        ids, pos, ctx, q_lens, last = [], [], [], [], []
        for c in sched.chunks:
            s, n, start = c.seq, c.num_tokens, c.seq.num_computed
            ids += s.token_ids(start, start + n)
            pos += range(start, start + n)
            ctx.append(start)
            q_lens.append(n)
            if c.samples:
                last.append(len(ids) - 1)       # the sequence's last token: its next logits
        dev = self.model.device
        positions = torch.tensor(pos, device=dev)
        self.attn.copy(self.kv_caches, sched.kv_copies)
        meta = self.attn.build(sched.block_tables, ctx, q_lens, positions)
        return self.model(torch.tensor(ids, device=dev)[None], positions[None], self.kv_caches,
                          meta, torch.tensor(last, dtype=torch.long, device=dev))


NON_FINITE = ("the model produced non-finite logits (NaN or inf): the weights are likely "
              "damaged (a NaN or out-of-range value in the file), or the activations overflow "
              "in this dtype (try dtype='float32')")


def _sample(logits, seqs) -> tuple[list[int], list[str | None]]:
    """One token per sequence, and per sequence the message if its sampling raised. The batch
    is tried whole first; if it raises, seeded generators are rewound and each row is retried
    alone, so one bad row cannot change its neighbours' tokens."""
    params, gens = [s.params for s in seqs], [s.generator for s in seqs]
    outs = [s.out for s in seqs]
    states = [None if g is None else g.get_state() for g in gens]
    try:
        return sample(logits, params, gens, outs).tolist(), [None] * len(seqs)
    except Exception:
        for g, st in zip(gens, states):
            if g is not None:
                g.set_state(st)
    tokens, errors = [], []
    for i in range(len(seqs)):
        try:
            tokens.append(int(sample(logits[i:i + 1], params[i:i + 1], gens[i:i + 1],
                                     outs[i:i + 1])[0]))
            errors.append(None)
        except Exception as e:
            tokens.append(-1)
            errors.append(f"sampling failed: {type(e).__name__}: {e}")
    return tokens, errors

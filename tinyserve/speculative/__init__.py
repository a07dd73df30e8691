"""Speculative decoding: a cheap draft proposes k tokens, the target verifies them in one
forward pass, and an exact accept/reject rule keeps the target's output distribution.

    from tinyserve.speculative import generate_speculative, PromptLookupDraft, load_head_draft
    out = generate_speculative(model, PromptLookupDraft(), prompt_ids, k=8)
    out.tokens, out.stats.alpha, out.stats.tokens_per_step

Modules: ``core`` (the rule, the loop, bookkeeping), ``drafts`` (the Draft interface, prompt
lookup, model drafts: early exit, quantized copy), ``head`` (the EAGLE-style trained head and
its files), ``features`` and ``train`` (``python -m tinyserve.speculative train-head``: the
cached data, then the training loop and its evaluation).
"""
from .core import (Round, SpecOutput, SpecStats, SpeculativeDecoder, acceptance_probability,
                   expected_tokens_per_step, generate_speculative, residual_distribution,
                   verify_greedy, verify_sampled)
from .drafts import (Draft, ModelDraft, NoDraft, PromptLookupDraft, draw, early_exit_draft,
                     early_exit_view, quantized_draft)
from .head import (DEFAULT_HEAD, DraftHead, HeadDraft, head_config, load_head, load_head_draft,
                   read_head_metadata, save_head)

__all__ = ["Round", "SpecOutput", "SpecStats", "SpeculativeDecoder", "acceptance_probability",
           "expected_tokens_per_step", "generate_speculative", "residual_distribution",
           "verify_greedy", "verify_sampled",
           "Draft", "ModelDraft", "NoDraft", "PromptLookupDraft", "draw", "early_exit_draft",
           "early_exit_view", "quantized_draft",
           "DEFAULT_HEAD", "DraftHead", "HeadDraft", "head_config", "load_head", "load_head_draft",
           "read_head_metadata", "save_head"]

"""Causal grouped-query attention over a (possibly cached) key/value sequence.

One masked reference covers prefill (T query tokens) and decode (T = 1): query token t of row b
sits at absolute position ``q_pos[b, t]`` and may attend to key positions ``j <= q_pos[b, t]``
with ``j < kv_len[b]``. Rows of a batch may be at different lengths (continuous batching).
That reference, ``attention_ref``, lives in ``attention_common.py`` with the kernels' argument
checks: this module only dispatches, and imports the kernel modules, never the reverse.

The Triton path has two kernels, because the two phases have opposite bottlenecks:
  decode  (T == 1) ``decode_attention.py``: one query against the whole cache, ~2 FLOPs per
          byte of K/V read: memory-bound, so it is a split-KV streaming kernel.
  prefill (T > 1)  ``prefill_attention.py``: T queries share each K/V tile, ~T FLOPs per byte:
          compute-bound, so it is a FlashAttention-2 style tiled kernel on tensor cores.
"""
from . import decode_attention as _decode, prefill_attention as _prefill
from ._dispatch import resolve
from .attention_common import attention_ref, kernel_supports
from .cpu_attention import attention_native


def attention(q, k, v, q_pos, kv_len, backend="auto"):
    """Causal GQA attention; backend: ref | triton | native (CPU SDPA) | auto (triton on CUDA,
    T==1 -> decode)."""
    impl = resolve(backend, q)
    if impl == "triton" and backend == "auto" and not kernel_supports(q, k):
        impl = "ref"   # e.g. the head_dim-8 toy models of the tests, run on a GPU
    if impl == "ref":
        return attention_ref(q, k, v, q_pos, kv_len)
    if impl == "native":
        return attention_native(q, k, v, q_pos, kv_len)
    # Looked up on the modules at call time (not bound here), so a test can wrap a launcher.
    if q.shape[2] == 1:
        return _decode.decode_attention_triton(q, k, v, q_pos, kv_len)
    return _prefill.prefill_attention_triton(q, k, v, q_pos, kv_len)

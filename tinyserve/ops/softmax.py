"""The online softmax (FlashAttention's running max and sum), written once for the four
attention kernels: contiguous decode and prefill, paged decode and prefill.

A kernel streams K/V past a block of query rows one tile at a time and never holds a whole
score row. Per row it keeps m (the largest score so far), l (the sum of exp2(score - m)) and
acc (the exp2-weighted sum of V rows, not yet divided by l). When a tile raises the max, what
was summed under the old max is rescaled by alpha = exp2(m_old - m_new). Scores arrive as
base-2 logits (``launch.qk_scale`` folds LOG2E into 1/sqrt(D)), so every exponential is exp2.

``tile_scores`` (q . k^T of a tile) sits here too: the two decode kernels share its G = 1 path.
The decode kernels also split a row's keys into chunks; each chunk's (out, lse) is merged
exactly by ``decode_combine_kernel`` (FlashDecoding): ``split_outputs`` and ``merge_splits``
are the host side of that.
"""
import torch

from ._dispatch import import_triton

try:
    triton = import_triton()
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


if triton is not None:
    @triton.jit
    def tile_scores(q, k, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """q [M, D] . k [N, D]^T -> [M, N] fp32 raw scores (the caller scales and masks).

        USE_DOT: [M >= 16, D] x [D, N] on the tensor cores; else a [M, N, D] product summed
        over D on the CUDA cores (decode at G = 1, where padding M to 16 wastes 15/16)."""
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        return s

    @triton.jit
    def online_softmax_update(m_i, l_i, acc, s, v, USE_DOT: tl.constexpr,
                              PRECISION: tl.constexpr):
        """One K/V tile: s [M, N] masked base-2 scores (-inf where a key is not visible),
        v [N, D] the tile's values; m_i, l_i [M], acc [M, D] fp32 -> the updated three.

        USE_DOT: p @ v on the tensor cores (M >= 16); else summed over N on the CUDA cores."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no visible key yet keeps m = -inf; exponentiate against 0 so
        # p and alpha are 0, not exp2(-inf - -inf) = NaN (padded query rows, q_pos < 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)        # rescales what was summed under the old max
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def online_softmax_finish(m_i, l_i, acc):
        """-> (out [M, D] = acc / l, lse [M] = log2 of the row's sum in base-2 logits). A row
        with no visible key gives zeros and lse = -inf (no 0/0, no log2(0))."""
        l_pos = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_pos), float("-inf"))
        return acc / l_pos[:, None], lse

    @triton.jit
    def decode_combine_kernel(OPart, LsePart, O, num_splits,
                              sp_b, sp_h, sp_s, se_b, se_h, se_s, so_b, so_h, so_d,
                              BLOCK_S: tl.constexpr, D: tl.constexpr):
        # Program (b, q head): reads NUM_SPLITS partial rows (fp32) and their lse, writes D.
        # out = sum_s 2^(lse_s - m) * o_s / sum_s 2^(lse_s - m): each o_s is already normalised
        # by its own chunk's sum 2^lse_s, so weighting by that sum undoes it exactly.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        s_ok = offs_s < num_splits
        lse = tl.load(LsePart + b * se_b + h * se_h + offs_s * se_s, mask=s_ok,
                      other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)   # a row with no visible key: all weights 0
        w = tl.exp2(lse - m)
        den = tl.sum(w, axis=0)
        o = tl.load(OPart + b * sp_b + h * sp_h + offs_s[:, None] * sp_s + offs_d[None, :],
                    mask=s_ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(O + b * so_b + h * so_h + offs_d * so_d, out.to(O.dtype.element_ty))


def split_outputs(o: torch.Tensor, num_splits: int):
    """Where a decode split kernel writes for output o [B, Hq, D]: -> (part, lse, part strides
    (b, h, split, d), lse strides (b, h, split)). One split writes the final output directly
    (no partials, no second launch; lse unused); more get fp32 partials for the merge."""
    if num_splits == 1:
        return o, o, (o.stride(0), o.stride(1), 0, o.stride(2)), (0, 0, 0)
    B, Hq, D = o.shape
    part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=o.device)
    lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=o.device)
    return part, lse, part.stride(), lse.stride()


def merge_splits(part: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, num_splits: int):
    """Merge the chunks' partial outputs into o [B, Hq, D] (nothing to do for one split)."""
    if num_splits > 1:
        B, Hq, D = o.shape
        decode_combine_kernel[(B, Hq)](
            part, lse, o, num_splits, part.stride(0), part.stride(1), part.stride(2),
            *lse.stride(), *o.stride(), BLOCK_S=triton.next_power_of_2(num_splits), D=D,
            num_warps=4)

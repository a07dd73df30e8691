"""The packed-weight constants the quantized kernel (``quant_linear*.py``) depends on, defined once.

``tinyserve.quant.formats`` produces weights in these layouts and imports these constants from
here; ``quant_linear_common.py`` and ``quant_linear.py`` read them. They live in ops, below both, so that ops imports nothing
above itself (quant imports ops, never the reverse).
"""

# QLoRA's NormalFloat-4 codebook: the 16 values of Dettmers et al. 2023 (QLoRA, appendix E), as
# published in bitsandbytes' NF4 dequantization table (csrc kernels, `dDequantizeNF4`): 7
# negative quantiles of N(0, 1) and 8 positive ones, normalized to [-1, 1], with an exact zero.
NF4_CODEBOOK_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
NF4_BLOCK_SIZE = 64          # QLoRA / bitsandbytes' default block of the first quantization

GGUF_BLOCK = 32                             # llama.cpp: weights per block
GGUF_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}   # bytes per block (the qtypes with a kernel)

"""The performance model's arithmetic, checked against numbers derivable by hand."""
import pytest

from tinyserve import analysis as A


def test_parameter_counts_match_published_sizes():
    # Published sizes: Llama-2-7B 6.74B, Llama-2-70B 68.98B, Llama-3.2-1B 1.24B, SmolLM2 134.5M.
    assert A.shape("Llama-2-7B").num_parameters() == 6_738_415_616
    assert A.shape("Llama-2-70B").num_parameters() == 68_976_648_192
    assert A.shape("Llama-3.2-1B").num_parameters() == 1_235_814_400
    assert A.shape("SmolLM2-135M").num_parameters() == 134_515_008


def test_kv_cache_bytes_by_hand():
    c = A.shape("Llama-2-7B")        # 32 layers, 32 KV heads of 128: 2*32*32*128*2 B = 512 KiB/token
    assert A.kv_cache_bytes(c, batch=1, context=2048) == 2048 * 512 * 1024
    c70 = A.shape("Llama-2-70B")     # GQA: 8 KV heads of 128 over 80 layers -> 320 KiB/token
    assert A.kv_cache_bytes(c70, 1, 1) == 2 * 80 * 8 * 128 * 2


def test_ceiling_and_intensity():
    c = A.shape("Llama-2-7B")
    bw = A.HARDWARE["H200 (measured)"].bandwidth
    # batch 1, short context: ~bandwidth / 13.5 GB
    assert A.decode_ceiling_tok_s(c, bw, 1, 0) == pytest.approx(bw / (2 * c.num_parameters()))
    assert A.linear_intensity(1, 4096, 4096) == pytest.approx(1.0, rel=1e-3)
    assert A.HARDWARE["A100-80GB (datasheet)"].ridge == pytest.approx(156, rel=1e-2)
    assert A.HARDWARE["H100-80GB (datasheet)"].ridge == pytest.approx(296, rel=1e-2)
    with pytest.raises(ValueError, match="unknown model shape"):
        A.shape("GPT-5")

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
    bw = A.HARDWARE["H200-141GB (datasheet)"].bandwidth
    # batch 1, no context: bandwidth over every multiplied weight + one 4096-wide embedding row
    matmul_params = c.num_parameters() - 32000 * 4096
    assert A.decode_ceiling_tok_s(c, bw, 1, 0) == pytest.approx(bw / (2 * (matmul_params + 4096)))
    assert A.linear_intensity(1, 4096, 4096) == pytest.approx(1.0, rel=1e-3)
    assert A.HARDWARE["A100-80GB (datasheet)"].ridge == pytest.approx(156, rel=1e-2)
    assert A.HARDWARE["H100-80GB (datasheet)"].ridge == pytest.approx(296, rel=1e-2)
    with pytest.raises(ValueError, match="unknown model shape"):
        A.shape("GPT-5")


def test_step_reads_one_embedding_row_per_sequence():
    # An untied input embedding is a lookup: a decode step reads one row of it per sequence, and
    # the LM head in full. Reading the whole table (params * 2 bytes) overstates the step by the
    # embedding's share of the parameters: 1.9% for Llama-2-7B, 6.5% for Llama-3-8B.
    c7, c8 = A.shape("Llama-2-7B"), A.shape("Llama-3-8B")
    full7, full8 = 2 * c7.num_parameters(), 2 * c8.num_parameters()
    assert A.step_weight_bytes(c7) == full7 - 2 * (32000 - 1) * 4096
    assert A.step_weight_bytes(c7) / full7 == pytest.approx(1 - 0.0195, abs=5e-4)
    assert A.step_weight_bytes(c8) / full8 == pytest.approx(1 - 0.0654, abs=5e-4)
    # batch B reads B rows (one new token per sequence); a prefill of P tokens reads P rows
    assert A.step_weight_bytes(c7, 2, 16) - A.step_weight_bytes(c7, 2, 1) == 15 * 4096 * 2
    assert A.decode_step_bytes(c7, 16, 0) == A.step_weight_bytes(c7, 2, 16)
    assert A.step_weight_bytes(c7, 2, 10**6) == full7          # never more rows than the table
    # the bytes the weights occupy are still every parameter
    assert A.weight_bytes(c7) == full7
    # an embedding lookup does no arithmetic: 2 FLOPs per multiplied weight
    assert A.decode_step_flops(c7, 1, 0) == 2 * (c7.num_parameters() - 32000 * 4096)


def test_tied_models_read_the_whole_embedding():
    # A tied embedding is also the LM head, multiplied in full every step: nothing changes.
    for name in ("SmolLM2-135M", "Llama-3.2-1B"):
        c = A.shape(name)
        assert c.tie_word_embeddings
        for rows in (1, 16):
            assert A.step_weight_bytes(c, 2, rows) == A.weight_bytes(c) == 2 * c.num_parameters()
        assert A.decode_step_flops(c, 1, 0) == 2 * c.num_parameters()


def test_c16_decode_floor():
    # Claim C16's decode: 255 steps after a 512-token prompt (the first of 256 tokens comes from
    # prefill), Llama-2-7B in bf16, batch 1. At 4.26 TB/s the floor is 811 ms (827 ms if each
    # step read the whole embedding table); at the H200 datasheet's 4.8 TB/s, 720 ms.
    c = A.shape("Llama-2-7B")
    step_bytes = sum(A.decode_step_bytes(c, 1, 512 + i) for i in range(1, 256))
    assert step_bytes / 4.26e12 == pytest.approx(0.811, abs=5e-4)
    h200 = A.HARDWARE["H200-141GB (datasheet)"]
    assert step_bytes / h200.bandwidth == pytest.approx(0.720, abs=5e-4)


def test_h200_is_the_datasheet():
    h200 = A.HARDWARE["H200-141GB (datasheet)"]
    assert (h200.bandwidth, h200.flops) == (4.8e12, 989e12)
    assert "datasheet" in h200.source
    assert all("ANCHORS" not in hw.source for hw in A.HARDWARE.values())


def test_cost_per_million_tokens():
    # 1e6 tokens at 100 tok/s = 10,000 s = 2.78 h; at $2/h that is $5.56
    hours, cost = A.cost_per_million_tokens(100.0, price_per_hour=2.0)
    assert hours == pytest.approx(10_000 / 3600)
    assert cost == pytest.approx(2.0 * 10_000 / 3600)
    with pytest.raises(ValueError):
        A.cost_per_million_tokens(0.0, 1.0)

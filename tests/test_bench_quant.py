"""``python -m tinyserve.bench quant`` on the CPU with a tiny shape: it runs every format, writes
its JSON, and quantizes layer by layer exactly as ``quantize_model`` does."""
import json

import pytest
import torch

from tinyserve.bench import __main__ as bench_main
from tinyserve.bench import common
from tinyserve.bench.decode import build_ours, named_configs
from tinyserve.bench.quant import parse_format, quantize_on_device, step_weight_bytes
from tinyserve.quant import QuantLinear, memory_breakdown, model_bytes, quantize_model

MACHINE = common.machine_name("cpu")


def test_quant_suite_runs_on_cpu_and_writes_json(tmp_path, capsys):
    argv = ["quant", "--device", "cpu", "--threads", "1", "--model", "tiny-mha", "--formats",
            "bf16,int8,int4-g64,int4-g128,nf4", "--batch-sizes", "1,2", "--prompt-len", "6",
            "--new-tokens", "3", "--repeats", "1", "--out", str(tmp_path)]
    assert bench_main.main(argv) == 0
    data = json.loads((tmp_path / f"{MACHINE}-quant.json").read_text())
    assert data["suite"] == "quant" and data["env"]["command"].endswith(" ".join(argv))
    assert data["config"]["formats"] == ["bf16", "int8", "int4-g64", "int4-g128", "nf4"]
    runs = {(r["format"], r["batch"]): r for r in data["runs"]}
    assert len(runs) == 10
    for (fmt, B), r in runs.items():
        assert "error" not in r and "skipped" not in r, r
        # the record is internally consistent (no speed is asserted: that is the benchmark's job)
        bw = data["roofline"]["copy_bandwidth_Bps"]
        assert r["ceiling_tok_s"] == pytest.approx(B * bw / r["bytes_per_step"])
        assert r["frac_ceiling"] == pytest.approx(r["decode_tok_s"] / r["ceiling_tok_s"])
        base = runs[("bf16", B)]["decode_tok_s"]
        assert r["speedup_vs_bf16"] == pytest.approx(r["decode_tok_s"] / base)
        assert not r["cuda_graph"]
        assert r["bytes_per_step"] == r["step_weight_bytes"] + r["kv_bytes_per_step"]
        assert "meets_target" not in r                    # targets are judged on CUDA only
    mem = {fmt: runs[(fmt, 1)]["model_bytes"] for fmt in ("bf16", "int8", "int4-g128", "nf4")}
    # CPU runs in fp32: int8 linears take ~1/4 of the bytes, 4-bit ones ~1/8 (+ scales)
    assert mem["bf16"] > mem["int8"] > mem["int4-g128"]
    # 4.25 bits per weight both: 32 bits (scale + min) per 128 vs 16 bits (absmax) per 64
    assert mem["int4-g128"] == mem["nf4"]
    assert runs[("bf16", 1)]["speedup_vs_bf16"] == 1.0
    out = capsys.readouterr().out
    assert "vs bf16" in out and "int4-g128" in out


def test_time_budget_skips_but_still_writes(tmp_path):
    argv = ["quant", "--device", "cpu", "--threads", "1", "--formats", "bf16,int8",
            "--batch-sizes", "1", "--new-tokens", "2", "--repeats", "1", "--budget-s", "0",
            "--out", str(tmp_path)]
    assert bench_main.main(argv) == 0
    data = json.loads((tmp_path / f"{MACHINE}-quant.json").read_text())
    assert [r.get("skipped") for r in data["runs"]] == ["time budget spent"] * 2


@pytest.mark.parametrize("argv,msg", [
    (["--formats", "int3"], "unknown format"),
    (["--formats", "int4-g48"], "unknown format"),
    (["--model", "smollm2-135m", "--formats", "int4-g128"], "does not divide"),
    (["--model", "no-such"], "unknown model"),
    (["--new-tokens", "1"], "new-tokens"),
])
def test_bad_arguments(argv, msg, tmp_path, capsys):
    assert bench_main.main(["quant", "--device", "cpu", "--out", str(tmp_path), *argv]) == 2
    assert msg in capsys.readouterr().err


def test_parse_format():
    assert parse_format("bf16") == (None, None)
    assert parse_format("int8") == ("int8", None)
    assert parse_format("INT4-G128") == ("int4", 128)
    assert parse_format("nf4") == ("nf4", 64)


@pytest.mark.parametrize("method,g", [("int8", None), ("int4", 128), ("nf4", 64)])
def test_layer_by_layer_equals_quantize_model(method, g):
    cfg = named_configs()["tiny-mha"]
    a = quantize_on_device(build_ours(cfg, "cpu", torch.float32, seed=1), method, g)
    b = quantize_model(build_ours(cfg, "cpu", torch.float32, seed=1), method, group_size=g)
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert set(qa) == set(qb) and "lm_head" in qa          # the 7B-like head is untied
    for n in qa:
        sa, sb = qa[n].state_dict(), qb[n].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb), n
    assert model_bytes(a) == model_bytes(b)
    assert a.quantization["method"] == method
    # bytes a step reads: everything but the untied embedding table
    assert step_weight_bytes(a) == model_bytes(a) - memory_breakdown(a)["embedding"]

"""The roofline / ops / decode / all / plot suites run end to end on CPU and record their results.

Small shapes only: these check that the harness runs and writes what it promises, never how
fast anything is (speed is measured by `python -m tinyserve.bench`, not asserted here).
"""
import json

import pytest
import torch

from tinyserve.bench import __main__ as bench_main
from tinyserve.bench import common

MACHINE = common.machine_name("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    """--threads 1 below: on a busy 2-core machine torch's threads spin against each other.
    Put torch's setting back for the tests that follow."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(argv, tmp_path):
    assert bench_main.main(argv) == 0, argv
    return tmp_path


def _load(path):
    assert path.is_file(), path
    return json.loads(path.read_text())


def _check_roofline(r):
    for key in ("copy_bandwidth_Bps", "matmul_flops_per_s", "copy_s", "matmul_s",
                "copy_bytes_moved"):
        assert r[key] > 0, key
    assert r["copy_bytes_moved"] == 2 * r["copy_buffer_bytes"]   # read + write


def _check_env(env, argv):
    assert env["machine"] == MACHINE and env["device"] == "cpu"
    assert env["command"].endswith(" ".join(argv))
    for key in ("date", "versions", "cpu", "torch_threads"):
        assert key in env


def test_roofline_suite(tmp_path, capsys):
    argv = ["roofline", "--out", str(tmp_path), "--device", "cpu", "--copy-mib", "16",
            "--threads", "1"]
    _run(argv, tmp_path)
    data = _load(tmp_path / f"{MACHINE}-roofline.json")
    _check_env(data["env"], argv)
    _check_roofline(data["roofline"])
    assert data["roofline"]["copy_buffer_bytes"] == 16 * 2**20
    assert "copy bandwidth" in capsys.readouterr().out


def test_ops_suite_times_every_impl_or_says_why_not(tmp_path, capsys):
    figs = tmp_path / "figs"
    argv = ["ops", "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--repeats", "2",
            "--figures", str(figs)]
    _run(argv, tmp_path)
    data = _load(tmp_path / f"{MACHINE}-ops.json")
    assert data["suite"] == "ops"
    _check_env(data["env"], argv)
    _check_roofline(data["roofline"])
    assert data["config"]["small"] is True
    assert data["op_errors"] == {}
    # every op module with bench_cases is found (at least those present since the start)
    assert {"rms_norm", "rope", "swiglu"} <= set(data["config"]["ops"])
    assert {c["op"] for c in data["cases"]} == set(data["config"]["ops"])
    for case in data["cases"]:
        assert "error" not in case and "skipped" not in case, case
        assert case["bytes"] > 0
        impls = case["impls"]
        assert {case["ours"], *case["peers"]} <= set(impls), case["name"]
        for name, e in impls.items():
            where = f"{case['op']} {case['name']} {name}"
            assert "error" not in e, (where, e)
            if "skipped" in e:
                assert isinstance(e["skipped"], str) and e["skipped"], where
                continue
            assert e["time_us"] > 0 and e["gb_s"] > 0 and e["frac_bw"] > 0, where
            assert abs(e["gb_s"] * 1e9 * e["time_s"] - case["bytes"]) <= 1e-6 * case["bytes"]
            if case["flops"]:
                assert e["tflop_s"] > 0 and e["frac_matmul"] > 0, where
        # on CPU ours (triton) is never timed: the interpreter's speed means nothing
        assert "interpreter" in impls["triton"]["skipped"]
        assert "speedup" not in impls["triton"]
    assert any("interpreter" in n for n in data["notes"])
    out = capsys.readouterr().out
    assert "% copy bw" in out and "rms_norm" in out
    drawn = sorted(p.name for p in figs.glob("*.png"))
    assert drawn == sorted(f"{MACHINE}-ops-{op}.png" for op in data["config"]["ops"])

    # the figures are redrawn from the JSON alone (as from a committed GPU result)
    redraw = tmp_path / "redraw"
    assert bench_main.main(["plot", str(tmp_path / f"{MACHINE}-ops.json"),
                            "--out", str(redraw)]) == 0
    assert sorted(p.name for p in redraw.glob("*.png")) == drawn
    assert not list(redraw.glob("*.json"))  # redrawing saves no new result


def test_ops_speedup_is_peer_time_over_ours():
    """ours/peer ratios as the JSON records them (on CUDA ours is "triton"; here a CPU impl)."""
    from tinyserve.bench import ops
    from tinyserve.ops.spec import BenchCase
    args = type("Args", (), {"warmup_ms": 1, "rep_ms": 1, "repeats": 1})()
    case = BenchCase(op="demo", name="x", bytes=100, flops=10, ours="mine", peers=("ref", "gone"),
                     setup=lambda: {"mine": lambda: None, "ref": lambda: sum(range(1000))})
    roof = {"copy_bandwidth_Bps": 1e9, "matmul_flops_per_s": 1e9}
    rec = ops.run_case(case, torch.device("cpu"), roof, args)
    mine, ref = rec["impls"]["mine"], rec["impls"]["ref"]
    assert mine["speedup"] == {"ref": pytest.approx(ref["time_s"] / mine["time_s"])}
    assert mine["frac_bw"] == pytest.approx(100 / mine["time_s"] / 1e9)
    assert mine["frac_matmul"] == pytest.approx(10 / mine["time_s"] / 1e9)
    assert "not offered" in rec["impls"]["gone"]["skipped"]


def test_decode_suite_same_weights_as_hf(tmp_path, capsys):
    pytest.importorskip("transformers")
    figs = tmp_path / "figs"
    argv = ["decode", "--out", str(tmp_path), "--device", "cpu", "--threads", "1",
            "--models", "tiny,tiny-mha", "--batch-sizes", "1,2", "--prompt-len", "6",
            "--new-tokens", "6", "--repeats", "1", "--figures", str(figs)]
    _run(argv, tmp_path)
    data = _load(tmp_path / f"{MACHINE}-decode.json")
    assert data["suite"] == "decode"
    _check_env(data["env"], argv)
    _check_roofline(data["roofline"])
    runs = data["runs"]
    assert [(r["model"], r["batch"]) for r in runs] == [("tiny", 1), ("tiny", 2),
                                                        ("tiny-mha", 1), ("tiny-mha", 2)]
    for r in runs:
        # a step reads the multiplied weights (never more than all of them) and the KV cache
        assert r["bytes_per_step"] == r["step_weight_bytes"] + r["kv_bytes_per_step"] > 0
        assert 0 < r["step_weight_bytes"] <= r["weight_bytes"]
        bw = data["roofline"]["copy_bandwidth_Bps"]
        assert r["ceiling_tok_s"] == pytest.approx(r["batch"] * bw / r["bytes_per_step"])
        ours, hf = r["ours"], r["hf"]
        assert "error" not in ours and "error" not in hf, (ours, hf)
        # recorded and consistent; how fast is the benchmark's business, not a test's
        assert ours["decode_tok_s"] == pytest.approx(r["batch"] * 5 / ours["decode_s"])
        assert ours["frac_ceiling"] == pytest.approx(ours["decode_tok_s"] / r["ceiling_tok_s"])
        assert ours["prefill_s"] > 0 and hf["prefill_s"] > 0 and hf["total_s"] > 0
        # HF's decode time is generate() minus a separate prefill: on a busy CPU that can come
        # out <= 0, and then the suite records why instead of a rate
        if hf["decode_tok_s"] is None:
            assert "noise" in hf["note"] and "ours" not in r["ratio_vs_hf"]
        else:
            assert hf["decode_tok_s"] == pytest.approx(r["batch"] * 5 / hf["decode_s"])
            assert hf["frac_ceiling"] == pytest.approx(hf["decode_tok_s"] / r["ceiling_tok_s"])
            assert r["ratio_vs_hf"]["ours"] == pytest.approx(
                ours["decode_tok_s"] / hf["decode_tok_s"])
        assert r["ours_graph"] == {"skipped": "CUDA graphs need CUDA"}
        # fp32 on CPU: HF holds the very same tensors, so it computes the same thing
        assert r["logit_check_vs_hf"]["max_abs_diff"] < 1e-4, r["logit_check_vs_hf"]
        assert r["logit_check_vs_hf"]["same_argmax"]
        assert r["greedy_agreement"]["same_tokens"], r["greedy_agreement"]
    # the tied 1B-like shape counts its embedding once; the untied one twice
    tiny, mha = data["config"]["models"]["tiny"], data["config"]["models"]["tiny-mha"]
    assert tiny["tie_word_embeddings"] and not mha["tie_word_embeddings"]
    assert "% ceiling" in capsys.readouterr().out
    assert (figs / f"{MACHINE}-decode.png").is_file()
    redraw = tmp_path / "redraw"
    assert bench_main.main(["plot", str(tmp_path / f"{MACHINE}-decode.json"),
                            "--out", str(redraw)]) == 0
    assert (redraw / f"{MACHINE}-decode.png").is_file()


def test_all_suite_writes_one_file_per_part(tmp_path, monkeypatch):
    from tinyserve.bench import all as all_suite
    monkeypatch.setattr(all_suite, "generate_unavailable", lambda: "not in this test")
    figs = tmp_path / "figs"
    argv = ["all", "--out", str(tmp_path), "--device", "cpu", "--threads", "1",
            "--figures", str(figs)]
    _run(argv, tmp_path)
    data = _load(tmp_path / f"{MACHINE}-all.json")
    assert data["errors"] == {}
    assert set(data["files"]) == {"roofline", "ops", "decode"}
    assert data["notes"] == {"generate": "skipped: not in this test"}
    _check_roofline(data["roofline"])
    for part in ("roofline", "ops", "decode"):
        sub = _load(tmp_path / f"{MACHINE}-{part}.json")
        assert sub["suite"] == part
        assert f" {part} --device cpu --threads 1" in sub["env"]["command"]
    assert (figs / f"{MACHINE}-decode.png").is_file()


def test_hf_name_mapping():
    from tinyserve.bench.hf import hf_name
    assert hf_name("embed.weight") == "model.embed_tokens.weight"
    assert hf_name("norm.weight") == "model.norm.weight"
    assert hf_name("lm_head.weight") == "lm_head.weight"
    assert hf_name("layers.3.attn.wk.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert hf_name("layers.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert hf_name("layers.11.mlp_norm.weight") == \
        "model.layers.11.post_attention_layernorm.weight"
    assert hf_name("layers.2.mlp.w_down.weight") == "model.layers.2.mlp.down_proj.weight"


@pytest.mark.parametrize("argv, msg", [
    (["decode", "--models", "nope"], "unknown model"),
    (["decode", "--batch-sizes", "0"], "batch-sizes"),
    (["ops", "--ops", "nope"], "unknown op"),
    (["all", "--skip", "nope"], "unknown part"),
])
def test_bad_arguments_are_clear_errors(argv, msg, capsys, tmp_path):
    assert bench_main.main(argv + ["--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err
    assert not list(tmp_path.glob("*.json"))


def test_plot_rejects_a_file_that_is_not_a_result(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert bench_main.main(["plot", str(bad), "--out", str(tmp_path)]) == 2
    assert "not a tinyserve.bench result" in capsys.readouterr().err


def test_spent_time_budget_still_writes_and_plots(tmp_path):
    """--budget-s 0: nothing is timed, but every case/run is recorded as skipped and drawn."""
    figs = tmp_path / "figs"
    base = ["--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--budget-s", "0",
            "--figures", str(figs)]
    _run(["ops", "--ops", "rms_norm", *base], tmp_path)
    _run(["decode", "--models", "tiny", *base], tmp_path)
    ops = _load(tmp_path / f"{MACHINE}-ops.json")
    assert ops["cases"] and all(c["skipped"] == "time budget spent" for c in ops["cases"])
    dec = _load(tmp_path / f"{MACHINE}-decode.json")
    assert [r["skipped"] for r in dec["runs"]] == ["time budget spent"] * 2
    assert (figs / f"{MACHINE}-ops-rms_norm.png").is_file()
    assert (figs / f"{MACHINE}-decode.png").is_file()


def test_help_of_every_suite(capsys):
    from tinyserve.bench import SUITES
    assert bench_main.main(["--help"]) == 0
    for name in SUITES:
        assert bench_main.main([name, "--help"]) == 0, name
    assert "plot" in capsys.readouterr().out

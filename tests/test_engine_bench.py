"""The ``serving`` bench suite runs end to end on a tiny model and records consistent results.

It checks the harness (every system does the same work, the JSON holds what the report and the
figures need), never how fast anything is: speed is `python -m tinyserve.bench serving`'s job.
"""
import json

import pytest
import torch

from tinyserve.bench import __main__ as bench_main
from tinyserve.bench import common

MACHINE = common.machine_name("cpu")
SMALL = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--num-requests", "6",
         "--prompt-len", "8,0.5,2,16", "--output-len", "4,0.8,1,10", "--max-batch", "3",
         "--max-batched-tokens", "12"]


@pytest.fixture(autouse=True)
def _threads_back():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_serving_suite_on_a_tiny_model(tmp_path, capsys):
    hf = pytest.importorskip("transformers") is not None
    figs = tmp_path / "figs"
    argv = ["serving", *SMALL, "--rates", "40,80", "--out", str(tmp_path),
            "--figures", str(figs)]
    assert bench_main.main(argv) == 0
    data = json.loads((tmp_path / f"{MACHINE}-serving.json").read_text())
    c, res = data["config"], data["results"]
    assert data["suite"] == "serving" and data["env"]["command"].endswith(" ".join(argv))
    assert c["num_requests"] == 6 and c["rates"] == [40.0, 80.0]
    assert c["max_model_len"] == 16 + 10
    systems = ["continuous", "static"] + (["hf"] if hf else [])
    for s in systems:
        r = res[s]
        # every system made exactly the drawn output lengths
        assert r["requests"] == 6 and r["output_tokens"] == c["output_tokens"], s
        assert r["total_tokens"] == c["output_tokens"] + c["prompt_tokens"]
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
        for k in ("ttft_s", "queue_s", "e2e_s"):
            assert 0 <= r[k]["p50"] <= r[k]["p99"] <= r[k]["max"], (s, k)
    for s in systems[1:]:
        assert data["ratio"][f"continuous_over_{s}"]["output_tok_s"] == pytest.approx(
            res["continuous"]["output_tok_s"] / res[s]["output_tok_s"])
        # fp32 on CPU, the same weights: every system produced the same greedy tokens
        assert data["agreement_with_continuous"][s] == {"same_tokens": 6, "of": 6}, s
    assert [p["rate"] for p in data["sweep"]] == [40.0, 80.0]
    for p in data["sweep"]:
        assert p["continuous"]["output_tokens"] == p["static"]["output_tokens"]
    out = capsys.readouterr().out
    assert "continuous_over_static" in out and "TTFT p50 ms" in out
    assert (figs / f"{MACHINE}-serving.png").is_file()
    redraw = tmp_path / "redraw"
    assert bench_main.main(["plot", str(tmp_path / f"{MACHINE}-serving.json"),
                            "--out", str(redraw)]) == 0
    assert (redraw / f"{MACHINE}-serving.png").is_file()


def test_serving_without_hf_says_why(tmp_path):
    argv = ["serving", *SMALL, "--rates", "", "--no-hf", "--out", str(tmp_path),
            "--figures", ""]
    assert bench_main.main(argv) == 0
    data = json.loads((tmp_path / f"{MACHINE}-serving.json").read_text())
    assert data["results"]["hf"] == {"skipped": "--no-hf"}
    assert list(data["ratio"]) == ["continuous_over_static"] and data["sweep"] == []


@pytest.mark.parametrize("extra, msg", [
    (["--rates", "1,0"], "rates must be > 0"),
    (["--prompt-len", "8,1"], "median,sigma,lo,hi"),
    (["--output-len", "4,1,9,2"], "lengths need"),
    (["--model", "nope"], "unknown model"),
    (["--max-batch", "8", "--max-batched-tokens", "4"], "must be >= --max-batch"),
])
def test_bad_serving_arguments(extra, msg, tmp_path, capsys):
    argv = ["serving", "--device", "cpu", "--model", "tiny", "--no-hf", *extra,
            "--out", str(tmp_path)]
    assert bench_main.main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))

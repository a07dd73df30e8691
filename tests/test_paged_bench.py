"""The ``paged`` bench suite runs end to end on a tiny model and records consistent results.

It checks the harness (both stores do the same work within the same KV budget, the counts add
up, the JSON holds what the report and notebook 06 need), never how fast anything is.
"""
import json

import pytest
import torch

from tinyserve.bench import __main__ as bench_main
from tinyserve.bench import common

MACHINE = common.machine_name("cpu")
SMALL = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--num-requests", "8",
         "--prompt-len", "8,0.5,2,16", "--output-len", "4,0.8,1,10", "--budget-seqs", "2",
         "--max-seqs", "8", "--block-size", "4", "--max-batched-tokens", "16",
         "--prefix-requests", "6", "--system-len", "20", "--user-len", "4,0.5,1,8",
         "--repeat-system-len", "40"]


@pytest.fixture(autouse=True)
def _threads_back():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_paged_suite_on_a_tiny_model(tmp_path, capsys):
    argv = ["paged", *SMALL, "--out", str(tmp_path)]
    assert bench_main.main(argv) == 0
    data = json.loads((tmp_path / f"{MACHINE}-paged.json").read_text())
    c, res = data["config"], data["results"]
    assert data["suite"] == "paged" and data["env"]["command"].endswith(" ".join(argv))
    assert c["max_model_len"] == 16 + 10 and c["kv_budget_tokens"] == 2 * 26
    for s in ("slots", "paged"):
        r = res[s]
        assert r["requests"] == 8 and r["output_tokens"] == c["output_tokens"], s
        assert r["kv_capacity_tokens"] <= c["kv_budget_tokens"]
        assert 0 <= r["waste_time_avg"] < 1 and 1 <= r["mean_seqs"] <= r["max_seqs"]
        assert len(data["series"][s]) == r["forwards"]
        assert all(u <= rv <= r["kv_capacity_tokens"] for _, _, rv, u in data["series"][s])
        # every prompt token and every decode is fed once (preemption would re-feed some)
        if r["preemptions"] == 0:
            assert r["fed_tokens"] == c["prompt_tokens"] + c["output_tokens"] - 8
    assert res["slots"]["max_seqs"] <= 2 < res["paged"]["max_seqs"] <= 8
    assert data["paged_over_slots"]["max_seqs"] == pytest.approx(
        res["paged"]["max_seqs"] / res["slots"]["max_seqs"])
    assert data["same_tokens"] == {"same": 8, "of": 8}
    p = data["prefix_caching"]
    on, off = p["cache_on"], p["cache_off"]
    assert off["cached_prompt_tokens"] == 0 < on["cached_prompt_tokens"]
    assert on["cached_prompt_tokens"] % 4 == 0 and p["same_tokens"] == 6
    assert on["fed_tokens"] == off["fed_tokens"] - on["cached_prompt_tokens"]
    assert p["on_over_off"]["output_tok_s"] == pytest.approx(
        on["output_tok_s"] / off["output_tok_s"])
    a = data["across_calls"]      # one LLM, two calls: the second finds the system prompt
    assert a["first"]["num_cached_tokens"] == 0 and a["second"]["num_cached_tokens"] == 40
    assert a["first"]["prompt_tokens"] == a["second"]["prompt_tokens"] == 41
    assert a["ttft_first_over_second"] == pytest.approx(
        a["first"]["ttft_s"] / a["second"]["ttft_s"])
    out = capsys.readouterr().out
    assert "across calls" in out
    assert "paged / slots" in out and "prefix cache" in out and "bench ops" in out

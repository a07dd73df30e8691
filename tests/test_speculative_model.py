"""Speculative decoding on the real SmolLM2: every draft's greedy output equals plain greedy
decoding token for token, and the head-training command runs end to end (a few steps)."""
import pytest
import torch

from tinyserve.generate import generate_ids
from tinyserve.speculative import (DEFAULT_HEAD, PromptLookupDraft, early_exit_draft,
                                   generate_speculative, load_head, load_head_draft,
                                   quantized_draft)

# Many small ops (the int4 draft's dequantizes most): one torch thread, see conftest.one_thread.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

N = 28
TEXT = ("The lighthouse keeper climbed the stairs every night, cleaned the lens and lit the "
        "lamp so that the boats could find the harbour in the fog.")


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "Repeat this sentence, then "
                                     f"explain it in one line: {TEXT}"}])
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def reference(smollm2, prompt):
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # module scope: set up before one_thread runs
    try:
        return generate_ids(smollm2[0], [prompt], N, ignore_eos=True)[0]   # exactly N tokens
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["prompt-lookup", "early-exit", "int4", "head"])
def test_greedy_speculative_equals_plain_greedy(smollm2, prompt, reference, name):
    model, tok = smollm2
    draft = {"prompt-lookup": lambda: PromptLookupDraft(),
             "early-exit": lambda: early_exit_draft(model, 10),
             "int4": lambda: quantized_draft(model, "int4"),
             "head": lambda: load_head_draft(model)}[name]()
    out = generate_speculative(model, draft, prompt, k=4, max_new_tokens=N)
    assert out.tokens == reference, (tok.decode(out.tokens), tok.decode(reference))
    s = out.stats
    assert s.new_tokens == N and s.accepted == sum(s.accepted_per_step)
    assert s.accepted > 0 or name == "early-exit"   # drafts were accepted, not only rejected
    if name in ("prompt-lookup", "head"):           # ... and some rejected: rollbacks happened
        assert s.accepted < s.drafted, s.to_dict()


def test_committed_head_matches_smollm2(smollm2):
    model, _ = smollm2
    head, vocab_ids, meta = load_head(DEFAULT_HEAD, model)
    assert meta["target"]["hidden_size"] == model.config.hidden_size
    assert vocab_ids.numel() == meta["record"]["vocab"]["size"] < model.config.vocab_size
    record = meta["record"]
    assert len(record["curve"]["loss"]) == record["config"]["steps"]
    assert record["final"]["alpha_per_position"][0] > 0.3


def test_train_head_command_smoke(smollm2, tmp_path, monkeypatch):
    """The command end to end at a toy budget: data (the target's answers, features, cache),
    a few steps, evaluation, the file. Loads the model from the session fixture."""
    from tinyserve.speculative import __main__ as cli
    from tinyserve.speculative import features
    monkeypatch.setattr("tinyserve.loader.load_model", lambda *a, **k: smollm2)
    out = tmp_path / "head.safetensors"
    argv = ["train-head", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--steps", "3", "--batch-size", "2", "--window", "16", "--chat-prompts", "2",
            "--heldout-prompts", "1", "--answer-tokens", "4", "--seq-len", "32",
            "--docs-tokens", "64", "--code-tokens", "32", "--eval-every", "3", "--eval-k", "2",
            "--draft-vocab", "512", "--intermediate-size", "64", "--no-progress"]
    assert cli.main(argv) == 0
    head, vocab_ids, meta = load_head(out, smollm2[0])
    rec = meta["record"]
    assert rec["curve"]["step"] == [1, 2, 3] and len(rec["curve"]["loss"]) == 3
    assert all(torch.isfinite(torch.tensor(rec["curve"]["loss"])))
    assert rec["final"]["k"] == 2 and len(rec["final"]["alpha_per_position"]) == 2
    # train: 2 docs chunks (64 / 32), 1 code chunk, 2 chats; held-out: one of each
    assert rec["data"]["sequences"] == 2 + 1 + 2 + 1 + 1 + 1
    assert 0 < vocab_ids.numel() <= 512 + len(smollm2[1].stop_token_ids)
    assert len(list((tmp_path / "cache").glob("features-*.safetensors"))) == 1
    # a second build reads the cached features instead of recomputing them
    cfg = features.TrainConfig(chat_prompts=2, heldout_prompts=1, answer_tokens=4, seq_len=32,
                               docs_tokens=64, code_tokens=32)
    monkeypatch.setattr(features, "self_distill", None)       # would fail if called
    ds = features.build_dataset(smollm2[0], smollm2[1], cfg, tmp_path / "cache", log=lambda *a: 0)
    assert ds["info"] == rec["data"] and ds["feats"].dtype == torch.float16
    assert ds["feats"].shape == (int(ds["offsets"][-1]), smollm2[0].config.hidden_size)
    assert features.TrainConfig().steps > 3   # the committed head was trained for real


def test_bench_suite_cpu_records_consistent_fields(smollm2, tmp_path, monkeypatch, capsys):
    """``python -m tinyserve.bench speculative`` end to end at a toy size: plain and
    speculative outputs compared, the derived fields consistent with the raw ones."""
    import json

    from tinyserve.bench import __main__ as bench_main
    from tinyserve.bench import common
    monkeypatch.setattr("tinyserve.loader.load_model", lambda *a, **k: smollm2)
    argv = ["speculative", "--out", str(tmp_path), "--device", "cpu", "--threads", "1",
            "--drafts", "none,prompt-lookup", "--tasks", "copy", "--prompts", "1",
            "--max-tokens", "12", "--k", "3"]
    threads = torch.get_num_threads()
    try:
        assert bench_main.main(argv) == 0
    finally:                       # --threads 1 set torch's global: put it back
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / f"{common.machine_name('cpu')}-speculative.json").read_text())
    assert data["mode"] == "cpu" and data["env"]["command"].endswith(" ".join(argv))
    rows = {r["draft"]: r for r in data["runs"]}
    assert set(rows) == {"none", "prompt-lookup"}
    for r in rows.values():
        assert r["identical"] and r["new_tokens"] == 12
        assert r["speedup"] == pytest.approx(r["spec_tok_s"] / r["plain_tok_s"])
        assert r["accepted"] <= r["drafted"]
    assert rows["none"]["drafted"] == 0 and rows["none"]["tokens_per_step"] == 1.0
    pl = rows["prompt-lookup"]
    assert pl["tokens_per_step"] == pytest.approx((12 - 1) / pl["steps"])
    assert pl["alpha"] == pytest.approx(pl["accepted"] / pl["drafted"])
    assert data["targets"]["copy_prompt_lookup"]["speedup"] == pl["speedup"]
    assert "speedup" in capsys.readouterr().out

"""The ``tinyserve`` command line, run in-process: generate, chat, info and argument errors.

Tests marked slow use the real SmolLM2 (loaded once per session and handed to the CLI through
``tinyserve.cli.loading.load_llm``); the argument checks and the REPL logic run on a fake LLM.
"""
import io
import re
import sys
from pathlib import Path

import pytest

from tinyserve import cli
from tinyserve.cli import loading


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_llm(smollm2):
    from tinyserve import LLM
    return LLM.from_model(*smollm2)


@pytest.fixture
def use_real(monkeypatch, real_llm):
    """Every model the CLI loads is the session's SmolLM2 (the name is still checked)."""
    calls = []

    def fake_load(model, device="auto", dtype=None, config=None, threads=None):
        calls.append((model, device, dtype))
        return real_llm
    monkeypatch.setattr(loading, "load_llm", fake_load)
    return calls


class FakeLLM:
    """Records the conversations it is asked to continue; replies from a script."""

    def __init__(self, replies=None):
        self.seen = []
        self.replies = list(replies or [])

    def stream_chat(self, messages, params=None, stats=None):
        self.seen.append([dict(m) for m in messages])
        reply = self.replies.pop(0) if self.replies else "ok"
        if isinstance(reply, BaseException):
            yield "partial"
            raise reply
        for i, word in enumerate(reply.split(" ")):
            yield word if i == 0 else " " + word


@pytest.fixture
def fake(monkeypatch):
    llm = FakeLLM()
    monkeypatch.setattr(loading, "load_llm", lambda *a, **k: llm)
    return llm


@pytest.fixture
def no_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("bad arguments must be rejected before loading a model")
    monkeypatch.setattr(loading, "load_llm", fail)


class Recorder(io.StringIO):
    """A stdout that counts write() calls and flushes, to see that text is streamed."""

    def __init__(self):
        super().__init__()
        self.writes, self.flushes = [], 0

    def write(self, s):
        self.writes.append(s)
        return super().write(s)

    def flush(self):
        self.flushes += 1


# ---- bad arguments (fast: no model) ------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--model", "no-such-model"],
    ["generate", "hi", "--model", "missing/model.gguf"],
    ["generate", "hi", "--max-tokens", "0"],
    ["generate", "hi", "--max-tokens", "-3"],
    ["generate", "hi", "--max-tokens", "many"],
    ["generate", "hi", "--top-p", "0"],
    ["generate", "hi", "--top-p", "1.5"],
    ["generate", "hi", "--top-p", "nan"],
    ["generate", "hi", "--temperature", "-1"],
    ["generate", "hi", "--top-k", "-2"],
    ["generate", "hi", "--dtype", "int3"],
    ["generate"],
    ["chat", "--model", "no-such-model"],
    ["chat", "--top-p", "2"],
    ["info", "no-such-model"],
    ["info"],
    ["generate", "hi", "--max-num-seqs", "0"],
    ["generate", "hi", "--block-size", "x"],
    ["generate", "hi", "--kv", "pages"],
    ["generate", "hi", "--max-num-seqs", "8", "--max-num-batched-tokens", "4"],
    ["chat", "--kv", "slots", "--block-size", "8"],
    ["chat", "--kv-cache-tokens", "64", "--kv-cache-bytes", "4096"],
    ["info", "smollm2", "--max-num-seqs", "2"],
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2_with_one_error_line(argv, capsys, no_load):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


def test_engine_flags_name_themselves_in_errors(capsys, no_load):
    assert cli.main(["generate", "hi", "--max-num-seqs", "8",
                     "--max-num-batched-tokens", "4"]) == 2
    assert "--max-num-batched-tokens (4) must be >= --max-num-seqs (8)" in capsys.readouterr().err


def test_engine_flags_reach_the_llm(monkeypatch, capsys, fake):
    """One EngineConfig from the shared flags; none given: LLM's own defaults."""
    from tinyserve import EngineConfig
    seen = []
    monkeypatch.setattr(loading, "load_llm", lambda *a, config=None, threads=None:
                        seen.append(config) or fake)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert cli.main(["chat", "--max-num-seqs", "2", "--kv", "slots", "--max-model-len",
                     "64"]) == 0
    assert cli.main(["chat"]) == 0
    assert seen == [EngineConfig(max_num_seqs=2, max_num_batched_tokens=2048, kv="slots",
                                 max_model_len=64),
                    EngineConfig(max_num_batched_tokens=2048)]


def test_unknown_model_message_names_the_known_models(capsys, no_load):
    assert cli.main(["generate", "hi", "--model", "llama-9000"]) == 2
    err = capsys.readouterr().err
    assert "llama-9000" in err and "smollm2" in err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert cli.main(["generate", "--help"]) == 0
    assert "--max-tokens" in capsys.readouterr().out


# ---- chat REPL logic (fast: fake model) --------------------------------------------------
def test_chat_keeps_history_resets_and_quits(monkeypatch, capsys, fake):
    fake.replies = ["Hello there", "Second answer", "After reset"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nmore\n/reset\nagain\n/exit\nignored\n"))
    assert cli.main(["chat", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert "Hello there" in out and "Second answer" in out and "After reset" in out
    sys_msg = {"role": "system", "content": "Be brief."}
    assert fake.seen[0] == [sys_msg, {"role": "user", "content": "hi"}]
    assert fake.seen[1] == [sys_msg, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "Hello there"},
                            {"role": "user", "content": "more"}]
    assert fake.seen[2] == [sys_msg, {"role": "user", "content": "again"}]  # after /reset
    assert len(fake.seen) == 3  # nothing after /exit


def test_chat_eof_quits(monkeypatch, capsys, fake):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert cli.main(["chat"]) == 0
    assert len(fake.seen) == 1 and fake.seen[0] == [{"role": "user", "content": "hi"}]


def test_chat_skips_a_line_that_is_not_utf8(monkeypatch, capsys, fake):
    """Bytes that are not UTF-8 reach input() as lone surrogates (surrogateescape): the
    tokenizer used to fail with "TextInputSequence must be str"."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("bad \udcff\nhi\n"))
    assert cli.main(["chat"]) == 0
    assert fake.seen == [[{"role": "user", "content": "hi"}]]
    assert "not valid UTF-8" in capsys.readouterr().err


def test_chat_ctrl_c_stops_the_reply_not_the_session(monkeypatch, capsys, fake):
    fake.replies = [KeyboardInterrupt(), "fine"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("long story\nnext\n/exit\n"))
    assert cli.main(["chat"]) == 0
    out, err = capsys.readouterr()
    assert "partial" in out and "fine" in out and "stopped" in err
    # the part of the reply that was shown stays in the history
    assert fake.seen[1][1] == {"role": "assistant", "content": "partial"}


# ---- the real model ----------------------------------------------------------------------
@pytest.mark.slow
def test_generate_streams_text_then_stats(monkeypatch, capsys, use_real, real_llm):
    from tinyserve import SamplingParams
    prompt = "The capital of France is"
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    rc = cli.main(["generate", prompt, "--max-tokens", "12", "--temperature", "0"])
    err = capsys.readouterr().err
    assert rc == 0
    text = rec.getvalue()
    assert text.strip()
    assert len([w for w in rec.writes if w]) > 2 and rec.flushes > 2  # streamed, not at the end
    # the same text as the offline API gives for the same greedy request
    want = real_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0]
    assert text == want.text + "\n"
    n_prompt = len(real_llm.tokenizer.encode(prompt))
    assert re.search(rf"prompt tokens: {n_prompt}, generated tokens: {len(want.token_ids)}\b",
                     err), err
    assert re.search(r"time to first token: \d+ ms", err)
    assert re.search(r"decode: [\d.]+ tok/s", err), err
    assert use_real == [("smollm2", "auto", "auto")]


@pytest.mark.slow
def test_generate_chat_answers_paris(capsys, use_real):
    rc = cli.main(["generate", "What is the capital of France?", "--chat", "-t", "0", "-n", "16",
                   "--seed", "0", "--top-k", "5", "--top-p", "0.9"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "Paris" in out
    assert "tok/s" in err


@pytest.mark.slow
def test_chat_repl_answers_paris(monkeypatch, capsys, use_real):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n/exit\n"))
    assert cli.main(["chat", "--temperature", "0", "--max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out


@pytest.mark.slow
def test_info_prints_the_real_numbers(capsys, use_real, real_llm):
    assert cli.main(["info", "smollm2"]) == 0
    out = capsys.readouterr().out
    model, cfg = real_llm.model, real_llm.model.config
    n = sum(p.numel() for p in model.parameters())  # what was actually loaded
    assert cfg.num_parameters() == n

    def row(label):
        m = re.search(rf"^\s*{label}\s+(.+)$", out, re.M)
        assert m, f"no {label!r} line in:\n{out}"
        return m.group(1)
    assert row("num_layers") == "30"
    assert row("hidden_size") == "576"
    assert row("num_heads") == "9" and row("num_kv_heads") == "3"
    assert row("vocab_size") == "49152"
    assert row("from config").startswith(f"{n:,}")
    assert row("loaded tensors").startswith(f"{n:,}")
    assert row("fp32").startswith(f"{4 * n:,}")
    assert row("bf16").startswith(f"{2 * n:,}")
    size = Path(model.source).stat().st_size
    assert f"on disk: {size:,} bytes" in out
    packed = model.packed_weights
    for qtype in {pt.qtype for pt in packed.values()}:
        nbytes = sum(pt.nbytes for pt in packed.values() if pt.qtype == qtype)
        assert re.search(rf"{qtype}\s+\d+ tensors .* {nbytes:,} bytes", out), qtype
    kv16 = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    assert re.search(rf"bf16\s+{kv16:,} bytes", out)
    assert re.search(rf"fp32\s+{2 * kv16:,} bytes", out)
    assert f"tokenizer vocab size: {real_llm.tokenizer.vocab_size:,}" in out

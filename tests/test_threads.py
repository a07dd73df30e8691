"""Thread choice (tinyserve.threads): the default follows the affinity mask, not torch's core
count; counts are checked; LLM(threads=), the CLI's and the benchmarks' --threads apply them;
a busy machine is named. The machine is faked (affinity, core count, load average) so every
test means the same on any host."""
import argparse
import io
import os
import sys

import pytest
import torch

from tinyserve import threads
from tinyserve.bench import common
from tinyserve.cli import loading
import tinyserve.llm as llm_mod

import _fixtures as fx

BAD = [0, -1, 2.5, True, False, "2", [2]]


@pytest.fixture(autouse=True)
def torch_threads_back():
    """Every test here sets torch's process-wide count: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: ``machine(cores=4, affinity=2, load=0.0)``; OMP_NUM_THREADS unset."""
    def make(cores=2, affinity=None, load=0.0):
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        mask = set(range(cores if affinity is None else affinity))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: mask, raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load), raising=False)
    return make


# ---- the default -------------------------------------------------------------------------
def test_default_follows_the_affinity_mask_not_the_core_count(machine):
    machine(cores=8, affinity=1)             # `taskset -c 0` on an 8-core machine
    assert threads.usable_cores() == 1 and threads.default_threads() == 1
    machine(cores=2, affinity=3)             # more than torch would choose here
    assert threads.default_threads() == 3
    assert threads.set_threads(None) == 3 and torch.get_num_threads() == 3


def test_default_without_sched_getaffinity_is_the_core_count(machine, monkeypatch):
    machine(cores=6)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)   # macOS, Windows
    assert threads.usable_cores() == 6 and threads.default_threads() == 6


def test_omp_num_threads_wins_when_valid(machine, monkeypatch):
    machine(cores=4)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # how the test runner shares out cores
    assert threads.default_threads() == 1
    for junk in ("4,2", "0", "many", ""):
        monkeypatch.setenv("OMP_NUM_THREADS", junk)
        assert threads.default_threads() == 4, junk


def test_default_never_subtracts_the_load(machine):
    machine(cores=2, load=1.7)
    assert threads.default_threads() == 2      # warned about instead (below)


# ---- checking and applying a count -------------------------------------------------------
@pytest.mark.parametrize("bad", BAD)
def test_set_threads_rejects_what_is_not_a_count(bad):
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match=r"threads must be an integer >= 1 .* got "):
        threads.set_threads(bad)
    assert torch.get_num_threads() == 1       # nothing applied


def test_set_threads_applies_and_returns_the_count():
    assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
    assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1


# ---- LLM(threads=) -----------------------------------------------------------------------
@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    c = fx.tiny_config()
    return str(fx.write_gguf(tmp_path / "t.gguf", c, fx.random_state(c), "F32"))


@pytest.fixture
def load_spy(monkeypatch):
    """Records torch's thread count when LLM starts loading (the real load still runs)."""
    seen, real = [], llm_mod.load_model

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)
    monkeypatch.setattr(llm_mod, "load_model", spy)
    return seen


def test_llm_sets_threads_before_loading(tiny_gguf, load_spy, machine):
    from tinyserve import LLM, SamplingParams
    machine(cores=2, affinity=3)
    torch.set_num_threads(2)
    llm = LLM(tiny_gguf, device="cpu", dtype=torch.float32, threads=1)
    assert load_spy == [1] and torch.get_num_threads() == 1
    out = llm.generate("the", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2
    LLM(tiny_gguf, device="cpu", dtype=torch.float32)          # None: default_threads()
    assert load_spy == [1, 3] and torch.get_num_threads() == 3


@pytest.mark.parametrize("bad", BAD)
def test_llm_rejects_a_bad_count_before_loading(bad, load_spy):
    from tinyserve import LLM
    with pytest.raises(ValueError, match="threads must be"):
        LLM("no-such-model", threads=bad)
    assert load_spy == []


# ---- the CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "-1", "2.5", "two"])
def test_cli_bad_threads_exit_2_with_one_line(value, capsys, monkeypatch):
    from tinyserve import cli

    def fail(*a, **k):
        raise AssertionError("bad arguments must be rejected before loading a model")
    monkeypatch.setattr(loading, "load_llm", fail)
    assert cli.main(["generate", "hi", "--threads", value]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "--threads" in lines[0]


def test_cli_threads_reach_the_llm(capsys, monkeypatch):
    from tinyserve import cli
    seen = []
    monkeypatch.setattr(loading, "load_llm",
                        lambda *a, config=None, threads=None: seen.append(threads) or object())
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert cli.main(["chat", "--threads", "3"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert cli.main(["chat"]) == 0
    assert seen == [3, None]                  # None: LLM's default_threads()


# ---- busy machine ------------------------------------------------------------------------
def test_busy_warning_when_load_plus_threads_exceed_the_cores(machine):
    machine(cores=2, load=5.0)
    w = threads.busy_warning(1)
    assert w and "\n" not in w and "--threads 1" in w and "5.00" in w
    machine(cores=2, load=1.0)                 # one core taken: one thread fits, two do not
    assert threads.busy_warning(1) is None
    assert "--threads 1" in threads.busy_warning(2)
    machine(cores=2, load=0.3)                 # an idle machine's background noise
    assert threads.busy_warning(2) is None
    machine(cores=2, load=0.6)                 # but most of a core is taken
    assert threads.busy_warning(2) is not None
    assert threads.busy_warning(3) is not None  # more threads than cores: busy by itself
    machine(cores=64, affinity=2, load=30.0)   # a cpuset on a big host: the load is elsewhere
    assert threads.busy_warning(2) is None


def test_no_load_average_no_warning(machine, monkeypatch):
    machine(cores=2)
    monkeypatch.delattr(os, "getloadavg")
    assert threads.load_average() is None and threads.busy_warning(8) is None
    assert "n/a" in threads.describe(2)


def test_bench_start_logs_threads_load_and_warning(machine, capsys):
    machine(cores=2, affinity=1, load=3.0)
    args = argparse.Namespace(device="cpu", threads=None, argv=["x"])
    device, env = common.start(args)
    err = capsys.readouterr().err.splitlines()
    assert torch.get_num_threads() == 1        # the affinity, not torch's choice
    assert err[0] == "threads: 1 (usable cores: 1, load average 1 min: 3.00)"
    assert err[1].startswith("warning: machine busy") and len(err) == 2
    assert env["torch_threads"] == 1 and env["cpu_count"] == 1 and env["load_avg_1m"] == 3.0
    machine(cores=2, load=0.0)
    common.start(argparse.Namespace(device="cpu", threads=2, argv=None))
    err = capsys.readouterr().err.splitlines()
    assert err == ["threads: 2 (usable cores: 2, load average 1 min: 0.00)"]
    assert torch.get_num_threads() == 2

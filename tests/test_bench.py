"""``python -m tinyserve.bench``: the suites run end to end and write the result file.

These check that the benchmark works, not how fast anything is (speed is never a test).
"""
import json

import pytest

from tinyserve.bench import SUITES
from tinyserve.bench import __main__ as bench_main
from tinyserve.bench import common


def test_unknown_suite_is_a_clear_error(capsys):
    assert bench_main.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown suite 'nope'") and "generate" in err
    assert bench_main.main([]) == 2


def test_bad_arguments_are_errors(capsys):
    assert bench_main.main(["generate", "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert bench_main.main(["generate", "--model", "no-such-model", "--no-hf"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_every_suite_has_the_interface():
    import importlib
    for name, modname in SUITES.items():
        mod = importlib.import_module(modname)
        assert mod.NAME == name and mod.HELP
        assert callable(mod.add_arguments) and callable(mod.run)


def test_common_helpers(tmp_path):
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.machine_name("cpu") == f"cpu-{common.num_cpus()}core"
    assert common.summarize([3, 1, 2])["median"] == 2
    p = common.write_result({"x": 1.5}, tmp_path / "sub", "cpu-2core", "demo")
    assert p.name == "cpu-2core-demo.json" and json.loads(p.read_text()) == {"x": 1.5}
    assert not list(p.parent.glob("*.tmp"))


def _check_result(data, argv, hf: bool):
    assert data["suite"] == "generate"
    env = data["env"]
    for key in ("date", "command", "python", "platform", "versions", "device", "machine", "cpu",
                "cpu_count", "torch_threads", "gpu"):
        assert key in env, key
    for key in ("tinyserve", "torch", "transformers"):
        assert key in env["versions"]
    assert env["command"].endswith(" ".join(argv))
    assert env["torch_threads"] >= 1
    cfg = data["config"]
    assert cfg["max_tokens"] == 4 and cfg["repeats"] == 1 and cfg["batch_size"] == 1
    assert cfg["prompt_tokens"] > 0
    ours = data["results"]["tinyserve"]
    for key in ("ttft_s", "decode_tok_s", "e2e_tok_s", "decode_tok_s_stats"):
        assert ours[key]["median"] > 0, key
        assert len(ours[key]["values"]) == 1
    assert ours["stats"]["generated_tokens"] == 4  # forced: ignore_eos
    assert len(data["tokens"]["tinyserve"]) == 4
    theirs = data["results"]["transformers"]
    if hf:
        for key in ("ttft_s", "decode_tok_s", "e2e_tok_s"):
            assert theirs[key]["median"] > 0, key
        assert len(data["tokens"]["transformers"]) == 4  # forced: min_new_tokens
        assert set(data["ratio_ours_over_hf"]) == {"decode", "end_to_end", "ttft"}
        assert data["ratio_ours_over_hf"]["decode"] > 0
        # same weights, same greedy path (the model-vs-HF tests check this in depth)
        assert data["greedy_agreement"]["same_tokens"], data["tokens"]
    else:
        assert theirs == {"skipped": "--no-hf"}
        assert data["ratio_ours_over_hf"] is None


@pytest.mark.slow
def test_generate_suite_no_hf_writes_json(tmp_path, capsys, smollm2_file):
    argv = ["generate", "--max-tokens", "4", "--repeats", "1", "--out", str(tmp_path),
            "--no-hf", "--device", "cpu", "--model", smollm2_file]
    assert bench_main.main(argv) == 0
    files = list(tmp_path.glob("*-generate.json"))
    assert [f.name for f in files] == [f"{common.machine_name('cpu')}-generate.json"]
    _check_result(json.loads(files[0].read_text()), argv, hf=False)
    out = capsys.readouterr().out
    assert "tinyserve" in out and "decode tok/s" in out


@pytest.mark.slow
def test_generate_suite_with_hf(tmp_path, capsys, monkeypatch, smollm2, hf_smollm2):
    """Same run with HF transformers; the two models come from the session fixtures (the
    loading paths are what the suite calls, and are tested on their own elsewhere)."""
    import tinyserve.loader
    from tinyserve.bench import generate as suite
    monkeypatch.setattr(tinyserve.loader, "load_model", lambda *a, **k: smollm2)
    monkeypatch.setattr(suite, "load_hf", lambda *a, **k: hf_smollm2[0])
    argv = ["generate", "--max-tokens", "4", "--repeats", "1", "--out", str(tmp_path),
            "--device", "cpu"]
    assert bench_main.main(argv) == 0
    (f,) = tmp_path.glob("*-generate.json")
    _check_result(json.loads(f.read_text()), argv, hf=True)
    assert "ratio ours/HF" in capsys.readouterr().out

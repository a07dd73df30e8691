"""figures/ is drawn from benchmarks/results/*.json by `python -m tinyserve.bench figures`
(`make figures`): every committed result has its figures, the command redraws exactly the
committed PNGs, and a result it cannot draw stops it with a clear error.

Why bytes and not pixels with a tolerance: measured here, changing only the date in a title
moves a figure by an RMS of 1.0-1.6 (of 255) and a 5% change in one number by 2.4-12.6, while
a different text rasterisation (FreeType hinting) moves the same unchanged figure by 31-39.
No tolerance tells a stale figure from a new renderer, so the check is exact: pixels must be
identical when matplotlib and FreeType (what rasterises) are the versions that drew
figures/ (recorded in figures/MANIFEST.json), and bytes identical when Pillow (what encodes
the PNG) is too. Under another renderer the exact check is skipped with the reason (redraw
with `make figures`); the file set, the image sizes and run-to-run determinism are still checked.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyserve.bench import __main__ as bench_main
from tinyserve.bench import plots
from tinyserve.bench.figures import MANIFEST, renderer_versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS, FIGURES = ROOT / "benchmarks" / "results", ROOT / "figures"


def _pngs(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.png"))


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))


@pytest.fixture(scope="module")
def redrawn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    assert bench_main.main(["figures", "--results", str(RESULTS), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIGURES / MANIFEST).read_text())


def test_every_result_has_its_figures(redrawn, manifest):
    results = sorted(f.name for f in RESULTS.glob("*.json"))
    assert results, "no committed results"
    assert sorted(manifest["figures"]) == results, "figures/ is stale: run `make figures`"
    for name, figs in manifest["figures"].items():
        stem = name[:-len(".json")]
        assert figs, name
        for fig in figs:   # named after its result file: <stem>.png or <stem>-<part>.png
            assert fig in (f"{stem}.png",) or fig.startswith(f"{stem}-"), (name, fig)
            assert (FIGURES / fig).is_file(), f"{fig} not committed"
    listed = sorted(f for figs in manifest["figures"].values() for f in figs)
    assert _pngs(FIGURES) == listed, "a PNG in figures/ that no result draws"
    assert _pngs(redrawn) == listed
    assert json.loads((redrawn / MANIFEST).read_text())["figures"] == manifest["figures"]


def test_committed_figures_are_what_the_command_draws(redrawn, manifest):
    for name in _pngs(FIGURES):   # sizes come from figsize and dpi alone: any renderer
        assert _pixels(FIGURES / name).shape == _pixels(redrawn / name).shape, name
    drew, here = manifest["renderer"], renderer_versions()
    if any(drew[k] != here[k] for k in ("matplotlib", "freetype")):
        pytest.skip(f"figures/ was drawn with {drew}, this environment has {here}: exact "
                    f"comparison needs the same renderer (redraw with `make figures`)")
    for name in _pngs(FIGURES):
        assert np.array_equal(_pixels(FIGURES / name), _pixels(redrawn / name)), (
            f"figures/{name} differs from what its result draws: run `make figures`")
        if drew["pillow"] == here["pillow"]:
            assert (FIGURES / name).read_bytes() == (redrawn / name).read_bytes(), name


def test_redrawing_gives_the_same_bytes(redrawn, tmp_path):
    """Deterministic in any environment: no date, version or random state in the file."""
    result = plots.load_result(RESULTS / "cpu-2core-serving.json")
    for path in plots.plot_result(result, tmp_path):
        assert path.read_bytes() == (redrawn / path.name).read_bytes(), path.name
        assert b"Software" not in path.read_bytes() and b"tIME" not in path.read_bytes()


@pytest.mark.parametrize("file_name, suite, message", [
    ("cpu-2core-nope.json", "nope", "no plotter for suite 'nope'"),
    ("cpu-2core-all.json", "all", "only lists the result files"),
    ("renamed.json", "generate", "file name should be cpu-2core-generate.json"),
])
def test_a_result_it_cannot_draw_fails_loudly(tmp_path, capsys, file_name, suite, message):
    results, out = tmp_path / "results", tmp_path / "figures"
    results.mkdir()
    data = json.loads((RESULTS / "cpu-2core-generate.json").read_text())
    (results / file_name).write_text(json.dumps({**data, "suite": suite}))
    assert bench_main.main(["figures", "--results", str(results), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert file_name in err and message in err, err
    assert not (out / MANIFEST).exists()


def test_no_results_is_an_error(tmp_path, capsys):
    assert bench_main.main(["figures", "--results", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err


def test_stale_figures_of_a_removed_result_are_deleted(tmp_path):
    results, out = tmp_path / "results", tmp_path / "figures"
    results.mkdir()
    out.mkdir()
    shutil.copy(RESULTS / "cpu-2core-generate.json", results)
    # as left by an earlier run that drew a result file since removed
    (out / MANIFEST).write_text(json.dumps({"figures": {"cpu-2core-old.json":
                                                        ["cpu-2core-old.png"]}}))
    (out / "cpu-2core-old.png").write_bytes(b"stale")
    (out / "notes.png").write_bytes(b"not ours")               # never drawn by us: kept
    assert bench_main.main(["figures", "--results", str(results), "--out", str(out)]) == 0
    assert _pngs(out) == ["cpu-2core-generate.png", "notes.png"]


# The GPU run (benchmarks/gpu_check.sh) also writes `quant` results and `speculative` results in
# GPU mode; none is committed yet, so draw ones made here by the same code on the CPU.
def test_quant_and_gpu_mode_speculative_results_are_drawn(tmp_path):
    from tinyserve.bench.common import env_info
    from tinyserve.bench.speculative_gpu import run_gpu
    assert bench_main.main(["quant", "--device", "cpu", "--threads", "1", "--model", "tiny-mha",
                            "--formats", "int4-g64", "--batch-sizes", "1",
                            "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                            "--out", str(tmp_path)]) == 0
    quant = plots.load_result(next(tmp_path.glob("*-quant.json")))
    args = argparse.Namespace(k="3", drafts="prompt-lookup", gpu_models="tiny",
                              alpha_from=str(RESULTS / "cpu-2core-speculative.json"),
                              repeats=1, budget_s=None)
    spec = run_gpu(args, torch.device("cpu"), env_info("cpu"))
    assert spec["mode"] == "gpu" and spec["predicted"]
    for result in (quant, spec):
        paths = plots.plot_result(result, tmp_path / "figs")
        assert [p.name for p in paths] == [f"{result['env']['machine']}-{result['suite']}.png"]
        assert _pixels(paths[0]).shape[0] > 300

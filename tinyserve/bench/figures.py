"""``python -m tinyserve.bench figures``: redraw every committed result into ``figures/``.

    python -m tinyserve.bench figures [--results benchmarks/results] [--out figures]
    make figures

Measures nothing and draws the same bytes every time (see ``plots.style``/``plots.save``):
each ``<results>/<machine>-<suite>.json`` is drawn by its suite's plotter (``plots.PLOTTERS``)
into ``<out>/<machine>-<suite>[-<part>].png``. A result whose suite has no plotter, or whose
file is not named ``<machine>-<suite>.json``, fails the command: a figure that is silently
missing would read as a result never measured. ``<out>/MANIFEST.json`` records which figures
each result file gave and the versions that drew them (tests/test_figures.py reads it); a PNG
the previous manifest listed and no result draws any more is deleted.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import DEFAULT_OUT
from .plots import load_result, plot_result

NAME = "figures"
HELP = "redraw every committed result (benchmarks/results/*.json) into figures/"
MANIFEST = "MANIFEST.json"


def add_arguments(p) -> None:
    p.add_argument("--results", default=str(DEFAULT_OUT),
                   help=f"directory of result JSON files (default: {DEFAULT_OUT})")
    p.set_defaults(out="figures")   # for this command --out is the figures directory


def renderer_versions() -> dict:
    """What turns the same figure into the same bytes: the PNG depends on all three."""
    import matplotlib
    import PIL
    from matplotlib import ft2font
    return {"matplotlib": matplotlib.__version__, "pillow": PIL.__version__,
            "freetype": ft2font.__freetype_version__}


def draw_all(results_dir, out_dir) -> dict:
    """Draw every result file's figures; returns (and writes) the manifest."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise ValueError(f"{results_dir}: no result files (*.json) to draw")
    drawn, errors = {}, []
    for f in files:
        try:
            result = load_result(f)
            stem = f"{result['env'].get('machine')}-{result['suite']}"
            if f.stem != stem:   # figures are named after the result file they come from
                raise ValueError(f"file name should be {stem}.json (its machine and suite)")
            drawn[f.name] = sorted(p.name for p in plot_result(result, out_dir))
        except (ValueError, KeyError, TypeError) as e:   # KeyError: a field the plotter needs
            errors.append(f"{f}: {type(e).__name__ + ': ' if not isinstance(e, ValueError) else ''}"
                          f"{e}")
    if errors:
        raise ValueError("cannot draw every result:\n  " + "\n  ".join(errors))
    old = out_dir / MANIFEST
    if old.is_file():
        now = {n for names in drawn.values() for n in names}
        for names in json.loads(old.read_text()).get("figures", {}).values():
            for n in set(names) - now:
                (out_dir / n).unlink(missing_ok=True)
    manifest = {"command": "python -m tinyserve.bench figures",
                "renderer": renderer_versions(), "figures": drawn}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def run(args) -> None:
    manifest = draw_all(args.results, args.out)
    for name, figs in manifest["figures"].items():
        print(f"{name} -> {', '.join(figs)}")
    return None

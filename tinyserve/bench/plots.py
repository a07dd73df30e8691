"""Figures drawn from result dicts, so a committed JSON can be redrawn on any machine.

    python -m tinyserve.bench plot benchmarks/results/nvidia-h100-80gb-hbm3-ops.json [--out figures]

    ops      one figure per op: fraction of the measured copy bandwidth, per case and impl
    decode   one figure: decode tokens/s as a fraction of the bandwidth ceiling, per model and
             batch, for ours (with and without CUDA graph) and HF transformers
    serving  throughput per system, and latency p50/p99 against the arrival rate
    all      the figures of each suite result it embeds
Figures are written as ``<dir>/<machine>-<suite>[-<op>].png``. ``--out`` (default figures/)
also receives ``<machine>-plot.json``: which figures were drawn from which result files.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "plot"
HELP = "redraw the figures of result JSON files (ops, decode, all) into figures/"


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="result JSON files written by the ops/decode/all suites")
    p.set_defaults(out="figures")   # for this command --out is the figures directory


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: works on headless machines and in tests
    import matplotlib.pyplot as plt
    return plt


def _subtitle(result: dict) -> str:
    env = result.get("env", {})
    v = env.get("versions", {})
    return (f"{env.get('gpu') or env.get('cpu', '?')} | torch {v.get('torch')} triton "
            f"{v.get('triton')} | {str(env.get('date', ''))[:10]}")


def _bars(ax, groups: list[str], series: dict[str, list], ylabel: str, labels=None):
    """Grouped bars: ``series[name][i]`` is group i's value (None = no bar, marked 'n/a')."""
    n = max(1, len(series))
    width = 0.8 / n
    for j, (name, vals) in enumerate(series.items()):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        hs = [0 if v is None else v for v in vals]
        bars = ax.bar(xs, hs, width, label=name)
        for k, (b, v) in enumerate(zip(bars, vals)):
            text = "n/a" if v is None else (labels[name][k] if labels else None)
            if text:
                ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.axhline(100, color="gray", lw=0.8, ls="--")   # the measured ceiling
    top = max([v for vals in series.values() for v in vals if v is not None], default=100)
    ax.set_ylim(0, max(110.0, 1.25 * top))           # room for the labels above the bars
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing measured (see the JSON for why)", transform=ax.transAxes,
                ha="center")


def plot_ops(result: dict, fig_dir) -> list[Path]:
    plt = _pyplot()
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    machine = result["env"]["machine"]
    by_op: dict[str, list] = {}
    for c in result["cases"]:
        by_op.setdefault(c["op"], []).append(c)
    paths = []
    for op, cases in by_op.items():
        impls = list(dict.fromkeys(i for c in cases for i in c.get("impls", {})))
        series = {i: [] for i in impls}
        labels = {i: [] for i in impls}
        for c in cases:
            for i in impls:
                e = c.get("impls", {}).get(i, {})
                ok = "frac_bw" in e
                series[i].append(100 * e["frac_bw"] if ok else None)
                labels[i].append(f"{e['time_us']:.0f}us" if ok else None)
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases) + 2), 4.5))
        _bars(ax, [c["name"] for c in cases], series, "% of measured copy bandwidth", labels)
        bw = result["roofline"]["copy_bandwidth_Bps"] / 1e9
        ax.set_title(f"{op}: bytes moved / time, vs copy {bw:.0f} GB/s\n{_subtitle(result)}",
                     fontsize=9)
        fig.tight_layout()
        path = fig_dir / f"{machine}-ops-{op}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


DECODE_SERIES = (("ours_graph", "tinyserve + CUDA graph"), ("ours", "tinyserve"),
                 ("hf", "HF transformers"))


def plot_decode(result: dict, fig_dir) -> list[Path]:
    plt = _pyplot()
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    groups = [f"{r['model']} B={r['batch']}" for r in runs]
    series, labels = {}, {}
    for key, label in DECODE_SERIES:
        vals, texts = [], []
        for r in runs:
            s = r.get(key) or {}
            ok = "frac_ceiling" in s
            vals.append(100 * s["frac_ceiling"] if ok else None)
            texts.append(f"{s['decode_tok_s']:.0f} tok/s" if ok else None)
        if any(v is not None for v in vals):
            series[label], labels[label] = vals, texts
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) + 2), 4.5))
    _bars(ax, groups, series, "% of bandwidth ceiling (tokens/s)", labels)
    ax.set_title(f"decode: tokens/s vs weights+KV bytes per step at copy bandwidth\n"
                 f"{_subtitle(result)}", fontsize=9)
    fig.tight_layout()
    path = fig_dir / f"{result['env']['machine']}-decode.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_result(result: dict, fig_dir) -> list[Path]:
    suite = result.get("suite")
    if suite == "ops":
        return plot_ops(result, fig_dir)
    if suite == "decode":
        return plot_decode(result, fig_dir)
    if suite == "serving":
        from .serving import plot
        return plot(result, fig_dir)
    if suite == "all":
        return [p for sub in result.get("results", {}).values()
                if isinstance(sub, dict) and sub.get("suite") in ("ops", "decode")
                for p in plot_result(sub, fig_dir)]
    return []


def run(args) -> dict:
    """Redraw figures from result files; returns None (there is no new result to save)."""
    for f in args.files:
        try:
            result = json.loads(Path(f).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not a JSON result file: {e}") from None
        if not isinstance(result, dict) or "suite" not in result or "env" not in result:
            raise ValueError(f"{f}: not a tinyserve.bench result (no 'suite'/'env')")
        paths = plot_result(result, args.out)
        if not paths:
            raise ValueError(f"{f}: suite {result['suite']!r} has no figures "
                             f"(plotted: ops, decode, serving, all)")
        for p in paths:
            print(p)
    return None

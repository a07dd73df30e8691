"""Figures drawn from result dicts, so a committed JSON can be redrawn on any machine.

    python -m tinyserve.bench plot benchmarks/results/<machine>-<suite>.json [--out figures]
    python -m tinyserve.bench figures      # every committed result -> figures/ (figures.py)

One plotter per suite (``PLOTTERS``); a suite without one is an error, never a silent skip:
    ops            one figure per op: fraction of the measured copy bandwidth, per case and impl
    decode         decode tokens/s as a fraction of the bandwidth ceiling, per model and batch,
                   for ours (with and without CUDA graph) and HF transformers
    serving        (drawn by serving.plot) throughput per system, latency against arrival rate
    generate       batch-1 decode tokens/s and time to first token, tinyserve vs HF transformers
    speculative    speedup against K per draft and task: measured (CPU mode) or predicted from
                   GPU step times and the CPU's tokens per step (GPU mode)
    paged          sequences holding KV and KV tokens reserved/used over time, slots vs paged;
                   time to first token with and without the prefix cache
    quant          quantized decode: % of the bandwidth ceiling and model size per format
    quant-quality  perplexity, agreement with the reference and size per quantization method
(serving's plotter lives in serving.py; speculative's and quant-quality's in
plots_tradeoffs.py.) Figures are written as ``<dir>/<machine>-<suite>[-<op>].png``, drawn the
same way every time (``style`` and ``save``: matplotlib's default style, DejaVu Sans, fixed
size and dpi, no version or date written into the PNG), so redrawing an unchanged result gives
the same bytes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

NAME = "plot"
HELP = "redraw the figures of result JSON files (ops, decode, all) into figures/"


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="result JSON files written by the ops/decode/all suites")
    p.set_defaults(out="figures")   # for this command --out is the figures directory


DPI = 120
# matplotlib's bundled font, so the same text renders the same on every machine
STYLE = {"font.family": "DejaVu Sans", "font.sans-serif": ["DejaVu Sans"]}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: works on headless machines and in tests
    import matplotlib.pyplot as plt
    return plt


@contextlib.contextmanager
def style():
    """matplotlib's default style plus ``STYLE``, whatever the user's matplotlibrc says."""
    import matplotlib
    import matplotlib.style
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        yield


def save(fig, path) -> Path:
    """Write ``fig`` as a PNG that depends only on what was drawn: matplotlib writes its version
    into the file unless told not to ("Software"); the Agg PNG carries no date."""
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    pyplot().close(fig)
    return Path(path)


def subtitle(result: dict) -> str:
    """The machine (card, or CPU and threads), the versions and the date of a result."""
    env = result.get("env", {})
    v = env.get("versions", {})
    if env.get("gpu"):
        where = f"{env['gpu']}"
    else:
        where = (f"{env.get('cpu', '?')} CPU, {env.get('cpu_count', '?')} cores, "
                 f"{env.get('torch_threads', '?')} torch thread(s)")
    return (f"{env.get('machine', '?')}: {where} | torch {v.get('torch')} triton "
            f"{v.get('triton')} | {str(env.get('date', ''))[:10]}")


def _dir(fig_dir) -> Path:
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    return fig_dir


def figure_path(result: dict, fig_dir, part: str = "") -> Path:
    """``<dir>/<machine>-<suite>[-<part>].png``: named after the result file it is drawn from."""
    name = f"{result['env']['machine']}-{result['suite']}" + (f"-{part}" if part else "")
    return _dir(fig_dir) / f"{name}.png"


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
    plt = pyplot()
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
        ax.set_title(f"{op}: bytes moved / time, vs copy {bw:.0f} GB/s\n{subtitle(result)}",
                     fontsize=9)
        fig.tight_layout()
        paths.append(save(fig, figure_path(result, fig_dir, op)))
    return paths


DECODE_SERIES = (("ours_graph", "tinyserve + CUDA graph"), ("ours", "tinyserve"),
                 ("hf", "HF transformers (same run)"))


def plot_decode(result: dict, fig_dir) -> list[Path]:
    plt = pyplot()
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
                 f"{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]


def _annotate(ax, bars, texts, fontsize=7, rotation=0):
    for b, t in zip(bars, texts):
        ax.annotate(t, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=fontsize, rotation=rotation)


def plot_generate(result: dict, fig_dir) -> list[Path]:
    """Median decode tokens/s and time to first token, whiskers min..max over the repeats."""
    plt = pyplot()
    c, res = result["config"], result["results"]
    sides = [(k, label) for k, label in (("tinyserve", "tinyserve"),
                                         ("transformers", "HF transformers\n(same run)"))
             if k in res]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, key, scale, ylabel, fmt in (
            (axes[0], "decode_tok_s", 1.0, "decode tokens / s (after the first token)", ".1f"),
            (axes[1], "ttft_s", 1e3, "time to first token (ms, prefill)", ".1f")):
        med = [scale * res[k][key]["median"] for k, _ in sides]
        err = [[m - scale * res[k][key]["min"] for m, (k, _) in zip(med, sides)],
               [scale * res[k][key]["max"] - m for m, (k, _) in zip(med, sides)]]
        bars = ax.bar([label for _, label in sides], med, yerr=err, capsize=4,
                      color=["C0", "C2"][:len(sides)])
        for b, m in zip(bars, med):   # inside the bar: the whiskers sit on its top
            ax.annotate(format(m, fmt), (b.get_x() + b.get_width() / 2, m / 2), ha="center",
                        va="center", fontsize=10, color="white")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.2 * max(med + [1e-9]))
    agree = result.get("greedy_agreement", {})
    fig.suptitle(f"generate: {c['model']} batch {c['batch_size']}, {c['decoding']}, "
                 f"{c['prompt_tokens']}-token prompt + {c['max_tokens']} new tokens, "
                 f"{c['dtype']} on {c['device']}\nmedian of {c['repeats']} runs (whiskers: min"
                 f"..max); same greedy tokens: {agree.get('common_prefix')}/{agree.get('of')}"
                 f"\n{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]


def _timeline(series: list) -> tuple[list, list]:
    """Samples ``[seconds, ...]`` -> (start of each forward, the samples): a sample is taken
    before its forward and holds until the next one."""
    t, starts = 0.0, []
    for row in series:
        starts.append(t)
        t += row[0]
    return starts, series


def plot_paged(result: dict, fig_dir) -> list[Path]:
    plt = pyplot()
    c, res, series = result["config"], result["results"], result["series"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for s, color, label in (("slots", "C1", "contiguous slots"), ("paged", "C0", "paged blocks")):
        if s not in series:
            continue
        t, rows = _timeline(series[s])
        axes[0].step(t, [r[1] for r in rows], where="post", color=color,
                     label=f"{label}: max {res[s]['max_seqs']}, mean {res[s]['mean_seqs']:.1f}")
        axes[1].step(t, [r[2] for r in rows], where="post", color=color,
                     label=f"{label}: reserved ({100 * res[s]['waste_time_avg']:.1f}% of it "
                           f"unused, time-averaged)")
        axes[1].step(t, [r[3] for r in rows], where="post", color=color, ls=":",
                     label=f"{label}: used by tokens")
    axes[0].set_ylabel("sequences holding KV")
    axes[1].set_ylabel("KV cache tokens")
    axes[1].axhline(c["kv_budget_tokens"], color="gray", ls="--", lw=0.8, label="KV budget")
    for ax in axes[:2]:
        ax.set_xlabel("time inside forward passes (s, cumulative)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    axes[0].set_title(f"{c['num_requests']} requests at once", fontsize=9)
    axes[1].set_title("KV tokens reserved vs used", fontsize=9)
    p = result["prefix_caching"]
    keys = [("cache_off", "prefix cache off"), ("cache_on", "prefix cache on")]
    for j, (q, shift) in enumerate((("p50", -0.2), ("p99", 0.2))):
        bars = axes[2].bar([i + shift for i in range(len(keys))],
                           [p[k]["ttft_s"][q] for k, _ in keys], 0.4, color=f"C{j + 2}",
                           label=f"TTFT {q}")
        _annotate(axes[2], bars, [f"{p[k]['ttft_s'][q]:.2f}" for k, _ in keys])
    axes[2].set_xticks(range(len(keys)))
    axes[2].set_xticklabels([f"{label}\n{p[k]['output_tok_s']:.1f} out tok/s, "
                             f"{p[k]['cached_prompt_tokens']} cached tok" for k, label in keys],
                            fontsize=8)
    axes[2].set_ylabel("time to first token (s)")
    axes[2].legend(fontsize=7)
    pc = c["prefix"]
    axes[2].set_title(f"{pc['requests']} requests sharing a {pc['system_len']}-token system "
                      f"prompt (paged)", fontsize=9)
    same = result.get("same_tokens", {})
    fig.suptitle(f"paged KV: {c['model']} {c['dtype']} on {c['device']}, KV budget "
                 f"{c['kv_budget_tokens']} tokens ({c['budget_seqs']} x max_model_len "
                 f"{c['max_model_len']}), blocks of {c['block_size']}; both stores measured in "
                 f"the same run, same greedy tokens {same.get('same')}/{same.get('of')}\n"
                 f"{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]


def plot_quant(result: dict, fig_dir) -> list[Path]:
    """Quantized decode (bench quant): % of the bandwidth ceiling per format and batch, and size."""
    plt = pyplot()
    c, runs = result["config"], result["runs"]
    formats = list(dict.fromkeys(r["format"] for r in runs))
    batches = list(dict.fromkeys(r["batch"] for r in runs))
    by = {(r["format"], r["batch"]): r for r in runs}
    series, labels = {}, {}
    for B in batches:
        rs = [by.get((f, B), {}) for f in formats]
        series[f"batch {B}"] = [100 * r["frac_ceiling"] if "frac_ceiling" in r else None
                                for r in rs]
        labels[f"batch {B}"] = [f"{r['decode_tok_s']:.0f} tok/s" if "decode_tok_s" in r
                                else None for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    _bars(axes[0], formats, series, "% of bandwidth ceiling (tokens/s)", labels)
    sizes = [next((r["model_bytes"] for r in runs if r["format"] == f and "model_bytes" in r),
                  0) / 2**20 for f in formats]
    bars = axes[1].bar(formats, sizes, color="C7")
    _annotate(axes[1], bars, [f"{x:.4g}" for x in sizes])
    axes[1].set_ylabel("model size (MiB)")
    axes[1].tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.suptitle(f"quantized decode: {c['model']} random weights, {c['dtype']}, prompt "
                 f"{c['prompt_len']} + {c['new_tokens']} new tokens, "
                 f"{'CUDA graph' if c['cuda_graph'] else 'eager'}; ceiling = weights+KV bytes "
                 f"per step at the measured copy bandwidth\n{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]


def _elsewhere(module: str, name: str):
    """A plotter kept in another module (serving's with its suite), imported when drawn."""
    def plot(result: dict, fig_dir) -> list[Path]:
        import importlib
        return getattr(importlib.import_module(module, __package__), name)(result, fig_dir)
    return plot


# suite -> plotter(result, fig_dir) -> [paths]
PLOTTERS = {"ops": plot_ops, "decode": plot_decode, "serving": _elsewhere(".serving", "plot"),
            "generate": plot_generate, "cpu": _elsewhere(".cpu", "plot"), "paged": plot_paged,
            "quant": plot_quant,
            "speculative": _elsewhere(".plots_tradeoffs", "plot_speculative"),
            "quant-quality": _elsewhere(".plots_tradeoffs", "plot_quant_quality")}


def plot_result(result: dict, fig_dir) -> list[Path]:
    """Draw a result's figures into ``fig_dir``; a suite without a plotter is an error."""
    suite = result.get("suite")
    if suite == "all":
        raise ValueError("an 'all' result only lists the result files its parts wrote "
                         f"({', '.join(result.get('files', {}).values()) or 'none'}): plot those")
    if suite not in PLOTTERS:
        raise ValueError(f"no plotter for suite {suite!r} (plotted: {', '.join(PLOTTERS)}): "
                         f"add one to tinyserve/bench/plots.py")
    with style():
        paths = PLOTTERS[suite](result, fig_dir)
    if not paths:
        raise ValueError(f"suite {suite!r}: its plotter drew nothing")
    return paths


def load_result(path) -> dict:
    """A result file's dict, or a ValueError saying why it is not one."""
    try:
        result = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON result file: {e}") from None
    if not isinstance(result, dict) or "suite" not in result or "env" not in result:
        raise ValueError(f"{path}: not a tinyserve.bench result (no 'suite'/'env')")
    return result


def run(args) -> dict:
    """Redraw figures from result files; returns None (there is no new result to save)."""
    for f in args.files:
        result = load_result(f)
        try:
            paths = plot_result(result, args.out)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from None
        for p in paths:
            print(p)
    return None

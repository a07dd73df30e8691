"""The figures of what a method trades: speculative decoding's speedup against K (per draft and
task), quantization's quality against size. Registered in ``plots.PLOTTERS`` like the rest and
drawn with the same style and ``save`` (see plots.py)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from .plots import figure_path, pyplot, save, subtitle


def _speedup_lines(ax, rows, drafts, solid: str, dotted: str):
    """One colour per draft: ``rows[solid]`` against K solid, ``rows[dotted]`` dotted."""
    for j, d in enumerate(drafts):
        rs = sorted((r for r in rows if r["draft"] == d), key=lambda r: r["k"])
        label = d                      # on the first line drawn (no CUDA graph: no solid line)
        for key, ls in ((solid, "-"), (dotted, ":")):
            pts = [(r["k"], r.get(key)) for r in rs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o" if ls == "-" else ".", color=f"C{j}",
                        label=label)
                label = None
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xticks(sorted({r["k"] for r in rows}))      # K is an integer: only the ones run
    ax.set_xlabel("draft tokens per round K")


def plot_speculative(result: dict, fig_dir) -> list[Path]:
    plt = pyplot()
    from matplotlib.lines import Line2D
    gpu = result.get("mode") == "gpu"
    rows = result["predicted"] if gpu else result["runs"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows)) if gpu else [None]
    drafts = list(dict.fromkeys(r["draft"] for r in rows))
    fig, axes = plt.subplots(len(models), max(1, len(tasks)), squeeze=False, sharey=True,
                             figsize=(4.2 * max(1, len(tasks)) + 1, 3.4 * len(models) + 0.9))
    solid, dotted = (("predicted_speedup_graph", "predicted_speedup_eager") if gpu
                     else ("speedup", "predicted_speedup"))
    for i, m in enumerate(models):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            _speedup_lines(ax, [r for r in rows if r["task"] == task and r.get("model") == m],
                           drafts, solid, dotted)
            ax.set_title(f"{m}: {task}" if gpu else f"task: {task}", fontsize=9)
        axes[i][0].set_ylabel("predicted speedup (x)" if gpu else
                              "speedup over plain decode (x)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(Line2D([], [], color="k", ls=":", marker="."))
    labels.append("eager (no CUDA graph)" if gpu else "predicted from alpha and step costs")
    axes[0][-1].legend(handles, labels, fontsize=7)
    c = result["config"]
    if gpu:
        env = result["env"]
        head = (f"speculative on {env.get('gpu') or env.get('device')}: PREDICTED, not measured "
                f"end to end (solid: CUDA graph): tokens per step from "
                f"{result['alpha_source'].get('file')}, target/verify/draft times measured "
                f"here, random weights, {c['dtype']}")
    else:
        same = sum(bool(r["identical"]) for r in rows)
        head = (f"speculative: {c['model']} {c['dtype']} on {c['device']}, {c['decoding']}, "
                f"{c['max_tokens']} new tokens per prompt, {len(c['tasks'][tasks[0]])} prompts "
                f"per task; plain decode measured in the same run (dashed line = 1x); output "
                f"identical to plain decode in {same}/{len(rows)} runs")
    fig.suptitle(f"{textwrap.fill(head, 190)}\n{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]


def plot_quant_quality(result: dict, fig_dir) -> list[Path]:
    """python -m tinyserve.quant.eval: perplexity, greedy agreement and size per method."""
    plt = pyplot()
    c, rows = result["config"], result["rows"]
    names = [f"{r['method']} ({r['bits_per_weight']:.2f} b/w)" for r in rows]
    ys = list(range(len(rows)))[::-1]          # the first row on top
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.4 * len(rows) + 2.8), sharey=True)
    ppl = [r["perplexity"]["ppl"] for r in rows]
    bars = axes[0].barh(ys, ppl, color="C0")
    for b, v in zip(bars, ppl):
        axes[0].annotate(f" {v:.2f}", (b.get_width(), b.get_y() + b.get_height() / 2),
                         va="center", fontsize=7)
    ref = next((r["perplexity"]["ppl"] for r in rows if r["method"] == "none"), None)
    if ref is not None:
        axes[0].axvline(ref, color="gray", ls="--", lw=0.8, label="reference (none)")
        axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_xlim(0, max(ppl) * 1.15)
    axes[0].set_xlabel("perplexity (lower is better)")
    axes[0].set_title(f"{rows[0]['perplexity']['tokens']} held-out tokens, window "
                      f"{c['window']}", fontsize=9)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels(names, fontsize=8)
    for j, (key, label) in enumerate((("top1", "next token = reference's"),
                                      ("tokens", "greedy tokens = reference's"))):
        vals = [100 * r["agreement"][key] if "agreement" in r else 0 for r in rows]
        if j == 0:
            for y, r in zip(ys, rows):
                if "agreement" not in r:
                    axes[1].annotate(" (the reference)", (0, y), va="center", fontsize=7)
        axes[1].barh([y + (0.2 if j == 0 else -0.2) for y in ys], vals, 0.4, color=f"C{j + 1}",
                     label=label)
    axes[1].set_xlim(0, 100)
    axes[1].set_xlabel("% agreement with the reference")
    axes[1].set_title(f"{c['prompts']} prompts x {c['new_tokens']} greedy tokens", fontsize=9)
    axes[1].legend(fontsize=7, loc="lower right")
    mib = [r["model_bytes"] / 2**20 for r in rows]
    bars = axes[2].barh(ys, mib, color="C7")
    for b, v in zip(bars, mib):
        axes[2].annotate(f" {v:.0f}", (b.get_width(), b.get_y() + b.get_height() / 2),
                         va="center", fontsize=7)
    axes[2].set_xlim(0, max(mib) * 1.15)
    axes[2].set_xlabel("model size in memory (MiB)")
    axes[2].set_title("b/w: stored bits per linear weight", fontsize=9)
    note = textwrap.fill(result.get("note", ""), 170)   # what the reference is, from the file
    fig.suptitle(f"quantization quality: {result.get('model')} on {result['env']['device']}\n"
                 f"{note}\n{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]

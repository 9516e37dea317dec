"""PNG plots of the evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import pathlib


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(result: dict, path) -> pathlib.Path:
    """Left: perplexity per cache and text. Right: NLL above dense by token position."""
    plt = _plt()
    res = result["results"]
    texts = result["settings"]["texts"]
    methods = [m["name"] for m in result["settings"]["methods"]]
    labels = {m["name"]: m["label"] for m in result["settings"]["methods"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(len(texts), 1)
    for j, text in enumerate(texts):
        vals = [next(r["ppl"] for r in res if r["method"] == m and r["text"] == text) for m in methods]
        xs = [i + (j - (len(texts) - 1) / 2) * width for i in range(len(methods))]
        bars = ax1.bar(xs, vals, width, label=text)
        ax1.bar_label(bars, fmt="%.1f", fontsize=7)
    ax1.set_xticks(range(len(methods)), [labels[m] for m in methods], rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("perplexity (teacher-forced through the cache)")
    ax1.set_title(f"{result['model']}: {result['settings']['chunk_len']}-token windows")
    ax1.legend(fontsize=8)

    bin_size = result["settings"]["bin_size"]
    dense = {r["text"]: r["nll_bins"] for r in res if r["method"] == "dense"}
    for m in methods:
        if m == "dense" or not dense:
            continue
        rows = [r for r in res if r["method"] == m]
        excess = [sum(r["nll_bins"][i] - dense[r["text"]][i] for r in rows) / len(rows)
                  for i in range(len(rows[0]["nll_bins"]))]
        ncols = result["settings"]["chunk_len"] - 1  # column j scores token j + 1
        centers = [1 + (i * bin_size + min((i + 1) * bin_size, ncols) - 1) / 2 for i in range(len(excess))]
        ax2.plot(centers, excess, marker=".", label=labels[m])
    ax2.axhline(0, color="gray", lw=0.8)
    r_len = result["settings"].get("residual_length")
    if r_len:
        ax2.axvline(r_len, color="gray", ls=":", lw=0.8)
        ax2.annotate(f" R={r_len}: first keys quantized", (r_len, 0), xytext=(2, -12), textcoords="offset points",
                     fontsize=8, color="gray")
    ax2.set_xlabel("token position")
    ax2.set_ylabel(f"mean NLL - dense NLL (nats, bins of {bin_size})")
    ax2.set_title("where the quantized cache costs (mean over texts and windows)")
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    else:  # (run120/121 ran one KIVI setting alone: an empty panel and matplotlib's legend warning)
        ax2.text(0.5, 0.5, f"nothing to compare: {'dense alone' if dense else 'no dense run'} in this result",
                 transform=ax2.transAxes, ha="center", va="center", fontsize=9, color="gray")
    return _save(plt, fig, path)


def _save(plt, fig, path) -> pathlib.Path:
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(result: dict, path) -> pathlib.Path:
    """Accuracy vs context length, one panel per filler, one line per cache."""
    plt = _plt()
    s = result["settings"]
    fillers, lengths = s["fillers"], s["lengths"]
    methods = [m["name"] for m in s["methods"]]
    labels = {m["name"]: m["label"] for m in s["methods"]}
    acc = {(a["filler"], a["length"], a["method"]): a["accuracy"] for a in result["accuracy"]}
    fig, axes = plt.subplots(1, len(fillers), figsize=(5.5 * len(fillers), 4.2), squeeze=False)
    for ax, filler in zip(axes[0], fillers):
        for i, m in enumerate(methods):  # nudged sideways and marked apart so equal curves stay visible
            nudge = 2 ** (0.04 * (i - (len(methods) - 1) / 2))
            ax.plot([n * nudge for n in lengths], [100 * acc[(filler, n, m)] for n in lengths],
                    marker="os^vDP*X"[i % 8], ls=("-", "--", ":", "-.")[i % 4], label=labels[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-5, 105)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey retrieved (%)")
        ax.set_title(f"{result['model']}, {filler} filler ({len(s['depths'])} depths x {s['trials']})")
        ax.legend(fontsize=8)
    return _save(plt, fig, path)

"""The report's pictures as PNG bytes (matplotlib, Agg backend, imported only when drawing).

matplotlib is the optional extra ``stream_dec[report]``; :func:`require_matplotlib` says
how to install it when it is missing.
"""

from __future__ import annotations

import io

import numpy as np

from stream_dec.report.analysis import CHURN_PROMISE, Batches, IdNode, tree_order
from stream_dec.report.records import ReportError

INSTALL_HINT = "pip install 'stream_dec[report]'"


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend; :class:`ReportError` with the install command when absent."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(f"drawing the report needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = require_matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _colours(n: int) -> list:
    plt = require_matplotlib()
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(n)]


def _batch_axis(ax, b: Batches) -> None:
    """Batch numbers along x, labelled with the model version where there is room."""
    n = len(b.labels)
    step = max(1, n // 12)
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}\nv{b.labels[t]}" for t in ticks] if b.by == "drift" else [f"v{b.labels[t]}" for t in ticks], fontsize=8)
    ax.set_xlabel("micro-batch (and model version after its update)" if b.by == "drift" else "model version")
    ax.set_xlim(-0.6, n - 0.4)


def tree_png(nodes: dict[int, IdNode], last_version: int) -> bytes:
    """Each id as a line over model versions: born (dot sized by support), refined from a parent, retired (x)."""
    plt = require_matplotlib()
    order = tree_order(nodes)
    row = {c: i for i, c in enumerate(order)}
    fig, ax = plt.subplots(figsize=(10, min(2.0 + 0.28 * len(order), 30)))
    for c in order:
        n, y = nodes[c], row[c]
        start = n.born_version if n.born_version is not None else 0
        end = n.retired_version if n.retired_version is not None else last_version
        ax.plot([start, max(end, start)], [y, y], color="#4c72b0" if n.born_version is None else "#dd8452", lw=2)
        if n.born_version is not None:
            ax.scatter([start], [y], s=20 + 3 * np.sqrt(n.support or 0) * 4, color="#dd8452", zorder=3)
            ax.annotate(f"support {n.support}" if n.support is not None else "no items labelled yet", (start, y), xytext=(6, 3),
                        textcoords="offset points", fontsize=7)
        if n.parent is not None:
            ax.plot([start, start], [row[n.parent], y], color="#55a868", lw=1, ls="--")
        if n.retired_version is not None:
            ax.scatter([end], [y], marker="x", color="#c44e52", s=40, zorder=3)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels([("  " if nodes[c].parent is not None else "") + f"id {c}" for c in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(-0.5, max(last_version, 1) + 0.5)
    ax.set_xlabel("model version")
    ax.set_title("Ids over model versions (blue: there from the start; orange: born; x: retired; dashed: refined from)")
    fig.tight_layout()
    return _png(fig)


def sizes_png(b: Batches, ids: np.ndarray, counts: np.ndarray, nodes: dict[int, IdNode]) -> bytes:
    """Items labelled per id per batch, stacked; a dotted line and the id where each born id first labels."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(11, 5))
    x = np.arange(len(b.labels))
    ax.stackplot(x, counts.T, colors=_colours(len(ids)), step="mid", linewidth=0, labels=[f"id {int(c)}" for c in ids])
    if len(ids) <= 40:  # beyond that a legend hides more than it names
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False, ncol=1 + len(ids) // 20,
                  reverse=True)
    top = counts.sum(1).max() if counts.size else 1
    born_at: dict[int, list[str]] = {}
    for j, c in enumerate(ids):
        first = np.flatnonzero(counts[:, j])
        if nodes[int(c)].born_version is not None and len(first):
            born_at.setdefault(int(first[0]), []).append(str(int(c)))
    for t, names in born_at.items():
        ax.axvline(t, color="black", ls=":", lw=0.8)
        ax.text(t, top * 1.01, f"new {', '.join(names)}", rotation=90, fontsize=7, va="bottom", ha="center")
    _batch_axis(ax, b)
    ax.set_ylim(0, top * 1.3)  # room for the "new ..." labels above the stack
    ax.set_ylabel("items labelled")
    ax.set_title(f"Cluster sizes per batch ({len(ids)} ids, stacked)")
    fig.tight_layout()
    return _png(fig)


def metrics_png(b: Batches, series: dict[str, np.ndarray]) -> bytes:
    """Churn (with the 1% promise), novelty rate, centre shift and update time per batch."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(4, 1, figsize=(11, 8), sharex=True)
    x = np.arange(len(b.labels))
    panels = [("churn", "churn (share)"), ("novelty_rate", "novelty rate"), ("centre_shift", "centre shift (radii)"),
              ("update_ms", "update (ms)")]
    for ax, (name, label) in zip(axes, panels):
        ax.plot(x, series[name], marker=".", lw=1)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].axhline(CHURN_PROMISE, color="#c44e52", ls="--", lw=1, label=f"promise: {CHURN_PROMISE:.0%}")
    axes[0].legend(loc="upper right", fontsize=8)
    _batch_axis(axes[-1], b)
    axes[0].set_title("Per batch, from the drift records")
    fig.tight_layout()
    return _png(fig)


def flow_png(b: Batches, flows: list[tuple[int, list[str], np.ndarray]]) -> bytes:
    """One panel per large id: the shares of its items that stayed, went to refinements or were relabelled."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(len(flows), 1, figsize=(11, 1.3 + 1.2 * len(flows)), sharex=True, squeeze=False)
    x = np.arange(len(b.labels))
    for ax, (p, names, shares) in zip(axes[:, 0], flows):
        bottom = np.zeros(len(x))
        colours = ["#8c8c8c", *_colours(len(names) - 1)]
        for k, name in enumerate(names):
            ax.bar(x, shares[:, k], bottom=bottom, width=1.0, color=colours[k], label=name)
            bottom += shares[:, k]
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"id {p}", rotation=0, ha="right", va="center", fontsize=9)
        ax.set_yticks([0, 1])
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    _batch_axis(axes[-1, 0], b)
    axes[0, 0].set_title("Where the items of the largest ids went, per batch (share)")
    fig.tight_layout()
    return _png(fig)

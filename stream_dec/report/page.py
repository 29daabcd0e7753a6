"""The report page: a header table and the four pictures, in one self-contained HTML file.

Images are embedded as base64 PNG and the page loads nothing from anywhere, so it opens
offline and can be mailed as one file. A small inline script marks the body with
``data-images="loaded N/M"`` once the images are decoded (headless browsers check it).
"""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from stream_dec.report import analysis, figures
from stream_dec.report.records import Stream

FIGURES = ("fig-tree", "fig-sizes", "fig-metrics", "fig-flow")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; vertical-align: top; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""

_SCRIPT = """
(function () {
  var imgs = Array.prototype.slice.call(document.images);
  function mark() {
    var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
    document.body.setAttribute("data-images", "loaded " + ok + "/" + imgs.length);
  }
  imgs.forEach(function (i) { i.addEventListener("load", mark); });
  mark();
})();
"""


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(stream: Stream) -> str:
    if stream.time_ms is None:
        return "unknown (a file of records carries no record times)"
    first, last = stream.time_ms
    return f"{_time(first)} to {_time(last)} ({(last - first) / 1000:,.1f} s)"


def _versions(stream: Stream) -> list[int]:
    return sorted({*stream.version.tolist(), *(int(d["model_version"]) for d in stream.drifts),
                   *(int(r["model_version"]) for r in stream.lifecycle)})


def header_rows(stream: Stream, b: analysis.Batches, ids: np.ndarray, nodes: dict) -> list[tuple[str, str, str]]:
    """``(html id, name, value)`` rows of the header table."""
    versions = _versions(stream)
    born = sum(n.born_version is not None for n in nodes.values())
    retired = sum(n.retired_version is not None for n in nodes.values())
    uncovered = int((b.batch < 0).sum())
    dlq = ("not read (give --dlq-topic)" if stream.dlq is None else
           f"{sum(stream.dlq.values())}" + "".join(f"; {k} {v}" for k, v in stream.dlq.items()))
    grouping = ("drift records' offset ranges" if b.by == "drift" else "model_version (the records hold no drift record)")
    return [
        ("h-source", "source", stream.source),
        ("h-records", "records", f"{stream.n_records}"),
        ("h-kinds", "by kind", f"{len(stream.items)} assignment, {len(stream.drifts)} drift, {len(stream.lifecycle)} lifecycle"),
        ("h-labelled", "items labelled", f"{len(b.keep)} ({len(stream.items) - len(b.keep)} duplicate assignments"
                                         f"{f', {uncovered} in no batch read' if uncovered else ''})"),
        ("h-ids", "ids that labelled items", f"{len(ids)}"),
        ("h-ids-named", "ids named", f"{len(nodes)} (labelled items, or named by drift or lifecycle records)"),
        ("h-id-life", "id life", f"{len(nodes) - born} there from the start, {born} born, {retired} retired"),
        ("h-versions", "model versions", f"{len(versions)}" + (f" ({versions[0]} to {versions[-1]})" if versions else "")),
        ("h-batches", "batches", f"{len(b.labels)} (assignments grouped by {grouping})"),
        ("h-span", "time span", _span(stream)),
        ("h-dlq", "dead letters", dlq),
    ]


def _img(fig_id: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{fig_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _tree_note(stream: Stream) -> str:
    if stream.lifecycle:
        return f"From {len(stream.lifecycle)} lifecycle records and the drift records' new_cluster_ids."
    return ("No lifecycle records in this stream: every id is a root, either there from the start or born as a new "
            "root (drift records' new_cluster_ids). Refinements and retirements appear once the model publishes "
            "lifecycle records (docs/contracts.md, \"Output\"). Support at birth: the items an id labelled in the "
            "first batch it labelled anything in.")


def render_html(stream: Stream) -> str:
    """The whole report page for ``stream`` as HTML text (draws the figures: needs matplotlib)."""
    figures.require_matplotlib()
    b = analysis.batches(stream)
    ids, counts = analysis.sizes(stream, b)
    nodes = analysis.id_tree(stream, b, ids, counts)
    last_version = max(_versions(stream) or [0])
    rows = "\n".join(f'<tr><th>{html.escape(n)}</th><td id="{i}">{html.escape(v)}</td></tr>'
                     for i, n, v in header_rows(stream, b, ids, nodes))
    sections = [
        ("Id tree", _img("fig-tree", figures.tree_png(nodes, last_version), "id tree over model versions"), _tree_note(stream)),
        ("Cluster sizes", _img("fig-sizes", figures.sizes_png(b, ids, counts, nodes), "cluster sizes per batch"),
         "Items labelled per id in each micro-batch; a dotted line marks the batch where a born id first labels items."),
        ("Churn, novelty, centre shift, update time",
         _img("fig-metrics", figures.metrics_png(b, analysis.metric_series(b)), "churn, novelty, centre shift and update time per batch")
         if b.drifts else "<p>No drift records: nothing to draw.</p>",
         f"From the drift records; the dashed line is the churn promise ({analysis.CHURN_PROMISE:.0%})."),
        ("Label flow of the largest ids", _img("fig-flow", figures.flow_png(b, analysis.flow(stream, b, nodes, ids, counts)),
                                              "label flow of the largest ids"),
         "Per batch, the share of an id's items (its own and its refinements') labelled with the id itself (stayed), "
         "with each refinement of it, or, for items labelled before, relabelled to another id. With flat ids and "
         "stable assignments this is all 'stayed'."),
    ]
    body = "\n".join(f"<h2>{t}</h2>\n<p class=\"note\">{html.escape(note)}</p>\n{img}" for t, img, note in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>stream-dec report</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n<h1>stream-dec report</h1>\n<table>\n{rows}\n</table>\n{body}\n"
            f"<script>{_SCRIPT}</script>\n</body></html>\n")


def write_report(stream: Stream, out: str | Path) -> Path:
    """Render ``stream`` and write the page to ``out`` (parent folders created); returns the path."""
    path = Path(out)
    text = render_html(stream)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

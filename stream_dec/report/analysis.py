"""What the report's pictures show, computed from a :class:`~stream_dec.report.records.Stream` (numpy only).

Batches: an assignment belongs to the micro-batch whose drift record's ``offset_ranges``
hold its source record (same topic, partition, offset range): that is exactly the batch
the service labelled it in, whatever model version labelled it (with
``update.max_steps = 0`` every batch has the same version). Only when the records hold
no drift record at all are assignments grouped by ``model_version`` instead. A replayed
batch publishes exact copies of its records, so copies (the same drift record, or an
assignment of the same source record) count once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream_dec.report.records import Stream

# The churn promise of README.md ("How ids stay put"): at most 1% of items change id.
CHURN_PROMISE = 0.01


@dataclass
class Batches:
    """Micro-batches in stream order and each (first-copy) assignment's batch (-1: no drift record covers it)."""

    by: str  # "drift" or "model_version"
    drifts: list[dict]  # one per batch when by == "drift"
    labels: list[str]  # x tick text per batch
    keep: np.ndarray  # indices of the first copy of each source record
    batch: np.ndarray  # per kept assignment


def _first_copies(stream: Stream) -> np.ndarray:
    """Indices of the first assignment of each source record (topic, partition, offset)."""
    seen: set = set()
    keep = []
    for i, key in enumerate(zip(stream.topic, stream.partition.tolist(), stream.offset.tolist())):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def _unique_drifts(drifts: list[dict]) -> list[dict]:
    """Drift records without the copies a replay publishes, in the order read."""
    seen: set = set()
    out = []
    for d in drifts:
        key = (d.get("model_version"), d.get("topic"), repr(d.get("offset_ranges")))
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _batch_of_offsets(drifts: list[dict], topic: list[str], partition: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The index of the drift record whose offset range holds each (topic, partition, offset); -1 for none."""
    ranges: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for b, d in enumerate(drifts):
        for r in d.get("offset_ranges") or ():
            ranges.setdefault((str(d.get("topic")), int(r["partition"])), []).append((r["first_offset"], r["last_offset"], b))
    out = np.full(len(offset), -1, dtype=np.int64)
    topics = np.array(topic, dtype=object)
    for (t, p), spans in ranges.items():
        spans.sort()
        firsts = np.array([s[0] for s in spans])
        lasts = np.array([s[1] for s in spans])
        owner = np.array([s[2] for s in spans])
        sel = np.flatnonzero((topics == t) & (partition == p))
        pos = np.searchsorted(firsts, offset[sel], side="right") - 1
        ok = (pos >= 0) & (offset[sel] <= lasts[np.maximum(pos, 0)])
        out[sel[ok]] = owner[pos[ok]]
    return out


def batches(stream: Stream) -> Batches:
    """The micro-batches of ``stream`` and which batch each first-copy assignment belongs to."""
    keep = _first_copies(stream)
    drifts = _unique_drifts(stream.drifts)
    if drifts:
        topic = [stream.topic[i] for i in keep]
        batch = _batch_of_offsets(drifts, topic, stream.partition[keep], stream.offset[keep])
        return Batches("drift", drifts, [str(d["model_version"]) for d in drifts], keep, batch)
    versions, batch = np.unique(stream.version[keep], return_inverse=True)
    return Batches("model_version", [], [str(v) for v in versions], keep, batch.astype(np.int64))


def sizes(stream: Stream, b: Batches) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, counts)``: the ids that labelled anything and a ``[batch, id]`` matrix of items labelled."""
    covered = b.batch >= 0
    clusters = stream.cluster[b.keep][covered]
    ids, col = np.unique(clusters, return_inverse=True)
    counts = np.zeros((len(b.labels), len(ids)), dtype=np.int64)
    np.add.at(counts, (b.batch[covered], col), 1)
    return ids, counts


@dataclass
class IdNode:
    """One id's life: where it came from, when it was born and retired, its support at birth."""

    cluster: int
    parent: int | None = None
    born_version: int | None = None  # None: there from the start (a fitted id)
    support: int | None = None
    support_from: str = ""  # "lifecycle" (the record's support) or "first batch" (items it labelled there)
    retired_version: int | None = None
    children: list[int] = field(default_factory=list)


def _born_and_retired(stream: Stream, nodes: dict[int, IdNode]) -> None:
    """Births from drift records' ``new_cluster_ids``, then lifecycle records (which say more) on top."""
    for d in stream.drifts:
        for c in d.get("new_cluster_ids") or ():
            node = nodes.setdefault(int(c), IdNode(int(c)))
            if node.born_version is None:
                node.born_version = int(d["model_version"])
    for rec in stream.lifecycle:
        node = nodes.setdefault(int(rec["cluster"]), IdNode(int(rec["cluster"])))
        if rec.get("event") == "born":
            node.born_version = int(rec["model_version"])
            node.parent = rec.get("parent") if isinstance(rec.get("parent"), int) else None
            evidence = rec.get("support")
            if isinstance(evidence, (int, float)):
                node.support, node.support_from = int(evidence), "lifecycle"
        elif rec.get("event") == "retired":
            node.retired_version = int(rec["model_version"])
        elif rec.get("event") == "revived":  # assigned again: no longer retired
            node.retired_version = None


def id_tree(stream: Stream, b: Batches, ids: np.ndarray, counts: np.ndarray) -> dict[int, IdNode]:
    """Every id the records name, with its parent, birth, retirement and support at birth.

    Support at birth is the lifecycle record's ``support`` when there is one, else the
    items the id labelled in the first batch it labelled anything in.
    """
    nodes: dict[int, IdNode] = {int(c): IdNode(int(c)) for c in ids}
    _born_and_retired(stream, nodes)
    col = {int(c): j for j, c in enumerate(ids)}
    for node in nodes.values():
        if node.born_version is not None and node.support is None and node.cluster in col:
            first = np.flatnonzero(counts[:, col[node.cluster]])
            node.support, node.support_from = int(counts[first[0], col[node.cluster]]), "first batch"
        if node.parent is not None and node.parent in nodes:
            nodes[node.parent].children.append(node.cluster)
        elif node.parent is not None:  # a parent outside the records read (--since): shown as a root
            node.parent = None
    return nodes


def tree_order(nodes: dict[int, IdNode]) -> list[int]:
    """Ids depth first: each root by id, then its refinements under it.

    >>> tree_order({0: IdNode(0, children=[2]), 1: IdNode(1), 2: IdNode(2, parent=0)})
    [0, 2, 1]
    """
    order: list[int] = []

    def visit(c: int) -> None:
        order.append(c)
        for child in sorted(nodes[c].children):
            visit(child)

    for c in sorted(c for c, n in nodes.items() if n.parent is None):
        visit(c)
    return order


def _descendants(nodes: dict[int, IdNode], c: int) -> list[int]:
    out: list[int] = []
    for child in sorted(nodes[c].children):
        out += [child, *_descendants(nodes, child)]
    return out


def _relabels(stream: Stream, b: Batches) -> dict[tuple[int, int, int], int]:
    """``(batch, old id, new id) -> items``: items labelled again (a new source record) with another id."""
    last: dict[str, int] = {}
    moves: dict[tuple[int, int, int], int] = {}
    order = np.argsort(b.batch, kind="stable")
    for i in order[b.batch[order] >= 0]:
        item, c = stream.items[b.keep[i]], int(stream.cluster[b.keep[i]])
        old = last.get(item)
        if old is not None and old != c:
            key = (int(b.batch[i]), old, c)
            moves[key] = moves.get(key, 0) + 1
        last[item] = c
    return moves


def flow(stream: Stream, b: Batches, nodes: dict[int, IdNode], ids: np.ndarray, counts: np.ndarray,
         top: int = 6) -> list[tuple[int, list[str], np.ndarray]]:
    """Where the items of each of the ``top`` largest ids went, batch by batch.

    For id ``p`` in each batch from its first on: the items labelled ``p`` ("stayed"),
    those labelled each descendant of ``p`` (refinements named by lifecycle records),
    and items labelled ``p`` before that the batch labelled again with another id
    ("relabelled to q"). Returns ``(id, destination names, [batch, destination] shares)``
    per id; a batch where none of these occurred has zero shares.
    """
    col = {int(c): j for j, c in enumerate(ids)}
    moves = _relabels(stream, b)
    out = []
    for j in np.argsort(-counts.sum(0), kind="stable")[:top]:
        p = int(ids[j])
        desc = [c for c in _descendants(nodes, p) if c in col]
        moved_to = sorted({q for (_, old, q) in moves if old == p and q not in desc})
        names = ["stayed", *[f"to {c} (refinement)" for c in desc], *[f"relabelled to {q}" for q in moved_to]]
        m = np.zeros((counts.shape[0], len(names)))
        m[:, 0] = counts[:, j]
        for k, c in enumerate(desc, 1):
            m[:, k] = counts[:, col[c]]
        for k, q in enumerate(moved_to, 1 + len(desc)):
            for (t, old, new), n in moves.items():
                if old == p and new == q:
                    m[t, k] += n
        start = int(np.flatnonzero(counts[:, j])[0])
        m[:start] = 0
        total = m.sum(1, keepdims=True)
        out.append((p, names, np.divide(m, total, out=np.zeros_like(m), where=total > 0)))
    return out


def metric_series(b: Batches) -> dict[str, np.ndarray]:
    """Per batch: churn, novelty rate, centre shift and update time (NaN where a drift record has null)."""

    def col(name: str) -> np.ndarray:
        return np.array([np.nan if d.get(name) is None else float(d[name]) for d in b.drifts])

    return {"churn": col("churn"), "novelty_rate": col("novelty_rate"), "centre_shift": col("centre_shift"),
            "update_ms": col("update_ms")}

"""Prototype of an id hierarchy on top of StreamDEC, measured on the stream protocol.

StreamDEC's id is taken as the *root* of an item; a :class:`Refiner`, outside the model,
refines a root into children it finds in its own window of recent latents
(``model.transform``): a child takes only items its parent holds, so the wrapper never
changes a root id and cannot add root churn beyond StreamDEC's own. Scores use the
hierarchical churn of ``bench/protocol.py`` (a move into a descendant is refinement).

Each (set, seed) runs StreamDEC once and records its root ids after every batch; every
refiner variant replays that recording, so all variants see the same roots. The
baselines of ``bench/baselines.py`` run in the same process on the same splits.

Split test of a leaf (an id's recent items that none of its children holds):

* 2-means on those items;
* support: each part holds >= ``min_support`` items (StreamDEC's own ``min_support_``);
* novelty (``enrich``): the candidate part's share of the window exceeds its share of
  the id's *founding* items (a two-proportion z-test), so a broad but unchanged
  cluster is not cut;
* separation (``sep_q``): the parts' between-centre distance over their within-part
  spread exceeds the ``sep_q`` quantile of the same statistic measured on the fitted
  clusters' own founding items (calibrated per fit, no per-data-set constant);
* persistence (``persist``): the same candidate (mutual nearest centres) is seen at
  that many consecutive checks.

An accepted child is frozen: its centre and its parent's "rest" centre at birth; an
item of the parent moves to the child when ``|x - child|^2 * gate < |x - rest|^2``,
children tried in birth order so a new child never takes an older sibling's items.

Adoption (``adopt``): a new StreamDEC id whose items, before the update that made it,
were more than half in one older id becomes that id's child, so the moves into it are
refinement. ``SD_CONFIGS`` also records StreamDEC with loosened spawn budgets.

Example::

    nice -n 19 python bench/hierarchy_probe.py --sets stackoverflow-c8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

from baselines import FrozenKMeans, MBKMeans, RefitKMeans  # noqa: E402
from coarse import COARSE_SETS, load_coarse  # noqa: E402
from protocol import (  # noqa: E402
    TRACKING_LAST,
    hierarchical_churn,
    match_classes_to_ids,
    run_class_incremental,
    run_gradual_drift,
)
from run_quality import DEFAULT_DATA_DIR, limit_threads, write_json  # noqa: E402

from stream_dec.evaluation import metrics  # noqa: E402
from stream_dec.evaluation.protocol import class_incremental_split, gradual_drift_split  # noqa: E402

BASELINES = {
    "frozen_kmeans": lambda k, s, n: FrozenKMeans(k, s),
    "mbk_all": lambda k, s, n: MBKMeans(n, s),
    "refit_kmeans": lambda k, s, n: RefitKMeans(n, s),
}


# --------------------------------------------------------------------- recordings
@dataclass
class Recording:
    """StreamDEC's root ids on one split, after fit and after every batch, plus latents."""

    y_base: np.ndarray
    z_base: np.ndarray
    roots_base: np.ndarray
    y_ref: np.ndarray
    z_ref: np.ndarray
    ref_roots: list[np.ndarray]  # [0] right after fit, [t + 1] after batch t
    y_batches: list[np.ndarray]
    z_batches: list[np.ndarray]
    batch_roots: list[np.ndarray]  # batch t's roots right after partial_fit on it
    batch_roots_before: list[np.ndarray]  # batch t's roots before partial_fit on it
    end_stream_roots: np.ndarray  # every stream item's root after the last batch
    end_base_roots: np.ndarray
    novel_classes: np.ndarray
    min_support: int
    pf_ms: list[float] = field(default_factory=list)


#: StreamDEC settings recorded: the defaults, and spawn budgets loosened (also without
#: the gate margin) so that new clusters may take more of what older ids hold, which a
#: hierarchy calls refinement when the older id becomes their parent.
SD_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "loose": {"new_cluster_churn": 0.02, "max_churn": 0.05, "max_total_churn": 0.05},
    "loose_m0": {"new_cluster_churn": 0.02, "max_churn": 0.05, "max_total_churn": 0.05, "margin": 0.0},
}


def _stream_dec(k: int, seed: int, params: dict[str, Any]) -> Any:
    from stream_dec import StreamDEC

    return StreamDEC(n_clusters=k, random_state=seed, verbose=False, **params)


def _record(model: Any, X_base, y_base, X_ref, y_ref, X_batches, y_batches, novel) -> Recording:
    model.fit(X_base)
    rec = Recording(
        y_base=y_base, z_base=model.transform(X_base), roots_base=model.predict(X_base), y_ref=y_ref,
        z_ref=model.transform(X_ref), ref_roots=[model.predict(X_ref)], y_batches=list(y_batches),
        z_batches=[model.transform(Xb) for Xb in X_batches], batch_roots=[], batch_roots_before=[], end_stream_roots=np.empty(0),
        end_base_roots=np.empty(0), novel_classes=np.asarray(novel), min_support=int(model.min_support_),
    )
    for Xb in X_batches:
        rec.batch_roots_before.append(model.predict(Xb))
        t0 = time.perf_counter()
        model.partial_fit(Xb)
        rec.pf_ms.append(1000 * (time.perf_counter() - t0))
        rec.batch_roots.append(model.predict(Xb))
        rec.ref_roots.append(model.predict(X_ref))
    rec.end_stream_roots = np.concatenate([model.predict(Xb) for Xb in X_batches])
    rec.end_base_roots = model.predict(X_base)
    return rec


def record_class_incremental(X: np.ndarray, y: np.ndarray, seed: int, params: dict[str, Any], T: int = 20) -> Recording:
    """StreamDEC on the class-incremental split of ``seed`` (with ``{}``, the model run_quality builds)."""
    s = class_incremental_split(y, seed, T)
    model = _stream_dec(len(s.base_classes), seed, params)
    return _record(model, X[s.base], y[s.base], X[s.ref], y[s.ref], [X[b] for b in s.batches],
                   [y[b] for b in s.batches], s.novel_classes)


def record_gradual_drift(X: np.ndarray, y: np.ndarray, seed: int, params: dict[str, Any], T: int = 20) -> Recording:
    """StreamDEC on the gradual-drift split of ``seed``."""
    s = gradual_drift_split(X, y, seed, T)
    model = _stream_dec(len(np.unique(y)), seed, params)
    return _record(model, X[s.base], y[s.base], X[s.ref], y[s.ref], s.X_batches, s.y_batches, [])


# --------------------------------------------------------------------- split test
def _sqdist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return np.maximum((A * A).sum(1)[:, None] - 2 * A @ B.T + (B * B).sum(1)[None, :], 0.0)


def two_means(Z: np.ndarray, seed: int = 0, n_init: int = 3, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``(centres [2, d], labels)`` of the best of ``n_init`` seeded 2-means runs (k-means++ starts).

    >>> Z = np.r_[np.zeros((5, 2)), np.ones((5, 2)) * 4]
    >>> c, lab = two_means(Z)
    >>> sorted(np.bincount(lab).tolist()), sorted(c[:, 0].tolist())
    ([5, 5], [0.0, 4.0])
    """
    rng = np.random.default_rng(seed)
    best = (np.inf, None, None)
    for _ in range(n_init):
        c0 = Z[rng.integers(len(Z))]
        d0 = ((Z - c0) ** 2).sum(1)
        c1 = Z[rng.choice(len(Z), p=d0 / d0.sum())] if d0.sum() > 0 else c0
        C = np.stack([c0, c1]).astype(np.float64)
        for _ in range(iters):
            lab = _sqdist(Z, C).argmin(1)
            newC = np.stack([Z[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(2)])
            if np.allclose(newC, C):
                break
            C = newC
        d = _sqdist(Z, C)
        lab = d.argmin(1)
        inertia = d[np.arange(len(Z)), lab].sum()
        if inertia < best[0]:
            best = (inertia, C, lab)
    return best[1], best[2]


def separation(Z: np.ndarray, C: np.ndarray, lab: np.ndarray) -> float:
    """Squared distance between the two centres over the mean within-part squared distance."""
    within = float(np.mean(((Z - C[lab]) ** 2).sum(1)))
    return float(((C[0] - C[1]) ** 2).sum()) / max(within, 1e-12)


def enrichment_z(n_win: int, k_win: int, n_found: int, k_found: int) -> float:
    """Two-proportion z of the part's share of the window (k/n) above its share of the founding items.

    >>> round(enrichment_z(100, 50, 100, 10), 2)
    6.17
    """
    if n_win == 0 or n_found == 0:
        return 0.0
    p = (k_win + k_found) / (n_win + n_found)
    se = np.sqrt(max(p * (1 - p), 1e-12) * (1 / n_win + 1 / n_found))
    return float((k_win / n_win - k_found / n_found) / se)


# --------------------------------------------------------------------- the refiner
@dataclass
class RefinerParams:
    """Knobs of one refiner variant (see the module docstring)."""

    enrich: bool = True
    z_crit: float = 3.0
    sep_q: float | None = 0.5
    persist: int = 2
    gate: float = 1.0
    every: int = 1
    window: int = 5
    recursive: bool = False
    max_found_share: float | None = None  # a child may take at most this share of its parent's founding items
    split: bool = True  # look for children at all
    adopt: bool = False  # a new StreamDEC root whose items mostly came from one id becomes that id's child
    child_founding: str = "members"  # a child's founding items: its window members, or "taken": the parent's it takes


@dataclass
class _Node:
    founding: np.ndarray
    parent: int | None = None
    centre: np.ndarray | None = None  # children only: frozen at birth
    rest: np.ndarray | None = None  # the parent's other part at the child's birth
    gate: float = 1.0
    children: list[int] = field(default_factory=list)
    model_id: bool = True  # an id StreamDEC gives (a root, or an adopted spawn), not a refiner child
    candidate: tuple[np.ndarray, np.ndarray, int] | None = None  # (centre, rest, streak)


class Refiner:
    """Children under StreamDEC's root ids, found in a window of recent latents."""

    def __init__(self, params: RefinerParams, min_support: int, seed: int = 0) -> None:
        self.p, self.min_support, self.seed = params, min_support, seed

    def fit(self, z: np.ndarray, roots: np.ndarray) -> "Refiner":
        """Founding items per fitted root and the separation its own 2-way splits show."""
        self.nodes_: dict[int, _Node] = {int(r): _Node(founding=z[roots == r]) for r in np.unique(roots)}
        self.next_id_ = 1_000_000  # children get ids no root will reach in these runs
        self.window_: list[tuple[np.ndarray, np.ndarray]] = []
        self.t_ = 0
        seps = [separation(F, *two_means(F, self.seed)) for F in (n.founding for n in self.nodes_.values())
                if len(F) >= 2 * self.min_support]
        q = self.p.sep_q
        self.sep_threshold_ = float(np.quantile(seps, q)) if (q is not None and seps) else 0.0
        self.fit_seps_ = seps
        self.events_: list[dict[str, Any]] = []
        return self

    @property
    def parent_ids_(self) -> dict[int, int | None]:
        """Parent of every id (None for roots)."""
        return {i: n.parent for i, n in self.nodes_.items()}

    def predict(self, z: np.ndarray, roots: np.ndarray) -> np.ndarray:
        """Finest id: descend from the root through the first child (birth order) whose gate passes."""
        ids = np.asarray(roots).astype(np.int64).copy()
        active = np.ones(len(ids), dtype=bool)
        while active.any():
            moved = np.zeros(len(ids), dtype=bool)
            for node_id in np.unique(ids[active]).tolist():
                node = self.nodes_.get(node_id)
                if node is None or not node.children:
                    continue
                rows = np.flatnonzero(active & (ids == node_id))
                free = np.ones(len(rows), dtype=bool)
                for c in node.children:
                    ch = self.nodes_[c]
                    zr = z[rows]
                    take = free & (((zr - ch.centre) ** 2).sum(1) * ch.gate < ((zr - ch.rest) ** 2).sum(1))
                    ids[rows[take]] = c
                    moved[rows[take]] = True
                    free &= ~take
            active = moved
        return ids

    def partial_fit(self, z: np.ndarray, roots: np.ndarray, roots_before: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Add a batch (latents, StreamDEC ids after and before its update); test splits; return the births."""
        self.t_ += 1
        for r in np.unique(roots).tolist():
            if r not in self.nodes_:  # a new id: its items at first sight are its founding items
                self.nodes_[r] = _Node(founding=z[roots == r], parent=self._adoptive_parent(r, roots, roots_before))
        self.window_ = (self.window_ + [(z, np.asarray(roots))])[-self.p.window:]
        if self.t_ % self.p.every or not self.p.split:
            return []
        Zw = np.concatenate([w[0] for w in self.window_])
        ids = self.predict(Zw, np.concatenate([w[1] for w in self.window_]))
        births = []
        for node_id in np.unique(ids).tolist():
            node = self.nodes_[node_id]
            if not node.model_id and not self.p.recursive:
                continue
            ev = self._test(node, Zw[ids == node_id])
            if ev is not None:
                births.append(self._birth(node_id, node, ev))
        return births

    def _adoptive_parent(self, r: int, roots: np.ndarray, before: np.ndarray | None) -> int | None:
        """The id that held most of a new id's items before the update, when it held more than half."""
        if not self.p.adopt or before is None:
            return None
        ids, cnt = np.unique(before[roots == r], return_counts=True)
        p = int(ids[cnt.argmax()])
        if cnt.max() * 2 <= cnt.sum() or p not in self.nodes_:
            return None
        self.events_.append({"event": "adopted", "id": r, "parent": p, "t": self.t_, "share": float(cnt.max() / cnt.sum())})
        return p

    def _test(self, node: _Node, Z: np.ndarray) -> dict[str, Any] | None:
        """Evidence for a child of ``node`` in its leaf items ``Z``, or None (candidate kept for persistence)."""
        ms = self.min_support
        if len(Z) < 2 * ms:
            node.candidate = None
            return None
        C, lab = two_means(Z, self.seed)
        sizes = np.bincount(lab, minlength=2)
        F = node.founding
        f_lab = _sqdist(F, C).argmin(1) if len(F) else np.empty(0, int)
        f_sizes = np.bincount(f_lab, minlength=2)
        zs = [enrichment_z(len(Z), int(sizes[j]), len(F), int(f_sizes[j])) for j in range(2)]
        j = int(np.argmax(zs)) if self.p.enrich else int(np.argmin(sizes))
        sep = separation(Z, C, lab)
        ev = {"support": int(sizes[j]), "rest_support": int(sizes[1 - j]), "window": int(len(Z)),
              "enrichment_z": zs[j], "found_share": float(f_sizes[j] / max(len(F), 1)),
              "win_share": float(sizes[j] / len(Z)), "separation": sep, "sep_threshold": self.sep_threshold_}
        ok = sizes.min() >= ms and sep > self.sep_threshold_
        if self.p.enrich:
            ok = ok and zs[j] > self.p.z_crit
        if self.p.max_found_share is not None:
            ok = ok and ev["found_share"] <= self.p.max_found_share
        if not ok:
            node.candidate = None
            return None
        streak = 1
        if node.candidate is not None:
            pc, pr, s = node.candidate
            same = ((C[j] - pc) ** 2).sum() < ((C[j] - pr) ** 2).sum() and ((pc - C[j]) ** 2).sum() < ((pc - C[1 - j]) ** 2).sum()
            streak = s + 1 if same else 1
        node.candidate = (C[j], C[1 - j], streak)
        if streak < self.p.persist:
            return None
        ev.update(centre=C[j], rest=C[1 - j], members=Z[lab == j], streak=streak)
        return ev

    def _birth(self, node_id: int, node: _Node, ev: dict[str, Any]) -> dict[str, Any]:
        cid = self.next_id_
        self.next_id_ += 1
        centre, rest, members = ev.pop("centre"), ev.pop("rest"), ev.pop("members")
        if self.p.child_founding == "taken":
            F = node.founding
            members = F[((F - centre) ** 2).sum(1) * self.p.gate < ((F - rest) ** 2).sum(1)]
        self.nodes_[cid] = _Node(founding=members, parent=node_id, centre=centre, rest=rest, gate=self.p.gate,
                                 model_id=False)
        node.children.append(cid)
        node.candidate = None
        event = {"event": "born", "id": cid, "parent": node_id, "t": self.t_, **ev}
        self.events_.append(event)
        return event


# --------------------------------------------------------------------- replays
def _score(prefix: str, y: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    return {f"{k}_{prefix}": v for k, v in metrics.score_all(y, ids).items()}


def replay_ci(rec: Recording, params: RefinerParams | None) -> dict[str, Any]:
    """Class-incremental scores of StreamDEC's roots refined by a variant (None: roots only)."""
    ref = Refiner(params or RefinerParams(), rec.min_support).fit(rec.z_base, rec.roots_base)
    ref0 = rec.ref_roots[0]
    churns, ms = [], []
    for t, (zb, rb, rb0) in enumerate(zip(rec.z_batches, rec.batch_roots, rec.batch_roots_before)):
        t0 = time.perf_counter()
        if params is not None:
            ref.partial_fit(zb, rb, rb0)
        ms.append(1000 * (time.perf_counter() - t0))
        churns.append(hierarchical_churn(ref0, ref.predict(rec.z_ref, rec.ref_roots[t + 1]), ref.parent_ids_))
    z_stream, y_stream = np.concatenate(rec.z_batches), np.concatenate(rec.y_batches)
    pred = ref.predict(z_stream, rec.end_stream_roots)
    pred_ref = ref.predict(rec.z_ref, rec.ref_roots[-1])
    pred_base = ref.predict(rec.z_base, rec.end_base_roots)
    novel = np.isin(y_stream, rec.novel_classes)
    return {
        **_score("all", y_stream, pred), **_score("new", y_stream[novel], pred[novel]), **_score("ref", rec.y_ref, pred_ref),
        "churn_final": churns[-1]["churn"], "churn_max": max(c["churn"] for c in churns),
        "churn_root_final": churns[-1]["root"], "refined_final": churns[-1]["refined"],
        "clusters": int(len(np.unique(np.concatenate([pred_base, pred_ref, pred])))),
        "children": int(sum(1 for n in ref.nodes_.values() if not n.model_id)),
        "adopted": int(sum(1 for n in ref.nodes_.values() if n.model_id and n.parent is not None)),
        "wrap_ms_p95": float(np.percentile(ms, 95)), "sd_pf_ms_p95": float(np.percentile(rec.pf_ms, 95)),
        "births": _child_outcomes(ref, y_stream, pred, rec.novel_classes.tolist(), rec.roots_base, pred_base),
        "fit_seps": ref.fit_seps_,
    }


def _child_outcomes(ref: Refiner, y: np.ndarray, pred: np.ndarray, novel_classes: list[int], roots_base: np.ndarray,
                    pred_base: np.ndarray) -> list[dict[str, Any]]:
    """Each birth event plus what its child holds at the end: majority class, purity, capture, founding taken."""
    out = []
    for e in ref.events_:
        held = np.isin(pred, [i for i in ref.nodes_ if e["id"] in _lineage(i, ref.parent_ids_)])
        row = dict(e)
        if held.any():
            cls, cnt = np.unique(y[held], return_counts=True)
            c = int(cls[cnt.argmax()])
            row.update(held=int(held.sum()), major=c, purity=float(cnt.max() / held.sum()),
                       major_novel=bool(c in novel_classes),
                       capture=float(cnt.max() / (y == c).sum()))
        root = _lineage_root(e["parent"], ref.parent_ids_)
        row["founding_taken"] = float(np.mean(pred_base[roots_base == root] == e["id"])) if (roots_base == root).any() else 0.0
        out.append(row)
    return out


def _lineage(node: int, parents: dict[int, int | None]) -> list[int]:
    chain = [node]
    while parents.get(chain[-1]) is not None:
        chain.append(parents[chain[-1]])
    return chain


def _lineage_root(node: int, parents: dict[int, int | None]) -> int:
    return _lineage(node, parents)[-1]


def replay_drift(rec: Recording, params: RefinerParams | None) -> dict[str, Any]:
    """Drift tracking on root and on finest ids, churn, and where lost items went."""
    ref = Refiner(params or RefinerParams(), rec.min_support).fit(rec.z_base, rec.roots_base)
    home = match_classes_to_ids(rec.y_ref, rec.ref_roots[0])
    trk_root, trk_fine, other_root = [], [], []
    churns = []
    for t, (zb, rb, rb0, yb) in enumerate(zip(rec.z_batches, rec.batch_roots, rec.batch_roots_before, rec.y_batches)):
        if params is not None:
            ref.partial_fit(zb, rb, rb0)
        h = np.array([home.get(int(c), -1) for c in yb])
        fine = ref.predict(zb, rb)
        root = np.array([_lineage_root(int(i), ref.parent_ids_) for i in rb.tolist()])
        trk_root.append(float(np.mean(root == h)))
        trk_fine.append(float(np.mean(fine == h)))
        other_root.append(float(np.mean((root != h) & np.isin(root, list(home.values())))))
        churns.append(hierarchical_churn(rec.ref_roots[0], ref.predict(rec.z_ref, rec.ref_roots[t + 1]), ref.parent_ids_))
    last = slice(-TRACKING_LAST, None)
    return {
        "tracking_root": float(np.mean(trk_root[last])), "tracking_fine": float(np.mean(trk_fine[last])),
        "tracking0": trk_root[0], "retention_root": float(np.mean(trk_root[last]) / max(trk_root[0], 1e-12)),
        "retention_fine": float(np.mean(trk_fine[last]) / max(trk_fine[0], 1e-12)),
        "lost_to_other_home_root": float(np.mean(other_root[last])),
        "churn_final": churns[-1]["churn"], "churn_max": max(c["churn"] for c in churns),
        "children": int(sum(1 for n in ref.nodes_.values() if n.parent is not None)),
        "tracking_curve_root": trk_root, "tracking_curve_fine": trk_fine,
    }


def absorption(rec: Recording) -> list[dict[str, Any]]:
    """Per novel class: the root holding most of its stream items at the end, its share, and that root's kind."""
    y = np.concatenate(rec.y_batches)
    fitted = set(np.unique(rec.roots_base).tolist())
    out = []
    for c in rec.novel_classes.tolist():
        r = rec.end_stream_roots[y == c]
        ids, cnt = np.unique(r, return_counts=True)
        top = int(ids[cnt.argmax()])
        base_in_top = rec.y_base[rec.roots_base == top]
        out.append({
            "class": c, "root": top, "share": float(cnt.max() / len(r)), "fitted": top in fitted,
            "root_base_classes": int(len(np.unique(base_in_top))) if len(base_in_top) else 0,
            "root_founding": int(len(base_in_top)),
        })
    return out


def oracle_children(rec: Recording) -> dict[str, Any]:
    """One child per novel class absorbed by a fitted root: centre = the class's mean inside that root.

    Labels choose the children (so this is no method): it shows what a frozen child with
    the best possible centre captures against the parent's founding mean.
    """
    ref = Refiner(RefinerParams(), rec.min_support).fit(rec.z_base, rec.roots_base)
    z, y = np.concatenate(rec.z_batches), np.concatenate(rec.y_batches)
    for a in absorption(rec):
        r = a["root"]
        inside = (rec.end_stream_roots == r) & (y == a["class"])
        if not a["fitted"] or inside.sum() < 2 or r not in ref.nodes_:
            continue
        node = ref.nodes_[r]
        rest = node.founding.mean(0) if len(node.founding) else z[rec.end_stream_roots == r].mean(0)
        cid = ref.next_id_
        ref.next_id_ += 1
        ref.nodes_[cid] = _Node(founding=z[inside], parent=r, centre=z[inside].mean(0), rest=rest, model_id=False)
        node.children.append(cid)
    pred = ref.predict(z, rec.end_stream_roots)
    novel = np.isin(y, rec.novel_classes)
    pred_ref = ref.predict(rec.z_ref, rec.ref_roots[-1])
    ch = hierarchical_churn(rec.ref_roots[0], pred_ref, ref.parent_ids_)
    return {**_score("all", y, pred), **_score("new", y[novel], pred[novel]), **_score("ref", rec.y_ref, pred_ref),
            "churn_final": ch["churn"], "refined_final": ch["refined"],
            "clusters": int(len(np.unique(pred)))}


# --------------------------------------------------------------------- the runner
VARIANTS: dict[str, RefinerParams | None] = {
    "roots": None,
    "roots+adopt": RefinerParams(split=False, adopt=True),
    "enrich": RefinerParams(sep_q=None),
    "enrich+sep50": RefinerParams(sep_q=0.5),
    "enrich+sep50+adopt": RefinerParams(sep_q=0.5, adopt=True),
    "enrich+sep90+adopt": RefinerParams(sep_q=0.9, adopt=True),
    "enrich+sep50+p1+adopt": RefinerParams(sep_q=0.5, persist=1, adopt=True),
    "enrich+sep50+gate1.21+adopt": RefinerParams(sep_q=0.5, gate=1.21, adopt=True),
    "enrich+sep50+rec+adopt": RefinerParams(sep_q=0.5, recursive=True, child_founding="taken", adopt=True),
    "enrich+sep50+win10+adopt": RefinerParams(sep_q=0.5, window=10, adopt=True),
    "geom_sep90": RefinerParams(enrich=False, sep_q=0.9),
}
#: Variants replayed on the recordings with loosened spawn budgets.
CONFIG_VARIANTS = ("roots", "roots+adopt", "enrich+sep50+adopt", "enrich+sep90+adopt")
#: Variants replayed on the drift recordings (children cannot move root ids, so few are needed).
DRIFT_VARIANTS = ("roots", "roots+adopt", "enrich+sep50+adopt", "enrich+sep50+win10+adopt")


def _cached(cache: Path | None, key: str, build):
    path = None if cache is None else cache / f"{key}.pkl"
    if path is not None and path.exists():
        return pickle.loads(path.read_bytes())
    value = build()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(value))
    return value


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def _table(title: str, rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[x if isinstance(x, str) else f"{x:.3f}" for x in r] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(w[i]) if i < 2 else c[i].rjust(w[i]) for i in range(len(header))) for c in cells]
    return "\n".join([f"== {title} ==", lines[0], "  ".join("-" * x for x in w), *lines[1:]])


def run_set(name: str, X: np.ndarray, y: np.ndarray, seeds: list[int], cache: Path | None, log) -> dict[str, Any]:
    """Baselines, StreamDEC and every refiner variant on one set; per-seed results and means."""
    n_classes = int(len(np.unique(y)))
    ci: dict[str, list[dict[str, Any]]] = {}
    gd: dict[str, list[dict[str, Any]]] = {}
    why: list[dict[str, Any]] = []
    for seed in seeds:
        for b, make in BASELINES.items():
            r = _cached(cache, f"{name}_{seed}_ci_{b}",
                        lambda: run_class_incremental(lambda k, s: make(k, s, n_classes), X, y, seed))
            ci.setdefault(b, []).append({k: v for k, v in r.items() if not isinstance(v, list)})
            log(f"{name} seed={seed} {b}")
        r = _cached(cache, f"{name}_{seed}_gd_frozen", lambda: run_gradual_drift(lambda k, s: FrozenKMeans(k, s), X, y, seed))
        gd.setdefault("frozen_kmeans", []).append({"tracking_root": r["tracking"], "tracking0": r["tracking_curve"][0],
                                                   "retention_root": r["tracking"] / r["tracking_curve"][0]})
        for cfg, sd_params in SD_CONFIGS.items():
            rec = _cached(cache, f"{name}_{seed}_ci_rec_{cfg}", lambda: record_class_incremental(X, y, seed, sd_params))
            log(f"{name} seed={seed} stream_dec {cfg} recorded (ci)")
            tag = "" if cfg == "default" else f"{cfg}/"
            if cfg == "default":
                why.append({"seed": seed, "min_support": rec.min_support, "absorption": absorption(rec)})
                ci.setdefault("oracle_children", []).append(oracle_children(rec))
            for v, params in VARIANTS.items():
                if cfg == "default" or v in CONFIG_VARIANTS:
                    ci.setdefault(tag + v, []).append(replay_ci(rec, params))
        drec = _cached(cache, f"{name}_{seed}_gd_rec_default", lambda: record_gradual_drift(X, y, seed, {}))
        log(f"{name} seed={seed} stream_dec recorded (drift)")
        for v in DRIFT_VARIANTS:
            gd.setdefault(v, []).append(replay_drift(drec, VARIANTS[v]))
        log(f"{name} seed={seed} variants replayed")
    refit = ci["refit_kmeans"]
    for rows in ci.values():
        for r, f in zip(rows, refit):
            r["all_vs_refit"] = r["acc_all"] / f["acc_all"]
            r["new_vs_refit"] = r["acc_new"] / f["acc_new"]
    return {"n_classes": n_classes, "n_items": int(len(y)),
            "ci": {m: {"per_seed": rows, "mean": _mean(rows)} for m, rows in ci.items()},
            "gd": {m: {"per_seed": rows, "mean": _mean(rows)} for m, rows in gd.items()},
            "absorption": why}


CI_COLS = [("churn", "churn_final"), ("churn max", "churn_max"), ("refined", "refined_final"), ("ACC all", "acc_all"),
           ("ACC new", "acc_new"), ("ACC ref", "acc_ref"), ("all/refit", "all_vs_refit"), ("new/refit", "new_vs_refit"),
           ("ids", "clusters"), ("children", "children"), ("adopted", "adopted")]
GD_COLS = [("trk root", "tracking_root"), ("trk0", "tracking0"), ("ret root", "retention_root"),
           ("ret fine", "retention_fine"), ("lost->other home", "lost_to_other_home_root"), ("churn", "churn_final"),
           ("children", "children")]


def format_tables(results: dict[str, Any]) -> str:
    """One class-incremental and one drift table (means over seeds), plus the absorption lines."""
    ci_rows, gd_rows, why = [], [], []
    for s, res in results.items():
        for m, e in res["ci"].items():
            ci_rows.append([s, m, *[e["mean"].get(k, float("nan")) for _, k in CI_COLS]])
        for m, e in res["gd"].items():
            gd_rows.append([s, m, *[e["mean"].get(k, float("nan")) for _, k in GD_COLS]])
        for w in res["absorption"]:
            parts = [f"c{a['class']}->{'fit' if a['fitted'] else 'new'}:{a['root']} {a['share']:.2f}" for a in w["absorption"]]
            why.append(f"{s} seed={w['seed']}: " + ", ".join(parts))
    return "\n\n".join([
        _table("class_incremental, finest ids, hierarchical churn (means over seeds)", ci_rows, ["set", "method", *[c for c, _ in CI_COLS]]),
        _table("gradual_drift, tracking on root ids (means over seeds)", gd_rows, ["set", "method", *[c for c, _ in GD_COLS]]),
        "== novel class -> root holding most of its stream items (fit = fitted id, new = spawned) ==\n" + "\n".join(why),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the study; print the tables; write JSON and text results."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", nargs="+", default=list(COARSE_SETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--cache", type=Path, default=None, help="pickle recordings and baseline results here")
    p.add_argument("--out", type=Path, default=_BENCH / "results" / "hierarchy_probe.json")
    args = p.parse_args(argv)
    limit_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    results = {}
    for name in args.sets:
        X, y, _ = load_coarse(args.data_dir, name)
        results[name] = run_set(name, X, y, args.seeds, args.cache, log)
    text = format_tables(results)
    print(text)
    meta = {"command": " ".join(sys.argv), "seeds": args.seeds, "variants": {k: (vars(v) if v else None) for k, v in VARIANTS.items()},
            "elapsed_s": time.perf_counter() - t0}
    write_json(args.out, {"meta": meta, "results": results})
    args.out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

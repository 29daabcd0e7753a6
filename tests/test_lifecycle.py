"""Lifecycle events downstream can rely on: born, retired and revived, their evidence and schema,
a store of labels kept valid from the records alone, and the tree ``stream-dec inspect`` shows.

One model-level stream makes every event: four fitted blobs; a group next to the first
one that becomes a child of its id; a transient group that gets an id and then stops
coming; a fitted class that stops coming (retired once the model remembers none of
its items) and comes back at the end (revived). The model remembers settled items in a
small reservoir, so it forgets a class that stopped coming within the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest

from stream_dec import StreamDEC
from stream_dec.io.codecs import encode_lifecycle
from stream_dec.online.lifecycle import retired_ids

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "stream_dec" / "schemas" / "lifecycle.schema.json").read_text())
N_BATCHES, BACK_AT, SAVE_AT = 75, 70, 60  # the absent class streams again from BACK_AT; a checkpoint at SAVE_AT


def _scenario(seed: int = 2):
    """``(model, held set, batches)``: the fitted model, items to store labels for, the stream."""
    rng = np.random.default_rng(seed)
    d = 8
    centres = rng.normal(size=(5, d)) * 8
    u = rng.normal(size=d)
    child = centres[0] + 6 * u / np.linalg.norm(u)

    def near(c, n):
        return (c + rng.normal(size=(n, d))).astype(np.float32)

    def base(k, n):
        return (centres[rng.integers(0, k, n)] + rng.normal(size=(n, d))).astype(np.float32)

    # max_update_ms: no clock cuts, so the run is the same on any machine.
    m = StreamDEC(n_clusters=4, hidden_dims=(), pretrain_epochs=5, refine_max_iter=0, n_init=1, random_state=seed, verbose=False,
                  device="cpu", reservoir_size=128, remember="settled", buffer_ttl=3, max_update_ms=1e6).fit(base(4, 400))
    held = np.concatenate([base(4, 400), near(child, 100)])
    batches = [
        np.concatenate([base(4 if v >= BACK_AT else 3, 300), near(child, 50)] + ([near(centres[4], 60)] if 1 <= v <= 6 else []))
        for v in range(N_BATCHES)
    ]
    return m, held, batches


def _lineage(cluster: int, parents: dict[int, int | None]) -> list[int]:
    """``[cluster, its parent, ..., its root]`` under ``parents`` (ids it does not name are roots)."""
    chain = [cluster]
    while parents.get(chain[-1]) is not None:
        chain.append(parents[chain[-1]])
    return chain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The stream through one model: labels of each batch (by the model before its update), the
    records of every update, the held set's labels at the start, and the model saved at SAVE_AT."""
    m, held, batches = _scenario()
    stored = m.predict(held)
    labels, records, saved = [], [], tmp_path_factory.mktemp("life") / "at-save.sdec"
    for v, X in enumerate(batches):
        if v == SAVE_AT:
            m.save(saved)
        labels.append((int(m.version_), m.predict(X)))
        report = m.partial_fit(X)
        records += [orjson.loads(encode_lifecycle(e)) for e in report.lifecycle]
        assert sorted(e["cluster"] for e in report.lifecycle if e["event"] == "born") == report.new_cluster_ids
    return {"model": m, "held": held, "stored": stored, "labels": labels, "records": records, "saved": saved, "batches": batches}


def test_every_event_happens_and_validates(run):
    recs = run["records"]
    kinds = {(r["event"], r["cluster"]) for r in recs}
    # New ids, and the absent fitted class (retired, back at the end).
    assert {e for e, _ in kinds} == {"born", "retired", "revived"}
    retired = [r for r in recs if r["event"] == "retired"]
    fitted_back = [r["cluster"] for r in recs if r["event"] == "revived"]
    assert fitted_back and all(c < 4 for c in fitted_back) and ("retired", fitted_back[0]) in kinds
    # What the records left retired is what the model says is retired now.
    last = {}
    for r in recs:
        if r["event"] in ("retired", "revived"):
            last[r["cluster"]] = r["event"]
    assert sorted(c for c, e in last.items() if e == "retired") == sorted(retired_ids(run["model"]))
    v = jsonschema.Draft202012Validator(SCHEMA)
    for r in recs:
        v.validate(r)
    for field, bad in (("remembered", -1), ("moved_to", [{"cluster": 3}]), ("last_assigned_version", "7")):
        assert not v.is_valid({**retired[0], field: bad}), field
    assert not v.is_valid({k: x for k, x in retired[0].items() if k != "forgotten"})


def test_retired_evidence_adds_up(run):
    m = run["model"]
    for r in (r for r in run["records"] if r["event"] == "retired"):
        assert r["remembered"] == r["forgotten"] + sum(x["items"] for x in r["moved_to"])
        assert r["window_versions"] == m.buffer_ttl
        assert r["last_assigned_version"] is None or r["last_assigned_version"] < r["model_version"]
        assert r["root"] == m.root_of(r["cluster"]) and r["parent"] == m.parent_ids_[r["cluster"]]


def test_a_retired_id_labels_nothing_unannounced(run):
    """An item labelled with a retired id is followed by a ``revived`` record for it (the next version)."""
    state, back = {}, {(r["cluster"], r["model_version"]) for r in run["records"] if r["event"] == "revived"}
    events = sorted(run["records"], key=lambda r: r["model_version"])
    i, checked = 0, 0
    for version, ids in run["labels"]:
        while i < len(events) and events[i]["model_version"] <= version:
            state[events[i]["cluster"]] = events[i]["event"]
            i += 1
        for c in np.unique(ids).tolist():
            if state.get(c) == "retired":
                assert (c, version + 1) in back, (c, version)
                checked += 1
    assert checked >= 1  # the absent class came back under its retired id
    last = {r["cluster"]: r["event"] for r in events}
    assert retired_ids(run["model"]) == sorted(c for c, e in last.items() if e == "retired")


def test_events_come_from_the_model_state_so_a_restored_model_announces_the_same(run):
    restored = StreamDEC.load(run["saved"], device="cpu")
    again = []
    for X in run["batches"][SAVE_AT:]:
        again += [orjson.loads(encode_lifecycle(e)) for e in restored.partial_fit(X).lifecycle]
    assert again == [r for r in run["records"] if r["model_version"] > SAVE_AT]
    assert retired_ids(restored) == retired_ids(run["model"])


def test_a_store_keeps_its_labels_valid_from_the_records_alone(run):
    """Labels stored at version 0, updated only from lifecycle records, against the final model.

    Every stored label of a remembered kind of item is the item's id now, or an ancestor
    of it that a ``born`` record announced (the item was refined), except at most the
    churn budget's share; items of a group the model never remembered may move to an id
    a ``born`` record announced. The roots
    the records give are the model's roots, and retirement never invalidates a label.
    """
    m, stored = run["model"], run["stored"]
    parents = {i: None for i in range(4)}
    for r in run["records"]:
        if r["event"] == "born":
            parents[r["cluster"]] = r["parent"]
    assert parents == m.parent_ids_  # the records alone rebuild the hierarchy
    now = m.predict(run["held"])
    same = stored == now
    refined = np.array([s != n and s in _lineage(n, parents) for s, n in zip(stored.tolist(), now.tolist())])
    other = ~same & ~refined
    assert refined.sum() > 0  # some of the child group's items moved into a child of their stored id
    # The base items (the kind the model remembers) keep the churn promise; the child
    # group's items, never remembered, may go to a new root, which a born record announced.
    n_base = len(stored) - 100
    assert other[:n_base].mean() <= m.max_total_churn
    born = {r["cluster"] for r in run["records"] if r["event"] == "born"}
    assert set(now[n_base:][other[n_base:]].tolist()) <= born
    assert [_lineage(n, parents)[-1] for n in now.tolist()] == m.roots(now).tolist()
    assert np.array_equal(m.roots(stored)[~other], m.roots(now)[~other])  # same root for every label kept valid


def test_inspect_shows_the_tree_with_births_and_retirements(run, tmp_path):
    m = run["model"]
    m.save(tmp_path / "ck")
    shown = subprocess.run([sys.executable, "-m", "stream_dec.cli", "inspect", "--checkpoint", str(tmp_path / "ck")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    info = json.loads(shown.stdout)
    assert info["retired_ids"] == retired_ids(m) and info["parent_ids"] == {str(k): v for k, v in m.parent_ids_.items()}
    lines = shown.stderr.splitlines()[1:]
    assert [int(line.split()[0]) for line in lines] == _depth_first(info["tree"])
    born = {r["cluster"]: r for r in run["records"] if r["event"] == "born"}
    for line in lines:
        cid, depth = int(line.split()[0]), (len(line) - len(line.lstrip())) // 2
        assert depth == len(_lineage(cid, m.parent_ids_)) - 1  # a child sits one level under its parent
        if cid in born:
            assert f"born v{born[cid]['model_version']}, support {born[cid]['support']}" in line
        else:
            assert "fitted" in line
        assert ("retired" in line) == (cid in info["retired_ids"])


def _depth_first(nodes: list[dict]) -> list[int]:
    return [i for n in nodes for i in [n["id"], *_depth_first(n["children"])]]

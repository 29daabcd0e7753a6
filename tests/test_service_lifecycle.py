"""The service publishes the id hierarchy: a lifecycle record per new id, and ``root`` on every assignment.

A downstream store that keeps the labels it read can keep them valid from the
lifecycle records alone: the test replays the output topic into such a store and
compares it with the final model's ``predict``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
from kafka_helpers import consume, send_items, service_settings, setup_stream

from stream_dec import StreamDEC
from stream_dec.service import StreamService

SCHEMAS = Path(__file__).resolve().parents[1] / "stream_dec" / "schemas"


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def _lineage(cluster: int, parents: dict[int, int | None]) -> list[int]:
    """``[cluster, its parent, ..., its root]`` under ``parents`` (ids it does not name are roots)."""
    chain = [cluster]
    while parents.get(chain[-1]) is not None:
        chain.append(parents[chain[-1]])
    return chain


def test_lifecycle_records_and_roots_let_a_store_keep_its_labels(broker, blobs, tmp_path):
    tag = "life"
    ckpt = setup_stream(broker, blobs, tmp_path, tag)
    # Eight batches of 100 known items and 40 of the novel blob: the novel blob gets ids.
    X = np.concatenate([np.concatenate([blobs["X"][i * 100 : (i + 1) * 100], blobs["X_new"][i * 40 : (i + 1) * 40]]) for i in range(8)])
    items = [(f"item-{i}", X[i]) for i in range(len(X))]
    send_items(broker, f"in-{tag}", items)
    service = StreamService(service_settings(broker, ckpt, tag, batch_size=140, interval=1))
    service.run(max_idle_s=2.0, install_signals=False)

    final = StreamDEC.load(ckpt)
    parents = final.parent_ids_
    born_ids = [int(i) for i in final.cluster_ids_ if int(i) >= 5]
    assert born_ids, "the novel blob must get an id"
    out = consume(broker.bootstrap_servers, f"out-{tag}", len(items) + service.processed_batches + len(born_ids))
    values = [json.loads(r.value) for r in out]
    by_kind = {k: [v for v in values if v["kind"] == k] for k in ("assignment", "drift", "lifecycle")}
    assert len(by_kind["assignment"]) == len(items) and len(values) == sum(map(len, by_kind.values()))

    # Exactly one born record per new id a drift record names, keyed by that id, valid against its schema.
    named = [i for d in by_kind["drift"] for i in d["new_cluster_ids"]]
    life = by_kind["lifecycle"]
    assert sorted(named) == born_ids and sorted(v["cluster"] for v in life) == born_ids
    assert {r.key for r in out if json.loads(r.value)["kind"] == "lifecycle"} == {str(i).encode() for i in born_ids}
    lifecycle_schema, assignment_schema = _schema("lifecycle"), _schema("assignment")
    for v in life:
        jsonschema.validate(v, lifecycle_schema)
        assert v["event"] == "born" and v["parent"] == parents[v["cluster"]] and v["root"] == final.root_of(v["cluster"])
        born_in = next(d for d in by_kind["drift"] if v["cluster"] in d["new_cluster_ids"])
        assert v["model_version"] == born_in["model_version"]

    # Every assignment carries the root of its cluster, consistent with the final checkpoint's hierarchy.
    for a in by_kind["assignment"]:
        assert a["root"] == _lineage(a["cluster"], parents)[-1]
    for a in by_kind["assignment"][::25]:
        jsonschema.validate(a, assignment_schema)

    # A downstream store: the labels it read, and the hierarchy from the lifecycle records alone.
    stored = {a["id"]: a["cluster"] for a in by_kind["assignment"]}
    known = {i: None for i in range(5)} | {v["cluster"]: v["parent"] for v in life}
    assert known == parents  # the records alone rebuild parent_ids_
    now = dict(zip((i for i, _ in items), final.predict(X).tolist()))
    same = sum(stored[i] == now[i] for i in stored)
    refined = sum(stored[i] != now[i] and stored[i] in _lineage(now[i], known) for i in stored)
    other = len(stored) - same - refined
    # What this shows: with no relabelling yet, a stored label is the final model's id, or
    # (the novel items labelled before their id was born) an ancestor the lifecycle
    # records name; any other change is churn, within the model's budget.
    assert same + refined + other == len(items) and refined > 0
    assert other / len(items) <= final.max_total_churn

"""Checkpoints: exact round-trip, atomic directory rotation, corruption handling, no pickle."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_dec import CheckpointError, StreamDEC
from stream_dec import checkpoint as ckpt
from stream_dec.online import persistence

DATA = Path(__file__).parent / "data"


def _updated(fitted, blobs, tmp_path, n=3):
    fitted.save(tmp_path / "base.sdec")
    m = StreamDEC.load(tmp_path / "base.sdec")
    for i in range(n):
        m.partial_fit(np.concatenate([blobs["X"][i * 100 : i * 100 + 100], blobs["X_new"][i * 40 : i * 40 + 40]]))
    return m


def test_round_trip_is_bit_identical_and_resumes_identically(fitted, blobs, tmp_path):
    m = _updated(fitted, blobs, tmp_path)
    path = m.save(tmp_path / "m.sdec", extra={"offsets": {"embeddings": {"0": 123}}})
    m2 = StreamDEC.load(path)
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    assert np.array_equal(m.predict(X), m2.predict(X))
    assert np.array_equal(m.predict_proba(X), m2.predict_proba(X))
    for name in ("centres_", "memory_", "fisher_", "ewc_anchor_", "freq_", "radius_"):
        assert torch.equal(getattr(m, name), getattr(m2, name)), name
    assert m2.version_ == m.version_ == 3 and m2.checkpoint_extra_ == {"offsets": {"embeddings": {"0": 123}}}
    assert np.array_equal(m.reservoir_.data, m2.reservoir_.data) and len(m.buffer_) == len(m2.buffer_)
    # Resuming from the checkpoint continues exactly as the original model does.
    batch = np.concatenate([blobs["X"][500:600], blobs["X_new"][200:260]])
    r1, r2 = m.partial_fit(batch), m2.partial_fit(batch)
    assert r1.new_cluster_ids == r2.new_cluster_ids and r1.churn == r2.churn
    assert torch.equal(m.centres_, m2.centres_)
    assert np.array_equal(m.predict(X), m2.predict(X))


def test_directory_keeps_newest_and_falls_back_on_corruption(fitted, blobs, tmp_path):
    d = tmp_path / "ckpts"
    m = _updated(fitted, blobs, tmp_path, n=0)
    for i in range(5):
        m.partial_fit(blobs["X"][i * 50 : i * 50 + 50])
        m.save(d, keep=3)
    files = ckpt.checkpoint_files(d)
    assert [f.name for f in files] == [f"ckpt-{v:012d}.sdec" for v in (5, 4, 3)]
    assert StreamDEC.load(d).version_ == 5
    # Flip one byte in the newest: it fails its checksum and the previous one is used.
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    assert StreamDEC.load(d).version_ == 4
    with pytest.raises(CheckpointError, match="checksum"):
        StreamDEC.load(files[0])
    # Truncate the next one too: still falls back.
    files[1].write_bytes(files[1].read_bytes()[:1000])
    assert StreamDEC.load(d).version_ == 3
    for f in files:
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        StreamDEC.load(d)


def test_missing_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        StreamDEC.load(tmp_path / "nope.sdec")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        StreamDEC.load(tmp_path)
    (tmp_path / "x.sdec").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(CheckpointError, match="bad header"):
        StreamDEC.load(tmp_path / "x.sdec")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_loading_never_executes_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A well-formed file (valid checksum) whose payload is a malicious pickle.
    buf = io.BytesIO()
    torch.save({"format": 1, "evil": _Evil()}, buf)
    import hashlib

    payload = buf.getvalue()
    path = tmp_path / "evil.sdec"
    path.write_bytes(ckpt.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match="cannot be decoded"):
        StreamDEC.load(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("part, key", [("ewc", "fisher"), ("clusters", "gate_cur"), ("scalars", "latent_scale_"), ("rule", "name")])
def test_incomplete_state_is_rejected_whole(fitted, tmp_path, part, key):
    state = fitted._state(None)
    del state[part][key]
    ckpt.write_atomic(tmp_path / "partial.sdec", state)
    with pytest.raises(CheckpointError, match="incomplete"):
        StreamDEC.load(tmp_path / "partial.sdec")


def test_inconsistent_state_is_rejected(fitted, tmp_path):
    state = fitted._state(None)
    state["ewc"]["fisher"] = state["ewc"]["fisher"][:-1]
    ckpt.write_atomic(tmp_path / "short.sdec", state)
    with pytest.raises(CheckpointError, match="incomplete or inconsistent"):
        StreamDEC.load(tmp_path / "short.sdec")
    state = fitted._state(None)
    state["format"] = 99
    ckpt.write_atomic(tmp_path / "future.sdec", state)
    with pytest.raises(CheckpointError, match="format 99"):
        StreamDEC.load(tmp_path / "future.sdec")


def test_rule_state_is_saved_only_for_the_rule_that_uses_it(fitted, blobs, tmp_path):
    m = _updated(fitted, blobs, tmp_path, n=1)
    assert m._state(None)["rule"] == {"name": "mean"}  # the mean rule has no optimiser moments
    m.set_params(centre_rule="dec")
    m.partial_fit(blobs["X"][:200])
    rule = m._state(None)["rule"]
    assert rule["name"] == "dec" and rule["adam_t"].shape == (m.n_clusters_,) and (rule["adam_t"] > 0).all()
    m2 = StreamDEC.load(m.save(tmp_path / "dec.sdec"))
    assert torch.equal(m2.rule_.m, m.rule_.m) and torch.equal(m2.rule_.t, m.rule_.t)


@pytest.mark.parametrize("rule", ["mean", "dec"])
def test_format_1_checkpoint_loads_and_continues_as_the_old_code_did(rule, tmp_path):
    """tests/data/format1_<rule>.sdec was written by the format-1 code (tests/data/make_format1.py),
    with the labels it gave and what its next partial_fit did."""
    path, expected = DATA / f"format1_{rule}.sdec", np.load(DATA / f"format1_{rule}.npz")
    assert ckpt.read_verified(path)["format"] == 1
    m = StreamDEC.load(path, device="cpu")  # the recorded figures are the CPU's
    assert m.centre_rule == rule and m.n_clusters_ > 4 and m.spawned_.any()  # a spawned cluster's rows migrate too
    assert m.checkpoint_extra_ == {"offsets": {"in": {"0": 42}}}
    assert np.array_equal(m.predict(expected["X"]), expected["labels"])
    state = m._state(None)
    assert state["format"] == persistence.FORMAT_VERSION == 3
    assert set(m.parent_ids_.values()) == {None}  # format 1 had no hierarchy: every id is a root
    assert set(state["rule"]) == ({"name"} if rule == "mean" else {"name", "adam_m", "adam_v", "adam_t"})
    report = m.partial_fit(expected["X_next"]).to_dict()
    report.pop("update_ms")
    report.pop("plan", None)
    assert report.pop("refined", 0.0) == 0.0  # no refinement: the model continues as saved
    assert [e["event"] for e in report.pop("lifecycle")] == ["born"] * len(report["new_cluster_ids"])
    assert report == ast.literal_eval(str(expected["report_next"]))
    assert np.array_equal(m.predict(expected["X"]), expected["labels_next"])
    # Saved again, it is a format-3 file that loads to the same model.
    m2 = StreamDEC.load(m.save(tmp_path / "v3.sdec"))
    assert ckpt.read_verified(tmp_path / "v3.sdec")["format"] == 3
    assert np.array_equal(m2.predict(expected["X"]), expected["labels_next"])


def test_atomic_write_leaves_no_temp_files(fitted, tmp_path):
    fitted.save(tmp_path / "a.sdec")
    fitted.save(tmp_path / "a.sdec")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sdec"]


def test_parent_ids_round_trip_and_format_2_migrates_to_roots(fitted, blobs, tmp_path):
    m = _updated(fitted, blobs, tmp_path, n=6)
    assert m.spawned_.any(), "the fixture stream must spawn a cluster"
    m2 = StreamDEC.load(m.save(tmp_path / "m.sdec"))
    assert m2.parent_ids_ == m.parent_ids_ and m2.summary()["tree"] == m.summary()["tree"]
    # A format-2 state (no parent, born or support columns) loads with every id a root.
    state = m._state(None)
    state["format"] = 2
    for name in ("parent", "born", "support"):
        del state["clusters"][name]
    ckpt.write_atomic(tmp_path / "v2.sdec", state)
    old = StreamDEC.load(tmp_path / "v2.sdec")
    assert old.parent_ids_ == {int(i): None for i in m.cluster_ids_}
    assert old.clusters_.born.tolist() == [0 if not s else -1 for s in m.spawned_.tolist()]
    X = np.concatenate([blobs["X"], blobs["X_new"]])
    assert np.array_equal(old.predict(X), m.predict(X))

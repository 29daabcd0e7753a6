"""`stream-dec demo` end to end as a real process: embedded broker, real sample data, the service in-process.

The run sends the stream as fast as it can (``--rate 0``) with a long batch wait, so
every micro-batch is cut by size, and on the CPU, so the run is deterministic (seed 0)
and the quality bounds below hold on every run. At the demo's default pacing batches
are also cut by the clock; churn on REF stays within the same 1% there (measured on
replays with random cuts, docs/experiments.md), but the run differs from run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "stream_dec" / "data" / "banking77_sample.npz"


@pytest.fixture(scope="module")
def demo():
    """The JSON report and stderr of one ``stream-dec demo --json`` run."""
    proc = subprocess.run(
        [sys.executable, "-m", "stream_dec.cli", "demo", "--json", "--rate", "0", "--max-wait-ms", "2000"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "STREAM_DEC_MODEL__DEVICE": "cpu"},
    )
    assert proc.returncode == 0, f"demo failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout), proc.stderr


def test_sample_data_is_small_real_and_attributed():
    assert SAMPLE.stat().st_size < 3_000_000
    with np.load(SAMPLE, allow_pickle=False) as z:
        X, y, names = z["X"], z["y"], z["label_names"]
        attribution = str(z["attribution"])
    assert X.dtype == np.float16 and X.shape == (3600, 384)
    assert np.allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1.0, atol=5e-3)
    assert y.dtype == np.int32 and sorted(np.unique(y)) == list(range(24)) == list(range(len(names)))
    assert np.bincount(y).tolist() == [150] * 24
    assert "CC BY 4.0" in attribution and "Casanueva" in attribution and "PolyAI" in attribution
    readme = (SAMPLE.parent / "README.md").read_text()
    assert "CC BY 4.0" in readme and "Efficient Intent Detection with Dual Sentence Encoders" in readme


def test_report_fields_are_present(demo):
    report, _ = demo
    for key in ("dataset", "split", "broker", "training", "stream", "latency_ms", "update_ms", "clusters", "churn_ref", "quality", "dlq"):
        assert key in report, key
    for key in ("records_per_s", "micro_batches", "labelled", "records_sent", "malformed_sent"):
        assert key in report["stream"], key
    for part in ("stream", "stream_novel", "stream_known", "ref_after", "frozen_stream", "frozen_stream_novel"):
        assert set(report["quality"][part]) == {"acc", "nmi", "ari"}, part
    assert "embedded tansu" in report["broker"]
    assert "CC BY 4.0" in report["dataset"]["attribution"]


def test_every_stream_record_is_labelled_once(demo):
    report, _ = demo
    s = report["stream"]
    assert s["records_sent"] == report["split"]["stream"] > 2000
    assert s["labelled"] == s["records_sent"] and s["duplicates"] == 0
    assert s["micro_batches"] >= 10 and s["drift_records"] >= 10
    assert s["records_per_s"] > 0 and s["seconds"] > 0
    lat = report["latency_ms"]
    assert lat["items"] == s["records_sent"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]


def test_new_clusters_appear_with_new_ids(demo):
    report, _ = demo
    c = report["clusters"]
    assert c["start"] == len(report["dataset"]["base_classes"])
    assert len(c["created_ids"]) >= 1 and min(c["created_ids"]) >= c["start"]  # appended, never reused
    assert c["end"] == c["start"] + len(c["created_ids"])
    assert set(c["created_ids"]) <= set(c["created_ids_in_drift_records"])


def test_old_ids_stay_put_and_quality_beats_the_frozen_model(demo):
    report, _ = demo
    q = report["quality"]
    assert report["churn_ref"] <= 0.01  # the churn promise (README.md); refinements announced by records excluded
    assert 0 <= report["refined_ref"] <= 1
    assert q["stream"]["acc"] >= 0.45 and q["stream_novel"]["acc"] >= 0.45 and q["stream"]["nmi"] >= 0.55
    assert q["stream"]["acc"] >= q["frozen_stream"]["acc"] + 0.02  # online learning must help
    assert q["ref_after"]["acc"] >= 0.65


def test_malformed_records_go_to_the_dlq(demo):
    report, _ = demo
    dlq = report["dlq"]
    assert dlq["records"] == report["stream"]["malformed_sent"] >= 5
    assert dlq["reasons"] == dlq["expected"]
    assert {"bad_json", "wrong_dimension", "non_finite"} <= set(dlq["reasons"])


def test_progress_is_visible(demo):
    _, stderr = demo
    for phase in ("data:", "broker: ready", "train:", "service: owns", "produced", "reading the outputs back"):
        assert phase in stderr, phase


def test_split_follows_the_stream_protocol():
    from stream_dec.demo import load_sample, split_like_protocol

    sample = load_sample(SAMPLE)
    split = split_like_protocol(sample.y, seed=0)
    assert len(split.base_classes) == 14 and len(split.novel_classes) == 10
    assert (len(split.fit), len(split.ref), len(split.stream)) == (14 * 75, 14 * 30, 14 * 45 + 10 * 150)
    assert len(set(split.fit) | set(split.ref) | set(split.stream)) == len(sample.y)  # disjoint, complete
    assert not np.isin(sample.y[split.fit], split.novel_classes).any()
    assert max(split.novel_start.values()) < len(split.stream) // 2  # every new intent starts in the first half
    assert split_like_protocol(sample.y, seed=0).stream.tolist() == split.stream.tolist()


def test_split_is_the_benchmark_split_and_unchanged_for_its_seed():
    from stream_dec.demo import load_sample, split_like_protocol
    from stream_dec.evaluation.protocol import class_incremental_split

    y = load_sample(SAMPLE).y
    split = split_like_protocol(y, seed=0)
    bench = class_incremental_split(y, seed=0)
    assert np.array_equal(split.fit, bench.base) and np.array_equal(split.ref, bench.ref)
    assert np.array_equal(split.stream, bench.stream)
    # The split the demo has always streamed for seed 0, so its reports stay comparable.
    assert split.base_classes.tolist() == [0, 1, 3, 4, 6, 7, 9, 11, 13, 14, 16, 17, 18, 20]
    assert sorted(split.novel_start.values()) == [7, 103, 105, 236, 237, 326, 410, 503, 510, 513]
    assert split.stream[:8].tolist() == [3383, 1793, 1552, 3319, 482, 522, 2172, 3236]
    digests = [hashlib.sha256(a.astype("<i8").tobytes()).hexdigest()[:16] for a in (split.fit, split.ref, split.stream)]
    assert digests == ["59c19ac8460e5c12", "44db62b80e0dcbf4", "91281ced9f6fd7e1"]


def test_bad_data_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "nolabels.npz"
    np.savez(bad, X=np.zeros((10, 4), dtype=np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "stream_dec.cli", "demo", "--data", str(bad), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "stream-dec demo: error:" in proc.stderr and "labels y" in proc.stderr

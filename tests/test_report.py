"""`stream-dec report`: the HTML page of a real demo run's topics and of files of records, bad input, and Chromium.

One ``stream-dec demo`` runs on the module's embedded broker (as fast as it can, like
tests/test_demo.py, so the run is deterministic); its output and dead-letter topics
stay there for the report to read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kafka_helpers import consume

from stream_dec.cli import main
from stream_dec.io.codecs import REASON_HEADER
from stream_dec.report import FIGURES, parse_records
from stream_dec.report import analysis

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``stream-dec`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _header(page: str) -> dict[str, str]:
    """The header table: html id -> cell text."""
    return {k: v.replace("&#x27;", "'") for k, v in re.findall(r'<td id="(h-[a-z-]+)">([^<]*)</td>', page)}


def _figures(page: str) -> dict[str, int]:
    """Embedded figures: html id -> PNG bytes (each a data: URI, nothing fetched)."""
    import base64

    out = {}
    for fig_id, data in re.findall(r'<img id="([a-z-]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)">', page):
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        out[fig_id] = len(png)
    return out


@pytest.fixture(scope="module")
def demo(broker, tmp_path_factory):
    """One demo run on the module's broker: its JSON report, plus its output and dead-letter records read back."""
    tmp = tmp_path_factory.mktemp("demo")
    proc = subprocess.run(
        [sys.executable, "-m", "stream_dec.cli", "demo", "--json", "--quiet", "--rate", "0", "--max-wait-ms", "2000",
         "--bootstrap-servers", broker.bootstrap_servers],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "STREAM_DEC_MODEL__DEVICE": "cpu", "TMPDIR": str(tmp)},  # the demo's page goes to TMPDIR
    )
    assert proc.returncode == 0, f"demo failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    # Lifecycle records (one per id born; the demo's report does not count them) are read by the extra poll.
    n_out = report["stream"]["labelled"] + report["stream"]["duplicates"] + report["stream"]["drift_records"]
    out = consume(broker.bootstrap_servers, report["topics"]["output"], n_out, timeout_s=30)
    dlq = consume(broker.bootstrap_servers, report["topics"]["dlq"], report["dlq"]["records"], timeout_s=30)
    return report, out, dlq


@pytest.fixture(scope="module")
def topic_page(demo, broker, tmp_path_factory):
    """``stream-dec report`` of the demo's output topic (and its DLQ): exit status, stdout, stderr, page text, path."""
    report, _, _ = demo
    path = tmp_path_factory.mktemp("report") / "report.html"
    rc, out, err = _run(["report", "--bootstrap-servers", broker.bootstrap_servers, "--topic", report["topics"]["output"],
                         "--dlq-topic", report["topics"]["dlq"], "--out", str(path)])
    return rc, out, err, path.read_text() if path.exists() else "", path


def _expected(out_records) -> dict[str, str]:
    """Header figures computed here from the records themselves."""
    values = [json.loads(r.value) for r in out_records]
    assignments = [v for v in values if v["kind"] == "assignment"]
    drifts = [v for v in values if v["kind"] == "drift"]
    lifecycle = [v for v in values if v["kind"] == "lifecycle"]
    versions = {v["model_version"] for v in values}
    return {
        "h-records": str(len(values)),
        "h-kinds": f"{len(assignments)} assignment, {len(drifts)} drift, {len(lifecycle)} lifecycle",
        "h-ids": str(len({a["cluster"] for a in assignments})),
        "h-versions": f"{len(versions)} ({min(versions)} to {max(versions)})",
    }


def test_topic_page_has_every_figure_and_the_records_figures(demo, topic_page):
    report, out_records, dlq_records = demo
    rc, stdout, _, page, path = topic_page
    assert rc == 0 and stdout.strip() == str(path)
    assert set(_figures(page)) == set(FIGURES)
    header = _header(page)
    for key, value in _expected(out_records).items():
        assert header[key] == value, key
    assert header["h-ids"] == str(report["clusters"]["used_in_labels"])
    assert header["h-batches"].startswith(f"{report['stream']['drift_records']} (assignments grouped by drift records' offset ranges")
    assert header["h-labelled"] == f"{report['stream']['labelled']} (0 duplicate assignments)"
    created = len(report["clusters"]["created_ids_in_drift_records"])
    assert header["h-id-life"] == f"{report['clusters']['start']} there from the start, {created} born, 0 retired"
    reasons = {}
    for r in dlq_records:
        reason = dict(r.headers)[REASON_HEADER].decode()
        reasons[reason] = reasons.get(reason, 0) + 1
    assert reasons == report["dlq"]["reasons"]
    assert header["h-dlq"] == f"{len(dlq_records)}" + "".join(f"; {k} {v}" for k, v in sorted(reasons.items()))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC to .* UTC \([\d.,]+ s\)", header["h-span"])
    born = [json.loads(r.value) for r in out_records if json.loads(r.value)["kind"] == "lifecycle"]
    assert sorted(v["cluster"] for v in born) == sorted(report["clusters"]["created_ids_in_drift_records"])
    assert (f"From {len(born)} lifecycle records" if born else "No lifecycle records in this stream") in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained: nothing fetched


def test_progress_goes_to_stderr(demo, topic_page):
    _, out_records, dlq_records = demo
    _, _, stderr, _, _ = topic_page
    assert f"report: read {len(out_records):,} of {len(out_records):,} records of " in stderr
    assert f"report: read {len(dlq_records):,} of {len(dlq_records):,} records of " in stderr


def test_the_demo_writes_its_own_page(demo, topic_page):
    report, _, _ = demo
    page = Path(report["report"]).read_text()
    assert set(_figures(page)) == set(FIGURES)
    mine, theirs = _header(page), _header(topic_page[3])
    for key in ("h-records", "h-kinds", "h-ids", "h-versions", "h-batches", "h-id-life", "h-dlq"):
        assert mine[key] == theirs[key], key


def test_batches_match_the_drift_records(demo):
    _, out_records, _ = demo
    stream = parse_records(((str(r.offset), r.value) for r in out_records), "demo")
    b = analysis.batches(stream)
    ids, counts = analysis.sizes(stream, b)
    assert (b.batch >= 0).all()  # every assignment lies in one batch's offset ranges
    assert counts.sum(1).tolist() == [d["n_items"] for d in b.drifts]
    born = {c for d in b.drifts for c in d["new_cluster_ids"]}
    for j, c in enumerate(ids):  # a born id labels nothing before the update that made it
        if int(c) in born:
            birth = next(t for t, d in enumerate(b.drifts) if c in d["new_cluster_ids"])
            assert counts[: birth + 1, j].sum() == 0
    flows = analysis.flow(stream, b, analysis.id_tree(stream, b, ids, counts), ids, counts)
    for _, names, shares in flows:  # each item labelled once: it stayed, or went to a refinement born later
        assert names[0] == "stayed" and all(n.endswith("(refinement)") for n in names[1:])
        assert np.allclose(shares.sum(1)[shares.sum(1) > 0], 1.0)


def test_file_page_matches_the_topic_page(demo, topic_page, tmp_path):
    _, out_records, _ = demo
    records = tmp_path / "labels.jsonl"
    records.write_bytes(b"\n".join(r.value for r in out_records) + b"\n")
    rc, _, _ = _run(["report", "--records", str(records), "--out", str(tmp_path / "file.html")])
    assert rc == 0
    page = (tmp_path / "file.html").read_text()
    assert set(_figures(page)) == set(FIGURES)
    header, theirs = _header(page), _header(topic_page[3])
    for key in ("h-records", "h-kinds", "h-ids", "h-versions", "h-batches", "h-id-life"):
        assert header[key] == theirs[key], key
    assert header["h-span"].startswith("unknown") and header["h-dlq"].startswith("not read")


def _lifecycle_records() -> list[dict]:
    """Three batches of ids 0-2, then id 2 refined into 3 and 4 (lifecycle born), then id 1 retired."""
    recs, off = [], 0
    plan = [[0, 1, 2]] * 2 + [[0, 1, 3, 4, 2]] * 2 + [[0, 3, 4]]
    for b, ids in enumerate(plan):
        first = off
        for i in range(20):
            recs.append({"kind": "assignment", "id": f"x{off}", "cluster": ids[i % len(ids)], "confidence": 0.9,
                         "model_version": b, "topic": "in", "partition": 0, "offset": off})
            off += 1
        recs.append({"kind": "drift", "model_version": b + 1, "n_items": 20, "update_ms": 1.0, "churn": 0.0,
                     "centre_shift": 0.1, "novelty_rate": 0.0, "new_cluster_ids": [3, 4] if b == 1 else [],
                     "n_clusters": len(ids), "topic": "in", "offset_ranges": [{"partition": 0, "first_offset": first, "last_offset": off - 1}]})
        if b == 1:
            recs += [{"kind": "lifecycle", "event": "born", "cluster": c, "parent": 2, "root": 2, "model_version": 2, "support": 11}
                     for c in (3, 4)]
        if b == 3:
            recs.append({"kind": "lifecycle", "event": "retired", "cluster": 1, "parent": None, "root": 1, "model_version": 4})
    return recs


def test_lifecycle_records_show_refinements_and_retirements(tmp_path):
    recs = _lifecycle_records()
    path = tmp_path / "life.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    rc, _, _ = _run(["report", "--records", str(path), "--out", str(tmp_path / "life.html")])
    assert rc == 0
    page = (tmp_path / "life.html").read_text()
    assert set(_figures(page)) == set(FIGURES) and "From 3 lifecycle records" in page
    assert _header(page)["h-id-life"] == "3 there from the start, 2 born, 1 retired"
    stream = parse_records(((str(i), r) for i, r in enumerate(recs)), "life")
    b = analysis.batches(stream)
    ids, counts = analysis.sizes(stream, b)
    nodes = analysis.id_tree(stream, b, ids, counts)
    assert (nodes[3].parent, nodes[3].born_version, nodes[3].support, nodes[3].support_from) == (2, 2, 11, "lifecycle")
    assert nodes[1].retired_version == 4 and analysis.tree_order(nodes) == [0, 1, 2, 3, 4]
    flow = {p: (names, shares) for p, names, shares in analysis.flow(stream, b, nodes, ids, counts)}
    names, shares = flow[2]
    assert names == ["stayed", "to 3 (refinement)", "to 4 (refinement)"]
    # Batch 2: 20 items over ids 0,1,3,4,2 -> 4 each; id 2's lineage holds 12: a third each.
    # Batch 4 (id 2 no longer assigned): 20 items over 0,3,4 -> 7, 7, 6; the lineage holds 13.
    assert np.allclose(shares[2], [1 / 3, 1 / 3, 1 / 3]) and np.allclose(shares[4], [0, 7 / 13, 6 / 13])
    assert np.allclose(shares[0], [1, 0, 0])


def _fails(argv: list[str], capsys, expect: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("report: read ")]  # progress lines
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stream-dec report: error: ") and expect in lines[0], err


def test_bad_files_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _fails(["report", "--records", str(empty), "--out", str(tmp_path / "r.html")], capsys, "no records")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"kind": "drift", "model_version": 1}) + "\n" + json.dumps({"kind": "metrics", "x": 1}) + "\n")
    _fails(["report", "--records", str(unknown), "--out", str(tmp_path / "r.html")], capsys,
           "unknown.jsonl line 2: unknown record kind 'metrics'")
    _fails(["report", "--records", str(tmp_path / "missing.jsonl")], capsys, "no such file")
    assert not (tmp_path / "r.html").exists()


def test_bad_topics_exit_2(demo, broker, tmp_path, capsys):
    report, _, _ = demo
    broker.create_topics("report-empty")
    servers = broker.bootstrap_servers
    _fails(["report", "--bootstrap-servers", servers, "--topic", "report-empty", "--out", str(tmp_path / "r.html")], capsys,
           f"topic report-empty on {servers}: no records")
    misspelt = report["topics"]["output"].replace("labels", "lables")
    _fails(["report", "--bootstrap-servers", servers, "--topic", misspelt, "--out", str(tmp_path / "r.html")], capsys,
           f"topic {misspelt!r} does not exist on {servers} (did you mean {report['topics']['output']}")
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=servers)
    try:
        assert misspelt not in consumer.topics()  # reading it did not create it
    finally:
        consumer.close()
    # An input topic holds no output records: its first record is not JSON of a known kind.
    _fails(["report", "--bootstrap-servers", servers, "--topic", report["topics"]["input"], "--quiet", "--out",
            str(tmp_path / "r.html")], capsys, f"topic {report['topics']['input']} on {servers} partition 0 offset 0")
    _fails(["report", "--bootstrap-servers", servers, "--topic", report["topics"]["output"], "--since", "2100-01-01",
            "--quiet", "--out", str(tmp_path / "r.html")], capsys, "no records")


def test_since_keeps_recent_records(demo, broker, tmp_path):
    report, out_records, _ = demo
    rc, _, _ = _run(["report", "--bootstrap-servers", broker.bootstrap_servers, "--topic", report["topics"]["output"],
                     "--since", "1d", "--quiet", "--out", str(tmp_path / "r.html")])
    assert rc == 0 and _header((tmp_path / "r.html").read_text())["h-records"] == str(len(out_records))


def test_without_matplotlib_it_says_how_to_install_it(tmp_path):
    # A Python where `import matplotlib` fails, as on an install without the report extra.
    code = ("import sys; sys.modules['matplotlib'] = None; from stream_dec.cli import main; "
            f"sys.exit(main(['report', '--records', {str(tmp_path / 'x.jsonl')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("stream-dec report: error: drawing the report needs matplotlib, which is not installed: "
                                   "pip install 'stream_dec[report]'")


def _chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_page_renders_in_headless_chromium(topic_page, tmp_path):
    import matplotlib.image

    path = topic_page[4]
    shot = tmp_path / "shot.png"
    proc = _chromium(path, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "CONSOLE" not in proc.stderr, proc.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    drawn = pixels[..., :3].min(axis=-1) < 0.9  # not white
    assert drawn.mean() > 0.05  # the table and the pictures, not a blank page
    assert drawn[700:1300].mean() > 0.05  # the pictures below the table are drawn
    dom = _chromium(path, tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    assert f'data-images="loaded {len(FIGURES)}/{len(FIGURES)}"' in dom.stdout
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr

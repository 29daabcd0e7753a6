"""Scale-out benchmark: one learner, many predictors (roles of stream_dec/service/roles.py).

Five measurements, each against the targets of the scale-out work (README "Scale-out"):

1. **predictor vs bare loop** (in-process, one embedded tansu broker): a
   :class:`~stream_dec.service.predictor.PredictorService` over the same 384-d float32
   records as bench/run_service.py's bare kafka-python consume-decode-produce loop
   (imported from there, unchanged), at batch 4096 (default) and 1024, at sample rates
   1 and 0.1 (the predictor also sends the latents of the sampled items on the feed
   topic). A :class:`~stream_dec.service.roles.LearnerService` publishes its first
   version on the model topic and is stopped before any timing, so the predictor's
   throughput is its own (on 2 cores a learner running beside it would take its CPU; in
   production it runs elsewhere). Throughput = records / (first poll with records ->
   last batch acknowledged); ratio = median of ``--repeats`` paired (bare, predictor) runs.
2. **CPU-seconds per 1,000 records per role, 1 -> 3 predictors**: N predictor PROCESSES
   (``python -m stream_dec.cli run --role predictor``) and one learner process, each with
   one torch/OpenMP thread, over a fresh 6-partition input topic per N. Records are
   produced once every predictor holds its partitions; each process's CPU time
   (``/proc/<pid>/stat`` utime+stime, all threads) is taken from then until the
   predictors have labelled every record (predictors, broker) and the learner has
   caught up with the feed (learner). This is a 2-core machine: CPU per record is
   measured, wall-clock scaling is not.
3. **propagation** (from the N=3 run of 2): per model version published while every
   predictor was running, the time from its ``published-at`` header to the moment the
   LAST predictor labels with it or a newer version (the predictors' log line ``model
   version V in use``, millisecond clock of the same machine); p50/p95 over versions.
   The predictors' own ``stream_dec_model_propagation_seconds`` histogram (bucket
   bounds) is reported beside it.
4. **learner at >= 100k records/s by sampling** (in-process learner, a fresh broker per
   run): a pacer process sends the feed records predictors would send for an aggregate
   input of ``--aggregate-rate`` records/s at sample rates 1, 0.5, 0.1 (latents of
   real stream rows from the base model's encoder, 1,024 rows a record), and once
   adaptively: starting at 1 and following the rate the learner advises in its
   snapshots (read with the model topic follower, as predictors do). Reported: latents
   offered and learnt per second, the feed lag over time (bounded or growing), update
   p50/p95, and for the adaptive run the rate it settles to.
5. **quality at sample rates 1, 0.5, 0.1** on the class-incremental protocol
   (docs/quality-protocol.md; bench/protocol.py and bench/run_quality.py, imported):
   the learner sees only the items of each micro-batch that ``sample_mask`` keeps (by
   item id), through ``partial_fit_latent(transform(...))``; ACC/NMI and churn are
   scored on every item with ``predict``. ``pooled@R`` rows keep the learner's batch
   size instead (sampled latents accumulate to a micro-batch's worth before an update:
   a learner's batches close at ``batch.max_size`` whatever the rate). The plain
   ``partial_fit`` StreamDEC runs beside as a check (rate 1 gives the same figures).
   One thread.

    nice -n 10 python bench/run_scale.py                 # full run, about 15 min on 2 cores
    nice -n 10 python bench/run_scale.py --quick         # smoke run, about 2-3 min
    python bench/run_scale.py --sections quality         # one part only

Writes ``bench/results/scale.json`` and the tables to ``bench/results/scale.txt``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# bench/ on the path: the sibling scripts import the same way whether this file is run or imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import run_class_incremental
from run_quality import (
    CI,
    Method,
    format_table,
    limit_threads,
    load_set,
    run_one,
    seed_means,
    write_json,
)
from run_service import (
    CpuMeter,
    PhaseClock,
    bare_loop,
    build_vectors,
    fit_base,
    fresh_ckpt,
    loadavg,
    pct,
    produce_inputs,
    restore_kafka_logger,
    split_stream,
    versions,
)

SECTIONS = ("predictor", "cpu", "learner", "quality")
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
QUALITY_SETS = ("stackoverflow", "banking77", "mnist_test")
RATES = (1.0, 0.5, 0.1)
#: Seconds a role waits for its group and model before the benchmark gives up.
READY_S = 180.0
_TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- settings and processes
def role_settings(bootstrap: str, role: str, group: str, in_topic: str, out_tag: str, model_topic: str, feed_topic: str, **extra):
    """Settings of one in-process role: defaults except topics, group, fast group join, metrics off."""
    from stream_dec.settings import load_settings

    return load_settings(
        role=role, kafka__bootstrap_servers=bootstrap, kafka__group_id=group, kafka__input_topic=in_topic,
        kafka__output_topic=f"out-{out_tag}", kafka__dlq_topic=f"dlq-{out_tag}", kafka__model_topic=model_topic,
        kafka__feed_topic=feed_topic, kafka__session_timeout_ms=6000, kafka__heartbeat_interval_ms=1000, metrics__port=0, **extra,
    )


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far; 0 when gone."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def scrape(port: int) -> dict[str, float]:
    """Every sample of a process's ``/metrics``, summed over labels except ``le`` (kept in the name); {} when down."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        le = re.search(r'le="([^"]+)"', name_labels)
        key = f"{name}|{le.group(1)}" if le else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


def free_port() -> int:
    """A loopback TCP port free now (for a role process's metrics server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RoleProcess:
    """One ``python -m stream_dec.cli run --role ROLE`` process with its metrics port and log file."""

    def __init__(self, role: str, env: dict[str, str], log: Path):
        self.role, self.port, self.log = role, free_port(), log
        env = {**env, "STREAM_DEC_METRICS__PORT": str(self.port), "STREAM_DEC_METRICS__HOST": "127.0.0.1"}
        with open(log, "w") as fh:  # a file, not a pipe: nobody reads it while the process runs
            self.proc = subprocess.Popen([sys.executable, "-m", "stream_dec.cli", "run", "--role", role], env=env, cwd=REPO_ROOT,
                                         stdout=fh, stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float:
        """Sum over labels of one metric (nan when the process does not answer)."""
        return scrape(self.port).get(name, float("nan"))

    def cpu(self) -> float:
        """CPU seconds so far."""
        return proc_cpu(self.proc.pid)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, then wait (SIGKILL after ``timeout``); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def role_env(bootstrap: str, tag: str, in_topic: str, ckpt: Path, batch: int, wait_ms: int) -> dict[str, str]:
    """Environment of the role processes of one run: topics and group of ``tag``, one thread each, fast group join."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_DEC_")}
    env.update(
        STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS=bootstrap, STREAM_DEC_KAFKA__GROUP_ID=f"g-{tag}", STREAM_DEC_KAFKA__INPUT_TOPIC=in_topic,
        STREAM_DEC_KAFKA__OUTPUT_TOPIC=f"out-{tag}", STREAM_DEC_KAFKA__DLQ_TOPIC=f"dlq-{tag}",
        STREAM_DEC_KAFKA__MODEL_TOPIC=f"model-{tag}", STREAM_DEC_KAFKA__FEED_TOPIC=f"feed-{tag}",
        STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS="6000", STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS="1000",
        STREAM_DEC_BATCH__MAX_SIZE=str(batch), STREAM_DEC_BATCH__MAX_WAIT_MS=str(wait_ms), STREAM_DEC_CHECKPOINT__DIR=str(ckpt), STREAM_DEC_MODEL__THREADS="1",
        STREAM_DEC_LOG_LEVEL="INFO", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
    )
    return env


def until(cond, what: str, procs: list[RoleProcess], timeout_s: float = READY_S) -> None:
    """Wait for ``cond()``; raise with the logs' tails when a process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        dead = [p for p in procs if p.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0].log.name} exited ({dead[0].proc.returncode}) waiting for {what}:\n{dead[0].log.read_text()[-3000:]}")
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}:\n" + "\n".join(f"--- {p.log.name}\n{p.log.read_text()[-1500:]}" for p in procs))


# ----------------------------------------------------------------------------- 1. predictor vs bare loop
def start_learner(settings, hooks=None):
    """A LearnerService running on a daemon thread; returns (service, thread) once it has published a version."""
    from stream_dec.service.roles import LearnerService

    learner = LearnerService(settings, hooks=hooks)
    thread = threading.Thread(target=learner.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    deadline = time.monotonic() + READY_S
    while learner.metrics.snapshots_published._value.get() < 1:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the learner published no model version")
        time.sleep(0.1)
    return learner, thread


def make_predictor(settings, n_expected: int, clock: PhaseClock):
    """A PredictorService whose hooks feed ``clock``; it stops itself after ``n_expected`` records."""
    from stream_dec.service import ServiceHooks
    from stream_dec.service.predictor import PredictorService

    def poll(n: int, seconds: float, consumer_seconds: float) -> None:
        if n and clock.t_first is None:
            clock.t_first, clock.cpu_first = time.perf_counter(), time.process_time()

    def batch(info) -> None:
        clock.process_ms.append(info.timings["total"] * 1000)
        clock.batch_sizes.append(len(info.records))
        clock.t_last_ack, clock.cpu_last = time.perf_counter(), time.process_time()
        clock.labelled += len(info.records)
        if clock.labelled >= n_expected:
            service.stop()

    service = PredictorService(settings, hooks=ServiceHooks(on_poll=poll, on_batch=batch))
    return service


def predictor_cell(broker, in_topic: str, model_topic: str, batch: int, rate: float, n: int, tag: str, threads: int | None = None) -> dict[str, Any]:
    """One predictor run over ``n`` pre-produced records: throughput, CPU per record, feed items sent."""
    broker.create_topics([f"out-{tag}", f"dlq-{tag}", f"feed-{tag}"])
    settings = role_settings(broker.bootstrap_servers, "predictor", f"g-{tag}", in_topic, tag, model_topic, f"feed-{tag}",
                             batch__max_size=batch, scale__sample_rate=rate, model__threads=threads or 0)
    clock = PhaseClock()
    service = make_predictor(settings, n, clock)
    restore_kafka_logger()
    service.run(max_idle_s=15.0, install_signals=False)
    if clock.labelled < n or clock.t_first is None:
        raise RuntimeError(f"predictor cell {tag}: labelled {clock.labelled} of {n} records")
    seconds = clock.t_last_ack - clock.t_first
    m = service.metrics
    return {
        "records": clock.labelled, "batches": len(clock.batch_sizes), "seconds": seconds, "records_per_s": clock.labelled / seconds,
        "cpu_us_per_record": (clock.cpu_last - clock.cpu_first) / clock.labelled * 1e6,
        "process_ms": {"p50": pct(clock.process_ms, 50), "p95": pct(clock.process_ms, 95)},
        "feed_sent": int(m.feed_items.labels("sent")._value.get()), "feed_skipped": int(m.feed_items.labels("skipped")._value.get()),
        "model_version": int(service.snapshot.version),
    }


def predictor_section(broker, X_stream: np.ndarray, base: Path, work: Path, args) -> list[dict[str, Any]]:
    """Paired (bare, predictor) runs per batch size and sample rate; median ratio of each cell.

    The predictor runs with ``--predictor-threads`` torch threads (``model.threads``;
    set on torch here too, for a predictor that does not apply the setting itself),
    plus one cell at torch's default (one per core) when ``--default-threads-row``.
    """
    n = args.records
    in_topic = "in-pred"
    broker.create_topics([in_topic])
    prod = produce_inputs(broker.bootstrap_servers, in_topic, X_stream[:n], "float32")
    print(f"[predictor] pre-produced {n} records at {prod['records_per_s']:,.0f}/s", flush=True)
    broker.create_topics(["out-s1", "dlq-s1"])
    learner, thread = start_learner(role_settings(broker.bootstrap_servers, "learner", "g-s1", "unused-s1", "s1", "model-s1", "feed-s1",
                                                  checkpoint__dir=str(fresh_ckpt(base, work, "s1"))))
    learner.stop()
    thread.join(timeout=60)
    cells = [(b, r, args.predictor_threads) for b in args.batches for r in args.sample_rates]
    if args.default_threads_row:
        cells.append((args.batches[0], args.sample_rates[0], None))
    meter = CpuMeter(broker.pid)
    rows = []
    for batch, rate, threads in cells:
        row = predictor_pairs(broker, meter, in_topic, X_stream.shape[1], batch, rate, threads, n, args.repeats)
        rows.append(row)
        print(f"[predictor batch {batch} rate {rate:g} threads {row['torch_threads']}] bare {row['bare']['records_per_s']:,.0f}/s predictor "
              f"{row['predictor']['records_per_s']:,.0f}/s ratio {row['ratio']:.2f} (pairs {', '.join(f'{x:.2f}' for x in row['pair_ratios'])})", flush=True)
    return rows


def predictor_pairs(broker, meter: CpuMeter, in_topic: str, dim: int, batch: int, rate: float, threads: int | None, n: int,
                    repeats: int) -> dict[str, Any]:
    """``repeats`` alternating (bare, predictor) runs of one cell; best throughputs, median paired ratio, CPU gauge."""
    import torch

    default = torch.get_num_threads()
    bares, preds, pairs, cpu = [], [], [], []
    for rep in range(repeats):
        tag = f"p{batch}-{rate:g}-{threads or 0}-{rep}"
        broker.create_topics([f"out-bare-{tag}"])
        a = meter.snapshot()
        b = bare_loop(broker.bootstrap_servers, in_topic, f"out-bare-{tag}", "float32", dim, batch, n)
        torch.set_num_threads(threads or default)
        try:
            p = predictor_cell(broker, in_topic, "model-s1", batch, rate, n, tag, threads)
        finally:
            torch.set_num_threads(default)
        cpu.append(meter.foreign_cores(a, meter.snapshot()))
        bares.append(b), preds.append(p), pairs.append(p["records_per_s"] / b["records_per_s"])
    return {
        "batch": batch, "sample_rate": rate, "torch_threads": threads or default, "records": n,
        "ratio": float(np.median(pairs)), "pair_ratios": pairs,
        "bare": max(bares, key=lambda r: r["records_per_s"]), "predictor": max(preds, key=lambda r: r["records_per_s"]),
        "cpu_ratio": float(np.median([r["cpu_us_per_record"] for r in bares]) / np.median([r["cpu_us_per_record"] for r in preds])),
        "all_bare_records_per_s": [r["records_per_s"] for r in bares], "all_predictor_records_per_s": [r["records_per_s"] for r in preds],
        "cpu_cores": cpu, "loadavg": loadavg(),
    }


# ----------------------------------------------------------------------------- 2+3. CPU per role, propagation
def cpu_run(broker, X_stream: np.ndarray, base: Path, work: Path, n_pred: int, n: int, batch: int, wait_ms: int) -> dict[str, Any]:
    """One learner and ``n_pred`` predictor processes over a fresh 6-partition topic: CPU-s per 1,000 records per role.

    ``wait_ms`` (batch.max_wait_ms of every role) is long enough that batches close on
    size for every N, as in the backlog one scales out for: the one producer here feeds
    the topic slower than N predictors label, so with the default 500 ms the batches of
    three predictors would close on time with a third of the records each, and the
    per-batch costs would be measured instead.
    """
    tag = f"cpu{n_pred}"
    in_topic = f"in-{tag}"
    broker.create_topics([in_topic], partitions=6)
    broker.create_topics([f"out-{tag}", f"dlq-{tag}"])
    env = role_env(broker.bootstrap_servers, tag, in_topic, fresh_ckpt(base, work, tag), batch, wait_ms)
    learner = RoleProcess("learner", env, work / f"{tag}-learner.log")
    procs = [learner]
    try:
        until(lambda: learner.metric("stream_dec_snapshots_published_total") >= 1, "the learner's first version", procs)
        preds = [RoleProcess("predictor", env, work / f"{tag}-predictor-{i}.log") for i in range(n_pred)]
        procs += preds
        until(lambda: sum(p.metric("stream_dec_assigned_partitions") for p in preds) == 6
              and all(p.metric("stream_dec_waiting_for_model") == 0 for p in preds), "6 partitions assigned", procs)
        time.sleep(2.0)  # idle CPU of every role, as a baseline beside the figures
        idle0 = {id(p): p.cpu() for p in procs}
        time.sleep(2.0)
        idle = {p: (p.cpu() - idle0[id(p)]) / 2.0 for p in procs}
        t_ready = time.time()
        cpu0, broker0, t0 = {id(p): p.cpu() for p in procs}, proc_cpu(broker.pid), time.monotonic()
        produce_inputs(broker.bootstrap_servers, in_topic, X_stream[:n], "float32")
        until(lambda: sum(p.metric("stream_dec_records_total") for p in preds) >= n, "every record labelled", procs)
        pred_cpu = [p.cpu() - cpu0[id(p)] for p in preds]
        broker_cpu, wall = proc_cpu(broker.pid) - broker0, time.monotonic() - t0
        learner_cpu = learner_caught_up(learner, procs) - cpu0[id(learner)]
        labelled = [int(p.metric("stream_dec_records_total")) for p in preds]
        batches = [int(p.metric("stream_dec_batches_total")) for p in preds]
        hist = [{k: v for k, v in scrape(p.port).items() if k.startswith("stream_dec_model_propagation_seconds")} for p in preds]
        feed_sent = sum(p.metric("stream_dec_feed_items_total") for p in preds)  # sent + skipped
        status = [p.stop() for p in preds] + [learner.stop()]
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.stop(timeout=20)
    k = 1000.0 / n
    return {
        "predictors": n_pred, "records": n, "labelled_per_predictor": labelled, "batches_per_predictor": batches,
        "batch_wait_ms": wait_ms, "wall_s": wall,
        "predictor_cpu_s": pred_cpu, "learner_cpu_s": learner_cpu, "broker_cpu_s": broker_cpu,
        "cpu_s_per_1k": {"predictors": sum(pred_cpu) * k, "learner": learner_cpu * k, "broker": broker_cpu * k,
                         "aggregate": (sum(pred_cpu) + learner_cpu + broker_cpu) * k,
                         # Less what the predictors burn idle (polls, heartbeats) over the same wall time.
                         "predictors_less_idle": (sum(pred_cpu) - sum(idle[p] for p in preds) * wall) * k},
        "idle_cores": {"predictors": [idle[p] for p in preds], "learner": idle[learner]},
        "feed_items_seen": feed_sent, "exit_status": status, "loadavg": loadavg(),
        "propagation": propagation(broker.bootstrap_servers, f"model-{tag}", preds, t_ready, hist),
    }


def learner_caught_up(learner: RoleProcess, procs: list[RoleProcess], quiet_s: float = 3.0) -> float:
    """The learner's CPU seconds at its last batch, once it processed none for ``quiet_s`` with no lag left.

    Called when every record is labelled, so every feed record is on the topic; the
    learner polls at least every batch wait, so a quiet learner has read them all.
    """
    last, last_cpu, since = None, learner.cpu(), time.monotonic()
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        batches = learner.metric("stream_dec_batches_total")
        if batches != last:
            last, last_cpu, since = batches, learner.cpu(), time.monotonic()
        elif not learner.metric("stream_dec_consumer_lag_records") > 0 and time.monotonic() - since >= quiet_s:  # 0 or not reported
            return last_cpu
        if learner.proc.poll() is not None:
            raise RuntimeError(f"the learner exited: {learner.log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError("the learner did not catch up with the feed")


_IN_USE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: model version (\d+) in use", re.MULTILINE)


def propagation(bootstrap: str, model_topic: str, preds: list[RoleProcess], t_ready: float, hist: list[dict]) -> dict[str, Any]:
    """Per version published after ``t_ready``: publication -> the last predictor labelling with it (or newer), seconds."""
    published = published_versions(bootstrap, model_topic)
    swaps = []  # per predictor: [(time, version)] from its log
    for p in preds:
        swaps.append(sorted((_dt.datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(v)) for ts, v in _IN_USE.findall(p.log.read_text())))
    delays, missed = [], 0
    for version, at in sorted(published.items()):
        if at < t_ready:
            continue
        firsts = [next((t for t, v in s if v >= version), None) for s in swaps]
        if any(t is None for t in firsts):
            missed += 1
            continue
        delays.append(max(0.0, max(firsts) - at))
    pooled: dict[str, float] = {}
    for h in hist:
        for key, value in h.items():
            pooled[key] = pooled.get(key, 0.0) + value
    return {
        "versions": len(delays), "versions_not_reached": missed,
        "every_predictor_s": {"p50": pct(delays, 50), "p95": pct(delays, 95), "max": max(delays) if delays else None},
        "histogram_p50_le": _bucket_quantile(pooled, 0.5), "histogram_p95_le": _bucket_quantile(pooled, 0.95),
        "histogram_count": pooled.get("stream_dec_model_propagation_seconds_count"),
    }


def _bucket_quantile(samples: dict[str, float], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of the scraped propagation histogram."""
    buckets = sorted((float(k.split("|")[1]), v) for k, v in samples.items() if k.startswith("stream_dec_model_propagation_seconds_bucket|"))
    if not buckets or buckets[-1][1] == 0:
        return None
    return next(le for le, cum in buckets if cum >= q * buckets[-1][1])


def published_versions(bootstrap: str, topic: str) -> dict[int, float]:
    """``{version: published-at}`` of the first publication of every version on the model topic."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100,
                      fetch_max_bytes=8 * 1_048_576, max_partition_fetch_bytes=8 * 1_048_576)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek(tp, 0)
    out: dict[int, float] = {}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            for recs in c.poll(timeout_ms=200).values():
                for r in recs:
                    h = {k: v for k, v in r.headers}
                    if h.get("chunk", b"").startswith(b"0/"):
                        out.setdefault(int(h["model-version"]), float(h["published-at"]))
            hw = c.highwater(tp)
            if hw is not None and c.position(tp) >= hw:
                break
    finally:
        c.close()
    return out


# ----------------------------------------------------------------------------- 4. the learner at a high aggregate rate
PACER = r"""
import json, sys, time
import numpy as np
from stream_dec.io.feed import encode_latents
from stream_dec.io.modeltopic import ModelFollower
from stream_dec.io.producer import make_producer
bootstrap, feed, model, encoder, path, aggregate, mode, seconds = sys.argv[1:9]
aggregate, seconds = float(aggregate), float(seconds)
Z = np.load(path)
pool = [encode_latents(Z[i:i + 1024], model_version=0, encoder=encoder)[0] for i in range(0, len(Z) - 1023, 1024)]
producer = make_producer(bootstrap, linger_ms=5, acks=1)
follower = ModelFollower(bootstrap, model) if mode == "adaptive" else None
rate = 1.0 if mode == "adaptive" else float(mode)
due = sent = records = 0.0
t0 = last = time.monotonic()
next_report = t0
while True:
    now = time.monotonic()
    if now - t0 >= seconds:
        break
    if follower is not None:
        pubs = follower.poll(0)
        if pubs and "sample-rate" in pubs[-1].meta:
            rate = float(pubs[-1].meta["sample-rate"])
    due += aggregate * rate * (now - last)
    last = now
    while due - sent >= 1024:
        value, headers = pool[int(records) % len(pool)]
        producer.send(feed, value=value, headers=headers)
        sent += 1024
        records += 1
    if now >= next_report:
        print(json.dumps({"t": time.time(), "records": int(records), "rows": int(sent), "rate": rate, "behind_rows": max(0.0, due - sent)}), flush=True)
        next_report += 0.5
    time.sleep(0.01)
producer.flush()
print(json.dumps({"t": time.time(), "records": int(records), "rows": int(sent), "rate": rate, "end": True}), flush=True)
"""


def learner_run(base: Path, work: Path, Z_path: Path, encoder: str, mode: str, args) -> dict[str, Any]:
    """The learner on its own broker, fed by the pacer for ``--learner-seconds``; lag over time and update times."""
    from stream_dec.io.broker import EmbeddedBroker
    from stream_dec.service import ServiceHooks

    tag = f"l{mode}"
    ends, updates = [0], []  # the learner's next feed offset; (perf time, rows, update ms)

    def batch(info) -> None:
        ends.append(info.end.get(0, ends[-1]))

    def update(report, started: float, ended: float) -> None:
        updates.append((ended, int(report.n_items), float(report.update_ms)))

    with EmbeddedBroker() as broker:  # a fresh broker per run: tansu keeps every feed byte in memory
        broker.create_topics([f"out-{tag}", f"dlq-{tag}"])
        settings = role_settings(broker.bootstrap_servers, "learner", f"g-{tag}", "unused", tag, f"model-{tag}", f"feed-{tag}",
                                 checkpoint__dir=str(fresh_ckpt(base, work, tag)))
        learner, thread = start_learner(settings, ServiceHooks(on_batch=batch, on_update=update))
        pacer = subprocess.Popen([sys.executable, "-c", PACER, broker.bootstrap_servers, f"feed-{tag}", f"model-{tag}", encoder, str(Z_path),
                                  str(args.aggregate_rate), mode, str(args.learner_seconds)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        samples = []
        for line in pacer.stdout:  # the window: the pacer's first report (it is sending) to its last
            s = json.loads(line)
            s["perf"], s["cpu"] = time.perf_counter(), time.process_time()
            s["elapsed_s"], s["lag_latents"] = s["perf"] - samples[0]["perf"] if samples else 0.0, max(0, s["records"] - ends[-1]) * 1024
            samples.append(s)
        pacer.wait(timeout=60)
        cpu = samples[-1]["cpu"] - samples[0]["cpu"] if samples else 0.0  # this process: mostly the learner's threads
        if len(samples) < 2:
            raise RuntimeError(f"learner run {mode}: the pacer reported {len(samples)} times")
        t_start, t_end = samples[0]["perf"], samples[-1]["perf"]
        learner.stop()
        thread.join(timeout=120)
    return learner_summary(mode, samples, [u for u in updates if t_start <= u[0] <= t_end], t_end - t_start, cpu, args)


def learner_summary(mode: str, samples: list[dict], updates: list[tuple], seconds: float, cpu: float, args) -> dict[str, Any]:
    """Offered and learnt latents/s, lag trend over the second half, update percentiles, settled rate."""
    lag = np.array([s["lag_latents"] for s in samples], dtype=float)
    t = np.array([s["elapsed_s"] for s in samples])
    half = t >= t[-1] / 2 if len(t) else np.array([], bool)
    slope = float(np.polyfit(t[half], lag[half], 1)[0]) if half.sum() >= 3 else None
    offered = (samples[-1]["rows"] - samples[0]["rows"]) / seconds
    learnt = sum(u[1] for u in updates) / seconds
    rates = [s["rate"] for s in samples]
    tail = [s["rate"] for s, h in zip(samples, half) if h]
    return {
        "mode": mode, "aggregate_rate": args.aggregate_rate, "seconds": seconds,
        "target_latents_per_s": args.aggregate_rate * (float(mode) if mode != "adaptive" else float(np.mean(rates) if rates else 1.0)),
        "offered_latents_per_s": offered, "learnt_latents_per_s": learnt, "learner_process_cpu_cores": cpu / seconds,
        "updates": len(updates), "update_ms": {"p50": pct([u[2] for u in updates], 50), "p95": pct([u[2] for u in updates], 95)},
        "lag_latents": {"max": float(lag.max()) if len(lag) else None, "final": float(lag[-1]) if len(lag) else None,
                        "slope_per_s_second_half": slope},
        "lag_bounded": slope is not None and slope * seconds / 2 < 4 * 4096,
        "settled_rate": float(np.mean(tail)) if tail else None, "rate_range_second_half": [min(tail), max(tail)] if tail else None, "rate_trace": rates[:: max(1, len(rates) // 20)],
        "lag_trace": lag[:: max(1, len(lag) // 20)].tolist(),
    }


def learner_section(base: Path, X_stream: np.ndarray, work: Path, args) -> list[dict[str, Any]]:
    """One run per fixed sample rate, then the adaptive run."""
    from stream_dec import StreamDEC
    from stream_dec.online.snapshot import encoder_fingerprint

    model = StreamDEC.load(base)
    Z_path = work / "latents.npy"
    np.save(Z_path, np.ascontiguousarray(model.transform(X_stream), dtype=np.float32))
    encoder = encoder_fingerprint(model)
    rows = []
    for mode in [f"{r:g}" for r in args.learner_rates] + (["adaptive"] if args.adaptive else []):
        row = learner_run(base, work, Z_path, encoder, mode, args)
        rows.append(row)
        print(f"[learner {mode}] offered {row['offered_latents_per_s']:,.0f}/s learnt {row['learnt_latents_per_s']:,.0f}/s "
              f"lag max {row['lag_latents']['max']:,.0f} final {row['lag_latents']['final']:,.0f} bounded {row['lag_bounded']} "
              f"update p50/p95 {row['update_ms']['p50']}/{row['update_ms']['p95']} settled rate {row['settled_rate']}", flush=True)
    return rows


# ----------------------------------------------------------------------------- 5. quality under sampling
class SampledStreamDEC:
    """A StreamDEC that learns, per micro-batch, only from the latents of the items ``sample_mask`` keeps.

    What a learner fed by predictors at ``rate`` sees: ``partial_fit_latent(transform(X[kept]))``.
    ``predict`` (and everything else) is the model's own, on every item. ``ids_of(X)`` names
    the rows of a batch (their item ids in the stream).

    ``pooled``: the sampled latents wait until they are as many as the micro-batch they
    came from, then make one update. A learner's batches keep their size whatever the
    rate (they close at ``batch.max_size`` latents), so at rate 0.1 it updates about a
    tenth as often on full batches, rather than as often on tenth-size ones.
    """

    def __init__(self, model, rate: float, ids_of, pooled: bool = False):
        self.model, self.rate, self.ids_of, self.pooled = model, rate, ids_of, pooled
        self._pending: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def parent_ids_(self) -> dict:
        """The model's id hierarchy (so the protocol also scores hierarchical churn)."""
        return self.model.parent_ids_

    def fit(self, X, *args, **kwargs) -> SampledStreamDEC:
        """Fit the model on BASE (no sampling: the learner's first model is fitted offline)."""
        self.model.fit(X, *args, **kwargs)
        return self

    def partial_fit(self, X, *args, **kwargs):
        """Learn from the sampled items' latents; no update when the sample is empty."""
        from stream_dec.io.feed import sample_mask

        keep = sample_mask(self.ids_of(X), self.rate)
        if not keep.any():
            return None
        Z = self.model.transform(np.asarray(X)[keep])
        if not self.pooled:
            return self.model.partial_fit_latent(Z)
        self._pending.append(Z)
        if sum(len(z) for z in self._pending) < len(X):
            return None
        Z, self._pending = np.concatenate(self._pending), []
        return self.model.partial_fit_latent(Z)

    def predict(self, X) -> np.ndarray:
        """The model's ids for every row."""
        return self.model.predict(X)


def item_ids(set_name: str, X: np.ndarray):
    """``ids_of(B)``: the stream item id (``<set>-<row>``) of every row of ``B``, a batch of rows of ``X``.

    The protocol hands a model rows, not ids; a row's bytes find its index in ``X``.
    """
    index = {row.tobytes(): i for i, row in enumerate(np.asarray(X, dtype=np.float32))}
    return lambda B: [f"{set_name}-{index[r.tobytes()]}" for r in np.asarray(B, dtype=np.float32)]


def quality_section(args) -> dict[str, Any]:
    """Class-incremental protocol per set and seed at each sample rate, plus plain partial_fit as the check."""
    from stream_dec import StreamDEC

    limit_threads(1)
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for set_name in args.quality_sets:
        X, y = load_set(args.data_dir, set_name)
        ids_of = item_ids(set_name, X)
        methods = {"stream_dec (partial_fit)": Method(lambda k, s, n: StreamDEC(n_clusters=k, random_state=s, verbose=False))}
        for pooled, rate in [(False, r) for r in RATES] + [(True, r) for r in RATES if r < 1]:
            methods[f"{'pooled' if pooled else 'sampled'}@{rate:g}"] = Method(
                lambda k, s, n, _r=rate, _ids=ids_of, _p=pooled: SampledStreamDEC(StreamDEC(n_clusters=k, random_state=s, verbose=False), _r, _ids, _p))
        n_classes = len(np.unique(y))
        by_method = results.setdefault(set_name, {m: {"per_seed": []} for m in methods})
        for seed in args.quality_seeds:
            for name, method in methods.items():
                by_method[name]["per_seed"].append(run_one(run_class_incremental, method, n_classes, X, y, seed, f"{set_name} seed={seed} {name}", t_start))
        for entry in by_method.values():
            entry["mean"] = seed_means(entry["per_seed"])
    return results


# ----------------------------------------------------------------------------- report
def report(payload: dict[str, Any]) -> str:
    """The tables of every section that ran."""
    meta = payload["metadata"]
    out = [f"== scale-out benchmark: {meta['cpu_count']} CPUs (CPU per record measured; no wall-clock scaling on 2 cores), one tansu broker ==",
           f"command: {meta['command']}", f"load average start {meta['loadavg_start']} end {meta.get('loadavg_end')}; wall {meta.get('wall_seconds', 0):.0f} s"]
    if payload.get("predictor"):
        out.append("\n-- 1. predictor vs bare kafka-python loop (384-d float32, one partition; target ratio >= 0.95) --")
        out.append(f"{'batch':>5} {'rate':>4} {'thr':>3} {'bare rec/s':>10} {'pred rec/s':>10} {'ratio':>5} {'pairs':>16} {'cpu us b/p':>10} {'cpu r':>5} {'feed sent':>9} {'oth':>4}")
        for r in payload["predictor"]:
            b, p = r["bare"], r["predictor"]
            out.append(f"{r['batch']:>5} {r['sample_rate']:>4g} {r['torch_threads']:>3} {b['records_per_s']:>10,.0f} {p['records_per_s']:>10,.0f} {r['ratio']:>5.2f} "
                       f"{'/'.join(f'{x:.2f}' for x in r['pair_ratios']):>16} {b['cpu_us_per_record']:>4.0f}/{p['cpu_us_per_record']:<5.0f} "
                       f"{r['cpu_ratio']:>5.2f} {p['feed_sent']:>9,} {np.mean([c['others'] for c in r['cpu_cores']]):>4.1f}")
        out.append("rec/s = best of the repeats; ratio = median of the paired runs' ratios; cpu us b/p = CPU us per record of the bench process "
                   "(bare / predictor, all threads); thr = the predictor's torch threads; cpu r = their ratio; feed sent = latents the predictor sent the learner; oth = cores used by other processes")
    if payload.get("cpu"):
        out.append("\n-- 2. CPU-seconds per 1,000 records per role (processes, one thread each, 6 input partitions; target: predictors flat 1 -> 3) --")
        out.append(f"{'predictors':>10} {'records':>7} {'predictors':>10} {'less idle':>9} {'learner':>7} {'broker':>6} {'aggregate':>9} {'wall s':>6} {'pred rec/s/core':>15} {'mean batch':>10}")
        for r in payload["cpu"]:
            c = r["cpu_s_per_1k"]
            out.append(f"{r['predictors']:>10} {r['records']:>7} {c['predictors']:>10.3f} {c['predictors_less_idle']:>9.3f} {c['learner']:>7.3f} "
                       f"{c['broker']:>6.3f} {c['aggregate']:>9.3f} {r['wall_s']:>6.1f} {1000 / c['predictors']:>15,.0f} {sum(r['labelled_per_predictor']) / max(1, sum(r['batches_per_predictor'])):>10,.0f}")
        base = payload["cpu"][0]["cpu_s_per_1k"]["predictors"]
        out.append("predictors' CPU per record relative to 1 predictor: " + ", ".join(f"{r['predictors']}: {r['cpu_s_per_1k']['predictors'] / base:.2f}x" for r in payload["cpu"]))
        out.append("predictors = all predictor processes together; less idle = minus their idle CPU rate (measured before the records) x wall; learner = the learner process until it caught up with the feed (sample rate 1); "
                   "pred rec/s/core = records per CPU-second of the predictors (what one core labels)")
        for r in payload["cpu"]:
            pr = r["propagation"]
            e = pr["every_predictor_s"]
            if e["p50"] is not None:
                out.append(f"\n-- 3. model propagation, {r['predictors']} predictor(s) under load: publication -> every predictor labelling with it (or newer), "
                           f"{pr['versions']} versions: p50 {e['p50']:.2f} s, p95 {e['p95']:.2f} s, max {e['max']:.2f} s; the predictors' histogram: "
                           f"p50 <= {pr['histogram_p50_le']} s, p95 <= {pr['histogram_p95_le']} s ({pr['histogram_count']:.0f} swaps, each predictor's first load at its start included)")
    if payload.get("learner"):
        out.append("\n-- 4. the learner fed at an aggregate input rate of {:,.0f} records/s (in-process, 128-d latents) --".format(payload["learner"][0]["aggregate_rate"]))
        out.append(f"{'rate':>8} {'target/s':>9} {'offered/s':>9} {'learnt/s':>9} {'lag max':>9} {'lag end':>9} {'lag slope/s':>11} {'bounded':>7} {'upd p50':>7} {'upd p95':>7} {'settled':>7} range")
        for r in payload["learner"]:
            lg = r["lag_latents"]
            out.append(f"{r['mode']:>8} {r['target_latents_per_s']:>9,.0f} {r['offered_latents_per_s']:>9,.0f} {r['learnt_latents_per_s']:>9,.0f} {lg['max']:>9,.0f} "
                       f"{lg['final']:>9,.0f} {(lg['slope_per_s_second_half'] or 0):>11,.0f} {r['lag_bounded']!s:>7} {r['update_ms']['p50'] or 0:>7.0f} "
                       f"{r['update_ms']['p95'] or 0:>7.0f} {r['settled_rate'] or 0:>7.3g} {'-'.join(f'{x:g}' for x in r['rate_range_second_half'] or [])}")
        out.append("latents/s: offered = what the pacer sent, learnt = rows of the updates finished in the window; lag = latents sent but not yet "
                   "in a batch; bounded = the second half's lag slope x half the run < 4 batches of 4,096; settled = mean sample rate over the second half "
                   "(range = its lowest and highest there)")
    if payload.get("quality"):
        out.append("\n-- 5. quality at sample rates 1, 0.5, 0.1 (class-incremental protocol, means over seeds; the learner sees only the sampled items) --")
        out.append(format_table(CI, payload["quality"]))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer records, one repeat, short learner runs, one set and seed")
    p.add_argument("--records", type=int, default=20_480, help="records per predictor/bare run (a multiple of every batch size)")
    p.add_argument("--batches", type=int, nargs="+", default=[4096, 1024])
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1], help="sample rates of the predictor runs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--predictor-threads", type=int, default=1, help="torch threads of the in-process predictor (model.threads)")
    p.add_argument("--default-threads-row", action=argparse.BooleanOptionalAction, default=True,
                   help="also one predictor cell at torch's default threads (one per core)")
    p.add_argument("--cpu-records", type=int, default=36_864, help="records of each 1/2/3-predictor run")
    p.add_argument("--predictors", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--cpu-batch-wait-ms", type=int, default=2000, help="batch.max_wait_ms of the role processes (batches close on size)")
    p.add_argument("--aggregate-rate", type=float, default=100_000.0, help="aggregate input records/s the learner's feed stands for")
    p.add_argument("--learner-rates", type=float, nargs="+", default=list(RATES))
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True, help="also run the learner with the advised rate")
    p.add_argument("--learner-seconds", type=float, default=20.0)
    p.add_argument("--quality-sets", nargs="+", default=list(QUALITY_SETS))
    p.add_argument("--quality-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--n-clusters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", type=Path, default=None, help="checkpoint dir of the base model: reused when it holds one, else fitted and saved there")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "scale.json")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.batches, args.repeats, args.cpu_records = 8192, [4096], 1, 12_288
        args.predictors, args.learner_seconds, args.learner_rates = [1, 3], 6.0, [1.0, 0.1]
        args.quality_sets, args.quality_seeds = ["stackoverflow"], [0]
    return args


def has_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a loadable StreamDEC checkpoint."""
    from stream_dec import StreamDEC

    try:
        StreamDEC.load(path)
    except (OSError, ValueError):  # missing, empty or not a checkpoint (CheckpointError): the caller fits one
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the sections asked for, print and write the tables and the JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from stream_dec.io.broker import EmbeddedBroker

    started = _dt.datetime.now(_dt.UTC)
    meta = {"date": started.isoformat(timespec="seconds"), "command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(),
            "cpu_count": os.cpu_count(), "loadavg_start": loadavg(), "gpu": "none available in this session: every timing is CPU",
            "model": f"StreamDEC(n_clusters={args.n_clusters}, random_state={args.seed}) defaults, fitted on {args.train} stackoverflow rows"}
    payload: dict[str, Any] = {"metadata": meta}
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        if set(args.sections) & {"predictor", "cpu", "learner"}:
            X = build_vectors(args.data_dir / "stackoverflow.npz", 384, args.seed)
            X_train, X_stream = split_stream(X, args.train, max(args.records, args.cpu_records), args.seed)
            base = args.base or work / "base"
            if not has_checkpoint(base):
                base, fit_s = fit_base(X_train, base, args.n_clusters, args.seed)
                print(f"base model fitted in {fit_s:.1f} s", flush=True)
            if set(args.sections) & {"predictor", "cpu"}:
                with EmbeddedBroker() as broker:
                    if "predictor" in args.sections:
                        payload["predictor"] = predictor_section(broker, X_stream, base, work, args)
                        write_json(args.out, payload)
                    if "cpu" in args.sections:
                        payload["cpu"] = []
                        for n_pred in args.predictors:
                            row = cpu_run(broker, X_stream, base, work, n_pred, args.cpu_records, 4096, args.cpu_batch_wait_ms)
                            payload["cpu"].append(row)
                            print(f"[cpu {n_pred} predictor(s)] CPU-s per 1k records {row['cpu_s_per_1k']}; propagation {row['propagation']['every_predictor_s']}", flush=True)
                            write_json(args.out, payload)
            if "learner" in args.sections:
                payload["learner"] = learner_section(base, X_stream, work, args)
                write_json(args.out, payload)
        if "quality" in args.sections:  # last: it pins this process to one thread
            payload["quality"] = quality_section(args)
    finally:
        meta["loadavg_end"] = loadavg()
        meta["wall_seconds"] = (_dt.datetime.now(_dt.UTC) - started).total_seconds()
        write_json(args.out, payload)
        shutil.rmtree(work, ignore_errors=True)
    text = report(payload)
    print(text)
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

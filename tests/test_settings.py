"""Service settings: environment, .env file, overrides, and error messages that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_dec.settings import KafkaSettings, Settings, SettingsError, env_name, known_env_names, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No STREAM_DEC_* variables from the caller and no ./.env: each test sets its own."""
    for key in list(os.environ):
        if key.upper().startswith("STREAM_DEC_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults():
    s = load_settings()
    assert s.kafka.bootstrap_servers == "localhost:9092" and s.kafka.bootstrap_list == ["localhost:9092"]
    assert (s.kafka.group_id, s.kafka.input_topic, s.kafka.output_topic, s.kafka.dlq_topic) == ("stream-dec", "embeddings", "labels", "embeddings.dlq")
    assert s.kafka.processing_guarantee == "at_least_once"
    assert s.kafka.heartbeat_interval_ms < s.kafka.session_timeout_ms <= s.kafka.max_poll_interval_ms
    assert (s.batch.max_size, s.batch.max_wait_ms) == (4096, 500)
    assert (s.checkpoint.dir, s.checkpoint.interval_batches, s.checkpoint.keep) == (Path("checkpoints"), 10, 3)
    assert (s.metrics.port, s.model.device, s.log_level) == (9400, "auto", "INFO")
    assert s.metrics.host == "127.0.0.1"  # the unauthenticated endpoint stays off the network unless asked
    assert s.update.max_steps >= 0 and s.update.max_ms > 0
    assert s.batch.max_bytes == 64 * 1_048_576 and (s.progress.every_batches, s.progress.every_s) == (100, 60.0)


def test_record_and_dead_letter_bounds_default_to_the_codecs_own():
    """The settings repeat the codec defaults (settings.py imports no numpy): they must agree,
    and with them a dead letter fits Kafka's default max.message.bytes."""
    from stream_dec.io import codecs

    k = load_settings().kafka
    assert (k.max_record_bytes, k.max_key_bytes, k.max_id_bytes) == (codecs.DEFAULT_MAX_BYTES, codecs.DEFAULT_MAX_KEY_BYTES, codecs.DEFAULT_MAX_ID_BYTES)
    assert (k.dlq_max_value_bytes, k.dlq_max_header_bytes) == (codecs.DEFAULT_DLQ_MAX_VALUE_BYTES, codecs.DEFAULT_DLQ_MAX_HEADER_BYTES)
    assert KafkaSettings.model_fields["dlq_max_value_bytes"].metadata[0].ge == codecs.MIN_DLQ_VALUE_BYTES
    assert codecs.dead_letter_max_bytes(k.max_key_bytes, k.dlq_max_value_bytes, k.dlq_max_header_bytes) <= 1_048_588


# Every variable of the settings table in docs/contracts.md, each set to a non-default value.
ENV_CASES = [
    ("STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS", "b1:9092, b2:9093", ("kafka", "bootstrap_servers"), "b1:9092,b2:9093"),
    ("STREAM_DEC_KAFKA__GROUP_ID", "grp", ("kafka", "group_id"), "grp"),
    ("STREAM_DEC_KAFKA__INPUT_TOPIC", "in.t", ("kafka", "input_topic"), "in.t"),
    ("STREAM_DEC_KAFKA__OUTPUT_TOPIC", "out_t", ("kafka", "output_topic"), "out_t"),
    ("STREAM_DEC_KAFKA__DLQ_TOPIC", "dead-letters", ("kafka", "dlq_topic"), "dead-letters"),
    ("STREAM_DEC_KAFKA__CLIENT_ID", "svc-1", ("kafka", "client_id"), "svc-1"),
    ("STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS", "6000", ("kafka", "session_timeout_ms"), 6000),
    ("STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS", "1000", ("kafka", "heartbeat_interval_ms"), 1000),
    ("STREAM_DEC_KAFKA__MAX_POLL_INTERVAL_MS", "60000", ("kafka", "max_poll_interval_ms"), 60000),
    ("STREAM_DEC_KAFKA__PROCESSING_GUARANTEE", "Exactly-Once", ("kafka", "processing_guarantee"), "exactly_once"),
    ("STREAM_DEC_KAFKA__MAX_RECORD_BYTES", "65536", ("kafka", "max_record_bytes"), 65536),
    ("STREAM_DEC_KAFKA__MAX_OUTAGE_S", "30", ("kafka", "max_outage_s"), 30.0),
    ("STREAM_DEC_KAFKA__RETRY_BACKOFF_MS", "250", ("kafka", "retry_backoff_ms"), 250),
    ("STREAM_DEC_KAFKA__RETRY_BACKOFF_MAX_MS", "2000", ("kafka", "retry_backoff_max_ms"), 2000),
    ("STREAM_DEC_KAFKA__OFFSET_RESET_POLICY", "fail", ("kafka", "offset_reset_policy"), "fail"),
    ("STREAM_DEC_KAFKA__MAX_KEY_BYTES", "512", ("kafka", "max_key_bytes"), 512),
    ("STREAM_DEC_KAFKA__MAX_ID_BYTES", "256", ("kafka", "max_id_bytes"), 256),
    ("STREAM_DEC_KAFKA__DLQ_MAX_VALUE_BYTES", "256", ("kafka", "dlq_max_value_bytes"), 256),
    ("STREAM_DEC_KAFKA__DLQ_MAX_HEADER_BYTES", "0", ("kafka", "dlq_max_header_bytes"), 0),
    ("STREAM_DEC_BATCH__MAX_SIZE", "256", ("batch", "max_size"), 256),
    ("STREAM_DEC_BATCH__MAX_WAIT_MS", "50", ("batch", "max_wait_ms"), 50),
    ("STREAM_DEC_BATCH__MAX_BYTES", "1048576", ("batch", "max_bytes"), 1_048_576),
    ("STREAM_DEC_PROGRESS__EVERY_BATCHES", "0", ("progress", "every_batches"), 0),
    ("STREAM_DEC_PROGRESS__EVERY_S", "2.5", ("progress", "every_s"), 2.5),
    ("STREAM_DEC_UPDATE__MAX_STEPS", "0", ("update", "max_steps"), 0),
    ("STREAM_DEC_UPDATE__MAX_MS", "12.5", ("update", "max_ms"), 12.5),
    ("STREAM_DEC_CHECKPOINT__DIR", "/var/lib/sdec", ("checkpoint", "dir"), Path("/var/lib/sdec")),
    ("STREAM_DEC_CHECKPOINT__INTERVAL_BATCHES", "4", ("checkpoint", "interval_batches"), 4),
    ("STREAM_DEC_CHECKPOINT__KEEP", "7", ("checkpoint", "keep"), 7),
    ("STREAM_DEC_METRICS__PORT", "0", ("metrics", "port"), 0),
    ("STREAM_DEC_METRICS__HOST", "0.0.0.0", ("metrics", "host"), "0.0.0.0"),
    ("STREAM_DEC_MODEL__DEVICE", "CUDA:1", ("model", "device"), "cuda:1"),
    ("STREAM_DEC_MODEL__THREADS", "4", ("model", "threads"), 4),
    ("STREAM_DEC_KAFKA__MODEL_TOPIC", "m.snapshots", ("kafka", "model_topic"), "m.snapshots"),
    ("STREAM_DEC_KAFKA__FEED_TOPIC", "m.feed", ("kafka", "feed_topic"), "m.feed"),
    ("STREAM_DEC_KAFKA__FEED_PARTITIONS", "3", ("kafka", "feed_partitions"), 3),
    ("STREAM_DEC_SCALE__SAMPLE_RATE", "0.25", ("scale", "sample_rate"), 0.25),
    ("STREAM_DEC_SCALE__MODEL_WAIT_S", "5", ("scale", "model_wait_s"), 5.0),
    ("STREAM_DEC_SCALE__MAX_FEED_LAG_BATCHES", "2", ("scale", "max_feed_lag_batches"), 2.0),
    ("STREAM_DEC_ROLE", " Learner ", ("role",), "learner"),
    ("STREAM_DEC_LOG_LEVEL", "debug", ("log_level",), "DEBUG"),
]


def _get(settings: Settings, path: tuple[str, ...]):
    obj = settings
    for part in path:
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name,raw,path,expected", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_every_env_name(monkeypatch, name, raw, path, expected):
    monkeypatch.setenv(name, raw)
    assert env_name(*path) == name
    assert _get(load_settings(), path) == expected


def test_the_env_cases_cover_every_setting():
    assert sorted(c[0] for c in ENV_CASES) == sorted(known_env_names())


def test_env_names_are_case_insensitive_and_json_groups_work(monkeypatch):
    monkeypatch.setenv("stream_dec_batch__max_size", "9")
    monkeypatch.setenv("STREAM_DEC_CHECKPOINT", '{"keep": 5, "interval_batches": 2}')
    s = load_settings()
    assert s.batch.max_size == 9 and (s.checkpoint.keep, s.checkpoint.interval_batches) == (5, 2)


def test_dotenv_file_precedence_and_unrelated_lines(monkeypatch, tmp_path):
    # A .env shared with docker compose holds unrelated variables: they are ignored.
    (tmp_path / ".env").write_text(
        "# settings for the service\nCOMPOSE_PROJECT_NAME=demo\nSTREAM_DEC_BATCH__MAX_SIZE=64\nSTREAM_DEC_KAFKA__GROUP_ID=from-dotenv\nSTREAM_DEC_METRICS__PORT=9500\n"
    )
    s = load_settings()  # ./.env is read by default
    assert (s.batch.max_size, s.kafka.group_id, s.metrics.port) == (64, "from-dotenv", 9500)

    monkeypatch.setenv("STREAM_DEC_BATCH__MAX_SIZE", "128")  # environment beats .env
    s = load_settings(kafka={"group_id": "from-flag", "input_topic": None}, metrics__port=0)  # overrides beat both
    assert (s.batch.max_size, s.kafka.group_id, s.metrics.port) == (128, "from-flag", 0)
    assert s.kafka.input_topic == "embeddings"  # a None override (unset CLI flag) falls through

    other = tmp_path / "prod.env"
    other.write_text("STREAM_DEC_CHECKPOINT__KEEP=9\n")
    s = load_settings(env_file=other)  # an explicit file replaces ./.env
    assert s.checkpoint.keep == 9 and s.batch.max_size == 128 and s.kafka.group_id == "stream-dec"


def test_missing_env_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(env_file=tmp_path / "nope.env")


INVALID = [
    ("STREAM_DEC_BATCH__MAX_SIZE", "0", "greater than 0"),
    ("STREAM_DEC_BATCH__MAX_SIZE", "many", "valid integer"),
    ("STREAM_DEC_BATCH__MAX_WAIT_MS", "-1", "greater than or equal to 0"),
    ("STREAM_DEC_UPDATE__MAX_STEPS", "-2", "greater than or equal to 0"),
    ("STREAM_DEC_UPDATE__MAX_MS", "0", "greater than 0"),
    ("STREAM_DEC_CHECKPOINT__INTERVAL_BATCHES", "0", "greater than 0"),
    ("STREAM_DEC_CHECKPOINT__KEEP", "0", "greater than or equal to 1"),
    ("STREAM_DEC_CHECKPOINT__DIR", " ", "must not be empty"),
    ("STREAM_DEC_METRICS__PORT", "65536", "less than or equal to 65535"),
    ("STREAM_DEC_METRICS__PORT", "-1", "greater than or equal to 0"),
    ("STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS", "", "host:port"),
    ("STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS", "localhost", "host:port"),
    ("STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS", "a:9092,,b:9092", "host:port"),
    ("STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS", "a:99999", "port in 1-65535"),
    ("STREAM_DEC_KAFKA__GROUP_ID", "  ", "must not be empty"),
    ("STREAM_DEC_KAFKA__INPUT_TOPIC", "", "legal Kafka topic name"),
    ("STREAM_DEC_KAFKA__INPUT_TOPIC", "has space", "legal Kafka topic name"),
    ("STREAM_DEC_KAFKA__OUTPUT_TOPIC", "..", "legal Kafka topic name"),
    ("STREAM_DEC_KAFKA__OUTPUT_TOPIC", "embeddings", "must differ from STREAM_DEC_KAFKA__INPUT_TOPIC"),
    ("STREAM_DEC_KAFKA__DLQ_TOPIC", "labels", "must differ from STREAM_DEC_KAFKA__OUTPUT_TOPIC"),
    ("STREAM_DEC_KAFKA__DLQ_TOPIC", "embeddings", "must differ from STREAM_DEC_KAFKA__INPUT_TOPIC"),
    ("STREAM_DEC_KAFKA__HEARTBEAT_INTERVAL_MS", "10000", "less than STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS"),
    ("STREAM_DEC_KAFKA__SESSION_TIMEOUT_MS", "10", "greater than or equal to 1000"),
    ("STREAM_DEC_KAFKA__MAX_RECORD_BYTES", "0", "greater than 0"),
    ("STREAM_DEC_KAFKA__MAX_OUTAGE_S", "400", "less than STREAM_DEC_KAFKA__MAX_POLL_INTERVAL_MS"),
    ("STREAM_DEC_KAFKA__RETRY_BACKOFF_MAX_MS", "100", "at least STREAM_DEC_KAFKA__RETRY_BACKOFF_MS"),
    ("STREAM_DEC_KAFKA__OFFSET_RESET_POLICY", "latest", "'earliest' or 'fail'"),
    ("STREAM_DEC_KAFKA__MAX_KEY_BYTES", "0", "greater than 0"),
    ("STREAM_DEC_KAFKA__MAX_ID_BYTES", "-5", "greater than 0"),
    ("STREAM_DEC_KAFKA__DLQ_MAX_VALUE_BYTES", "255", "greater than or equal to 256"),
    ("STREAM_DEC_KAFKA__DLQ_MAX_HEADER_BYTES", "-1", "greater than or equal to 0"),
    ("STREAM_DEC_KAFKA__DLQ_MAX_HEADER_BYTES", "16k", "valid integer"),
    ("STREAM_DEC_BATCH__MAX_BYTES", "1023", "greater than or equal to 1024"),
    ("STREAM_DEC_PROGRESS__EVERY_BATCHES", "-1", "greater than or equal to 0"),
    ("STREAM_DEC_PROGRESS__EVERY_S", "soon", "valid number"),
    ("STREAM_DEC_KAFKA__PROCESSING_GUARANTEE", "best_effort", "'at_least_once' or 'exactly_once'"),
    ("STREAM_DEC_MODEL__DEVICE", "tpu", '"auto", "cpu"'),
    ("STREAM_DEC_MODEL__THREADS", "-1", "greater than or equal to 0"),
    ("STREAM_DEC_LOG_LEVEL", "chatty", "'DEBUG', 'INFO'"),
    ("STREAM_DEC_ROLE", "trainer", "'all', 'learner' or 'predictor'"),
    ("STREAM_DEC_SCALE__SAMPLE_RATE", "0", "greater than 0"),
    ("STREAM_DEC_SCALE__SAMPLE_RATE", "1.5", "less than or equal to 1"),
    ("STREAM_DEC_KAFKA__MODEL_TOPIC", "labels", "must differ from STREAM_DEC_KAFKA__OUTPUT_TOPIC"),
    ("STREAM_DEC_KAFKA__FEED_TOPIC", "stream-dec.model", "must differ from STREAM_DEC_KAFKA__MODEL_TOPIC"),
    ("STREAM_DEC_KAFKA__FEED_PARTITIONS", "0", "greater than or equal to 1"),
    ("STREAM_DEC_BATCH__MAXSIZE", "5", "unknown setting (did you mean STREAM_DEC_BATCH__MAX_SIZE?)"),
    ("STREAM_DEC_LOGLEVEL", "INFO", "unknown setting (did you mean STREAM_DEC_LOG_LEVEL?)"),
    ("STREAM_DEC_KAFAK__GROUP_ID", "x", "unknown setting (did you mean STREAM_DEC_KAFKA__GROUP_ID?)"),
]


@pytest.mark.parametrize("name,raw,what", INVALID, ids=[f"{n}={r!r}" for n, r, _ in INVALID])
def test_invalid_setting_names_the_variable(monkeypatch, name, raw, what):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingsError) as info:
        load_settings()
    msg = str(info.value)
    assert f"{name}: " in msg and what in msg, msg
    assert [n for n, _ in info.value.problems] == [name]


def test_all_problems_are_reported_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAM_DEC_BATCH__MAX_SIZE", "0")
    monkeypatch.setenv("STREAM_DEC_METRICS__PORT", "70000")
    (tmp_path / ".env").write_text("STREAM_DEC_CHECKPOINT__KEEP=0\nSTREAM_DEC_TYPO=1\n")
    with pytest.raises(SettingsError) as info:
        load_settings()
    names = {n for n, _ in info.value.problems}
    assert names == {"STREAM_DEC_BATCH__MAX_SIZE", "STREAM_DEC_METRICS__PORT", "STREAM_DEC_CHECKPOINT__KEEP", "STREAM_DEC_TYPO"}
    assert str(info.value).startswith("invalid settings (4 problems):")
    assert isinstance(info.value, ValueError)  # the CLI turns ValueError into exit code 2


def test_invalid_override_names_the_variable():
    with pytest.raises(SettingsError) as info:
        load_settings(batch={"max_size": -5}, bogus=1)
    assert {n for n, _ in info.value.problems} == {"STREAM_DEC_BATCH__MAX_SIZE", "STREAM_DEC_BOGUS"}


def test_no_torch_import():
    code = "import sys, stream_dec.settings, stream_dec.io.codecs, stream_dec.io.broker; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_device_availability_is_checked_on_request(monkeypatch):
    import torch

    from stream_dec.settings import check_device, device_problem

    for device in ("auto", "cpu"):
        assert device_problem(device) is None
        check_device(load_settings(model__device=device))
    # "cuda:N" past the host's devices never exists; on a host without CUDA neither does "cuda".
    missing = ["cuda:64"] + ([] if torch.cuda.is_available() else ["cuda"])
    missing += [] if torch.backends.mps.is_available() else ["mps"]
    for device in missing:
        settings = load_settings(model__device=device)  # loading stays torch-free and accepts it
        with pytest.raises(SettingsError) as info:
            check_device(settings)
        assert info.value.problems[0][0] == "STREAM_DEC_MODEL__DEVICE" and repr(device) in str(info.value)

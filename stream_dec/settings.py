"""Service settings from the environment (``STREAM_DEC_*``), an optional ``.env`` file and overrides.

Every setting has an environment name built from the prefix ``STREAM_DEC_`` and the
path of the field joined by ``__``, for example ``STREAM_DEC_KAFKA__BOOTSTRAP_SERVERS``
or ``STREAM_DEC_BATCH__MAX_SIZE``. Use :func:`load_settings` at start-up: it turns
pydantic's validation errors into one :class:`SettingsError` whose message names every
bad setting by that environment name, so an operator knows exactly what to fix.

This module imports no torch: ``stream-dec produce`` and ``--help`` stay fast.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "STREAM_DEC_"
NESTED_DELIMITER = "__"

# Kafka's own rule for legal topic names (kafka.common.internals.Topic).
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def env_name(*path: str | int) -> str:
    """The environment variable of a settings path, e.g. ``("kafka", "group_id")`` -> ``STREAM_DEC_KAFKA__GROUP_ID``."""
    return ENV_PREFIX + NESTED_DELIMITER.join(str(p).upper() for p in path)


class SettingsError(ValueError):
    """Invalid settings; the message names each bad setting by its environment variable."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        #: ``(ENV_NAME, what is wrong)`` pairs, for programs that want them one by one.
        self.problems = problems or []


class _Group(BaseModel):
    # A typo such as STREAM_DEC_BATCH__MAXSIZE must fail, not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_topic_name(value: str) -> str:
    """``value`` stripped, or ValueError when it is not a legal Kafka topic name."""
    value = value.strip()
    if value in (".", "..") or not _TOPIC_RE.match(value):
        raise ValueError("must be a legal Kafka topic name: 1-249 characters of letters, digits, '.', '_' and '-'")
    return value


def _distinct_topic(value: str, info, others: tuple[str, ...]) -> str:
    """``value`` as a legal topic name that differs from the topics ``others`` (validated before it)."""
    value = check_topic_name(value)
    for other in others:
        if value == info.data.get(other):
            raise ValueError(f"must differ from {env_name('kafka', other)} ({value!r})")
    return value


class KafkaSettings(_Group):
    """Broker connection, topics, consumer-group timing and delivery guarantee."""

    bootstrap_servers: str = Field("localhost:9092", description="comma-separated host:port list")
    group_id: str = Field("stream-dec", description="consumer group id")
    input_topic: str = Field("embeddings", description="topic the embeddings are read from")
    output_topic: str = Field("labels", description="topic assignments and drift records are written to")
    dlq_topic: str = Field("embeddings.dlq", description="dead-letter topic for unusable input records")
    # Internal topics of the scale-out roles (docs/contracts.md, "Scale-out"): the learner
    # publishes model snapshots on the model topic (one partition: versions in order) and
    # reads the predictors' latents from the feed topic. The learner creates both.
    model_topic: str = Field("stream-dec.model", description="topic of the model snapshots (roles learner/predictor; 1 partition)")
    feed_topic: str = Field("stream-dec.feed", description="topic predictors send the learner latents on (roles learner/predictor)")
    feed_partitions: int = Field(1, ge=1, le=1024, description="partitions of the feed topic when the learner creates it")
    client_id: str = Field("stream-dec", description="client id reported to the broker")
    # 10 s rather than the client's 45 s default: a group join takes about half the
    # session timeout, and a dead member holds its partitions for the whole of it.
    session_timeout_ms: int = Field(10_000, ge=1_000, description="consumer group session timeout")
    heartbeat_interval_ms: int = Field(3_000, ge=100, description="heartbeat interval; must be below the session timeout")
    max_poll_interval_ms: int = Field(300_000, ge=1_000, description="longest gap between polls before eviction")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field("at_least_once", description="delivery guarantee")
    max_record_bytes: int = Field(1_048_576, gt=0, description="input records larger than this go to the DLQ")
    # The key and the item id are bounded apart from the value: each assignment carries the
    # id twice into downstream stores (stream_dec/io/codecs.py says why these defaults).
    max_key_bytes: int = Field(4_096, gt=0, description="input records with a longer key go to the DLQ (key_too_large)")
    max_id_bytes: int = Field(2_048, gt=0, description="input records with a longer item id (UTF-8) go to the DLQ (id_too_large)")
    # With the defaults a dead letter fits Kafka's default max.message.bytes, so a DLQ
    # topic created with default settings takes every one (codecs.dead_letter_max_bytes).
    dlq_max_value_bytes: int = Field(983_040, ge=256, description="a longer value is replaced by a JSON stub in its dead letter")
    dlq_max_header_bytes: int = Field(16_384, ge=0, description="original headers a dead letter copies at most (the rest are counted)")
    # An outage shorter than max_outage_s is ridden out: the batch waits, its outputs are
    # retried and nothing is committed past them. It must end well before the group evicts
    # the loop (max_poll_interval_ms), which cannot poll while it retries a batch.
    max_outage_s: float = Field(120.0, ge=0, description="longest broker or output-topic outage ridden out before exiting with status 3")
    retry_backoff_ms: int = Field(500, gt=0, description="first wait before retrying an unreachable broker; doubles at each try")
    retry_backoff_max_ms: int = Field(10_000, gt=0, description="longest wait between two retries")
    offset_reset_policy: Literal["earliest", "fail"] = Field(
        "earliest", description="checkpoint offsets outside the partition's log: resume at the log's start, or exit with status 4")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise ValueError("must be a comma-separated list of host:port, e.g. localhost:9092")
        for p in parts:
            host, sep, port = p.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{p!r} is not host:port with a port in 1-65535")
        return ",".join(parts)

    @field_validator("group_id", "client_id")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("input_topic")
    @classmethod
    def _input(cls, value: str) -> str:
        return check_topic_name(value)

    @field_validator("output_topic")
    @classmethod
    def _output(cls, value: str, info) -> str:
        value = check_topic_name(value)
        if value == info.data.get("input_topic"):
            raise ValueError(f"must differ from {env_name('kafka', 'input_topic')} ({value!r}): the service would read its own output")
        return value

    @field_validator("dlq_topic")
    @classmethod
    def _dlq(cls, value: str, info) -> str:
        return _distinct_topic(value, info, ("input_topic", "output_topic"))

    @field_validator("model_topic", "feed_topic")
    @classmethod
    def _internal(cls, value: str, info) -> str:
        return _distinct_topic(value, info, tuple(o for o in ("input_topic", "output_topic", "dlq_topic", "model_topic") if o != info.field_name))

    @field_validator("heartbeat_interval_ms")
    @classmethod
    def _heartbeat(cls, value: int, info) -> int:
        session = info.data.get("session_timeout_ms")
        if session is not None and value >= session:
            raise ValueError(f"must be less than {env_name('kafka', 'session_timeout_ms')} ({session}); about a third of it is usual")
        return value

    @field_validator("max_outage_s")
    @classmethod
    def _outage(cls, value: float, info) -> float:
        poll_ms = info.data.get("max_poll_interval_ms")
        if poll_ms is not None and value * 1000 >= poll_ms:
            raise ValueError(f"must be less than {env_name('kafka', 'max_poll_interval_ms')} ({poll_ms} ms): the group would evict the service while it waits")
        return value

    @field_validator("retry_backoff_max_ms")
    @classmethod
    def _backoff(cls, value: int, info) -> int:
        first = info.data.get("retry_backoff_ms")
        if first is not None and value < first:
            raise ValueError(f"must be at least {env_name('kafka', 'retry_backoff_ms')} ({first})")
        return value

    @field_validator("processing_guarantee", mode="before")
    @classmethod
    def _guarantee(cls, value: Any) -> Any:
        return value.strip().lower().replace("-", "_") if isinstance(value, str) else value

    @property
    def bootstrap_list(self) -> list[str]:
        """The bootstrap servers as a list."""
        return self.bootstrap_servers.split(",")


class BatchSettings(_Group):
    """Micro-batch bounds: a batch closes at ``max_size`` records or ``max_wait_ms``, whichever comes first."""

    # Size or time, whichever first, makes the update cadence follow the load: at a
    # moderate rate a batch closes on time (one update per max_wait_ms); in a backlog
    # it closes on size, and 4,096 records amortise each update's fixed costs
    # (bench/run_service.py measures the trade-off).
    max_size: int = Field(4096, gt=0, le=1_000_000, description="records per micro-batch at most")
    max_wait_ms: int = Field(500, ge=0, description="longest wait for a batch to fill, from its first record")
    # Counted in keys, values and headers as fetched: a few records of very large values
    # must not hold more memory than this. The consumer fetches at most this much per poll
    # (plus one record larger than it, returned alone), and a batch always takes at least
    # one record.
    max_bytes: int = Field(64 * 1_048_576, ge=1_024, description="bytes of records per micro-batch at most")


class UpdateSettings(_Group):
    """Budget of the bounded online update run on every micro-batch."""

    max_steps: int = Field(5, ge=0, description="centre-rule steps per update (0: label only, the model does not change)")
    max_ms: float = Field(250.0, gt=0, description="wall-clock budget of the whole update in milliseconds (steps, spawn search, churn guard)")


class CheckpointSettings(_Group):
    """Where and how often the model state and offsets are checkpointed."""

    dir: Path = Field(Path("./checkpoints"), description="checkpoint directory")
    interval_batches: int = Field(10, gt=0, description="write a checkpoint every N micro-batches")
    keep: int = Field(3, ge=1, description="checkpoints kept in the directory")

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value


class MetricsSettings(_Group):
    """The Prometheus ``/metrics`` endpoint."""

    port: int = Field(9400, ge=0, le=65535, description="HTTP port of /metrics (0 = off)")
    # Loopback by default: /metrics and /healthz need no authentication, so they are not
    # offered to the network unless asked for (containers set 0.0.0.0, see docker-compose.yml).
    host: str = Field("127.0.0.1", min_length=1, description="address the metrics server binds")


class ProgressSettings(_Group):
    """The progress line the service logs as it works, and its summary at shutdown."""

    every_batches: int = Field(100, ge=0, description="log a progress line every N micro-batches (0: not by count)")
    every_s: float = Field(60.0, ge=0, description="... or once this many seconds passed since the last line (0: not by time)")


class ModelSettings(_Group):
    """Where the model runs."""

    device: str = Field("auto", description='"auto" (CUDA when available), "cpu", "cuda", "cuda:N" or "mps"')
    # The update runs on its own thread beside the poll loop; one torch thread per usable
    # CPU lets labelling and learning use the cores the poll loop leaves idle
    # (bench/run_service.py measures it).
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads for labelling and learning (0 = one per CPU this process may use; a predictor: 1)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError('must be "auto", "cpu", "cuda", "cuda:N" or "mps"')
        return value


class ScaleSettings(_Group):
    """How predictors feed the learner (roles ``learner`` and ``predictor``)."""

    # The learner advises a lower rate when it falls behind; predictors send
    # min(this, advised) of the items, chosen by item id so every process picks the same.
    sample_rate: float = Field(1.0, gt=0, le=1, description="largest share of labelled items whose latents predictors send the learner")
    # A predictor that has no model labels nothing; it waits this long at start for the
    # learner's first snapshot before saying so in the log (it keeps waiting).
    model_wait_s: float = Field(30.0, gt=0, description="seconds a predictor waits for a model snapshot before warning (it keeps waiting)")
    # Feed lag, in the learner's own batches, beyond which it halves the advised rate
    # (and below a quarter of which it raises it again, up to sample_rate).
    max_feed_lag_batches: float = Field(4.0, gt=0, description="learner feed lag (in micro-batches) above which it asks predictors to sample less")


class Settings(BaseSettings):
    """All settings of the ``stream-dec`` service; see the module docstring for the naming rule."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        env_file=".env",
        env_file_encoding="utf-8",
        # Top-level unknown names are found by _unknown_names instead: "forbid" here would
        # also reject the unrelated variables a shared .env holds (docker compose reads it too).
        extra="ignore",
        validate_default=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    update: UpdateSettings = Field(default_factory=UpdateSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    scale: ScaleSettings = Field(default_factory=ScaleSettings)
    # One process per role (docs/contracts.md, "Scale-out"): "all" learns and labels;
    # "predictor" labels with the learner's newest snapshot; "learner" learns from what
    # predictors send and publishes snapshots.
    role: Literal["all", "learner", "predictor"] = Field("all", description="what this process does: all, learner or predictor")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


def known_env_names() -> list[str]:
    """Every environment variable :class:`Settings` reads, in field order."""
    names = []
    for name, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names.extend(env_name(name, f) for f in sub.model_fields)
        else:
            names.append(env_name(name))
    return names


def _unknown_names(names) -> list[tuple[str, str]]:
    # pydantic-settings ignores unknown top-level STREAM_DEC_* names; a typo there would
    # silently run with a default, so report it like any other bad setting. Nested
    # typos (STREAM_DEC_BATCH__MAXSIZE) are caught by the groups' extra="forbid".
    known = known_env_names()
    groups = {n for n, f in Settings.model_fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    problems = []
    for key in names:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        if upper[len(ENV_PREFIX) :].split(NESTED_DELIMITER)[0].lower() in groups:
            continue
        hint = difflib.get_close_matches(upper, known, n=1, cutoff=0.75)
        problems.append((upper, "unknown setting" + (f" (did you mean {hint[0]}?)" if hint else "")))
    return problems


def _describe(err: dict) -> tuple[str, str]:
    loc = [p for p in err.get("loc", ()) if not isinstance(p, int)]
    name = env_name(*loc) if loc else ENV_PREFIX + "*"
    if err.get("type") == "extra_forbidden":
        hint = difflib.get_close_matches(name, known_env_names(), n=1, cutoff=0.75)
        return name, "unknown setting" + (f" (did you mean {hint[0]}?)" if hint else "")
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], (dict, BaseModel)):
        shown = repr(err["input"])
        msg += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
    return name, msg


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(env_file: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from overrides > environment > ``.env`` file > defaults.

    ``env_file`` replaces the default ``./.env`` (which is read only when it exists);
    a given file that does not exist is an error. Overrides are keyword arguments,
    either nested (``kafka={"group_id": "g"}``) or flat with ``__``
    (``kafka__group_id="g"``); ``None`` values are skipped so that unset CLI flags
    fall through to the environment. Raises :class:`SettingsError` naming every bad
    setting by its environment variable.
    """
    if env_file is not None and not Path(env_file).is_file():
        raise SettingsError(f"invalid settings: env file {env_file} does not exist", [("env_file", "does not exist")])
    nested: dict = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        path = key.lower().split(NESTED_DELIMITER)
        for part in reversed(path[1:]):
            value = {part: value}
        nested = _merge(nested, {path[0]: value})
    problems = _unknown_names(os.environ)
    dotenv_path = Path(env_file) if env_file is not None else Path(".env")
    if dotenv_path.is_file():
        problems.extend(_unknown_names(dotenv_values(dotenv_path, encoding="utf-8")))
    for key in nested:
        if key not in Settings.model_fields:
            problems.append((env_name(key), "unknown setting (passed as an override)"))
    settings = None
    try:
        kwargs: dict[str, Any] = {"_env_file": env_file} if env_file is not None else {}
        settings = Settings(**kwargs, **nested)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors(include_url=False))
    problems = list(dict.fromkeys(problems))  # a nested typo is reported by both checks
    if problems:
        raise _settings_error(problems)
    assert settings is not None
    return settings


def _settings_error(problems: list[tuple[str, str]]) -> SettingsError:
    lines = "\n".join(f"  {name}: {what}" for name, what in problems)
    return SettingsError(f"invalid settings ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{lines}", problems)


def device_problem(device: str) -> str | None:
    """Why the model device ``device`` cannot be used on this host, or None when it can.

    ``"auto"`` and ``"cpu"`` always can. torch is imported only for the other devices,
    so commands that never ask for an accelerator start without it.

    >>> device_problem("cpu") is None and device_problem("auto") is None
    True
    """
    if device in ("auto", "cpu"):
        return None
    import torch

    if device.startswith("cuda"):
        if torch.version.cuda is None:
            return f"this build of torch ({torch.__version__}) has no CUDA support; use \"auto\" or \"cpu\""
        if not torch.cuda.is_available():
            return "CUDA is not available on this host (no usable GPU or driver); use \"auto\" or \"cpu\""
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"this host has {torch.cuda.device_count()} CUDA device(s), so {device!r} does not exist"
    elif device == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this host; use \"auto\" or \"cpu\""
    return None


def check_device(settings: Settings) -> None:
    """Raise :class:`SettingsError` naming ``STREAM_DEC_MODEL__DEVICE`` when its device is not on this host.

    Separate from :func:`load_settings`, which stays torch-free for the commands that
    never run the model (``stream-dec produce`` reads the Kafka settings only).
    """
    problem = device_problem(settings.model.device)
    if problem is not None:
        raise _settings_error([(env_name("model", "device"), f"{problem} (got {settings.model.device!r})")])

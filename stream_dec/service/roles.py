"""The scale-out roles: the learner service, and the service each role runs.

``all`` (default) runs :class:`~stream_dec.service.app.StreamService`: one process
learns and labels. ``predictor`` runs :class:`~stream_dec.service.predictor.PredictorService`.
``learner`` runs :class:`LearnerService`: the single-process service whose input is the
feed topic (the predictors' latents) instead of the embeddings, with no assignments to
send; it publishes every model version as a predict-only snapshot on the model topic.

Everything else is the single process's machinery, unchanged: one active learner per
group (the others stand by through the all-to-one assignor and the owner lease),
journaled batch ends and update plans, checkpoints with the feed offsets, drift and
lifecycle records on the output topic. So a standby that takes over replays the
journal from the newest checkpoint and republishes identical versions: the same
checkpoint, batches and plans give the same model, and a snapshot's bytes depend on
the model alone (stream_dec/online/snapshot.py).

Invariants of the learner:

* Ids are created here only, so an id means the same on every predictor.
* Every version is published after its update's drift and lifecycle records, in the
  same transaction under exactly-once. The version the learner starts from (a
  checkpoint) is published when it takes the feed, so predictors starting with it
  have a model before any latents exist.
* The advised sample rate (a snapshot header, not part of the snapshot's bytes) changes
  at most every ``ADVISE_PERIOD_S``: it halves while the feed lag exceeds
  ``STREAM_DEC_SCALE__MAX_FEED_LAG_BATCHES`` batches and is not shrinking, and rises by
  a quarter once the lag is below a quarter of that, up to ``STREAM_DEC_SCALE__SAMPLE_RATE``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import TopicPartition

from stream_dec.io.codecs import DecodedBatch
from stream_dec.io.feed import FEED_MAX_ROWS, decode_feed_batch
from stream_dec.io.modeltopic import ModelPublisher, ensure_topics
from stream_dec.online.snapshot import PredictSnapshot, encoder_fingerprint
from stream_dec.service.app import StreamService, _offset_ranges
from stream_dec.service.clients import highwater_lag
from stream_dec.service.hooks import ServiceHooks
from stream_dec.service.outputs import ExactlyOnceOutputs
from stream_dec.service.predictor import RATE_META, PredictorService
from stream_dec.settings import Settings

log = logging.getLogger("stream_dec.service")

#: Lowest advised sample rate: the learner always sees some of the stream.
MIN_RATE = 1.0 / 1024
#: Shortest time between two changes of the advised rate: longer than a version takes to
#: reach the predictors plus a few batches, so a change shows in the feed lag before the
#: next one (changing at every update made the rate swing between its bounds).
ADVISE_PERIOD_S = 2.0


def learner_settings(settings: Settings) -> Settings:
    """The settings the learner runs the single-process machinery with: input = the feed topic.

    Its consumer group is ``<group>.learner`` (the predictors' group owns the input
    topic), and a batch holds at most ``batch.max_size`` latent rows, bounded by bytes
    since one feed record carries up to ``FEED_MAX_ROWS`` rows.

    >>> from stream_dec.settings import load_settings
    >>> s = learner_settings(load_settings(kafka__group_id="g"))
    >>> s.kafka.input_topic, s.kafka.group_id
    ('stream-dec.feed', 'g.learner')
    """
    k = settings.kafka
    kafka = k.model_copy(update={"input_topic": k.feed_topic, "group_id": f"{k.group_id}.learner"})
    return settings.model_copy(update={"kafka": kafka})


class LearnerService(StreamService):
    """``stream-dec run --role learner``: learn from the feed, publish every version on the model topic."""

    learn_method = "partial_fit_latent"
    role = "learner"

    def __init__(self, settings: Settings, model: Any | None = None, hooks: ServiceHooks | None = None):
        self.role_settings = settings
        super().__init__(learner_settings(settings), model=model, hooks=hooks)
        self.latent_dim = int(self.model.clusters_.centres.shape[1])
        self.encoder_id = encoder_fingerprint(self.model)
        # Feed records are chunks of rows: bound a batch by bytes, about batch.max_size rows.
        self.batcher.max_bytes = min(self.batcher.max_bytes, settings.batch.max_size * (self.latent_dim * 4 + 64))
        self.rate = settings.scale.sample_rate
        self._rows_per_record = float(FEED_MAX_ROWS)
        self._announce = False  # the version in memory is not yet published since the feed was taken
        self._advised_at = time.monotonic()  # when the advised rate last changed (or was confirmed)
        self._lag_seen = 0.0  # feed lag (rows) then
        self.metrics.advised_sample_rate(self.rate)

    def _start(self, install_signals: bool) -> None:
        k = self.role_settings.kafka
        # Auto-created topics would get the broker's default partition count; the model
        # topic needs exactly one (versions in order).
        self.outage.retry(f"broker (topics {k.model_topic!r}, {k.feed_topic!r})", lambda: ensure_topics(
            k.bootstrap_servers, {k.model_topic: 1, k.feed_topic: k.feed_partitions}, client_id=k.client_id))
        super()._start(install_signals)

    def _decode(self, records: list) -> DecodedBatch:
        Z, failures = decode_feed_batch(records, dim=self.latent_dim, encoder=self.encoder_id)
        bad = {i for i, _ in failures}
        valid = [i for i in range(len(records)) if i not in bad]
        if valid:
            self._rows_per_record = 0.9 * self._rows_per_record + 0.1 * (Z.shape[0] / len(valid))
        return DecodedBatch([], Z, valid, failures)

    def _label(self, valid: list, decoded, version: int, clock) -> None:
        """No assignments here (the predictors made them): learn from the latents."""
        self.learner.start(self.model, decoded.X, _offset_ranges(valid), plan=self._batch_plan, batch=self._batch_key)
        clock.lap("send")

    def _updated(self, update) -> None:
        self._advise()
        self._publish()

    def resume(self, partitions: list[TopicPartition]) -> None:
        super().resume(partitions)
        self._announce = True

    def _process_ready(self) -> None:
        if self._announce and self.ownership.owns and self.learner.busy() is False and self.ownership.fence_reason() is None:
            self._announce = False
            self._publish_alone()
        super()._process_ready()

    # ------------------------------------------------------------ publishing
    def _publish(self) -> None:
        """Send the model's current version to the model topic (with the batch's other outputs)."""
        payload = PredictSnapshot.from_model(self.model).to_bytes()
        at = time.time()
        ModelPublisher(self.outputs, self.role_settings.kafka.model_topic).publish(
            int(self.model.version_), payload, meta={RATE_META: f"{self.rate:.6g}"}, published_at=at)
        self.metrics.snapshot_published(int(self.model.version_), len(payload), at)

    def _publish_alone(self) -> None:
        """Publish the version the learner starts from, outside any batch (its own transaction under exactly-once)."""
        eos = isinstance(self.outputs, ExactlyOnceOutputs)
        if eos:
            self.outputs.producer.begin_transaction()
        self._publish()
        if eos:
            self.outputs.producer.commit_transaction()
        self.outputs.await_acks()
        log.info("published model version %d on %r", self.model.version_, self.role_settings.kafka.model_topic)

    def _advise(self) -> None:
        """Every ``ADVISE_PERIOD_S`` at most: halve the advised rate while the feed lag is over its bound and not
        shrinking, raise it by a quarter once the learner has caught up (multiplicative decrease, gentle increase)."""
        now = time.monotonic()
        lag = highwater_lag(self.consumer) if self.consumer is not None else {}
        if not lag or now - self._advised_at < ADVISE_PERIOD_S:
            return
        rows = sum(lag.values()) * self._rows_per_record
        bound = self.role_settings.scale.max_feed_lag_batches * self.role_settings.batch.max_size
        rate = self.rate
        if rows > bound and rows >= self._lag_seen:
            rate = max(MIN_RATE, self.rate / 2)
        elif rows < bound / 4:
            rate = min(self.role_settings.scale.sample_rate, self.rate * 1.25)
        self._advised_at, self._lag_seen = now, rows
        if rate != self.rate:
            log.info("feed lag %d rows (bound %d): advising predictors a sample rate of %.4g", rows, bound, rate)
            self.rate = rate
            self.metrics.advised_sample_rate(rate)


def build_service(settings: Settings, *, model: Any | None = None, hooks: ServiceHooks | None = None):
    """The service of ``settings.role``: StreamService (all), LearnerService or PredictorService."""
    if settings.role == "predictor":
        if model is not None:
            raise ValueError("a predictor takes its model from the model topic, not from a checkpoint")
        return PredictorService(settings, hooks=hooks)
    if settings.role == "learner":
        return LearnerService(settings, model=model, hooks=hooks)
    return StreamService(settings, model=model, hooks=hooks)

"""Predict-only snapshots: what a predictor needs to label exactly as the learner would.

A snapshot holds one model version's input normalisation, frozen encoder, cluster
table (stream_dec/online/clusters.py) and confidence calibration
(stream_dec/online/confidence.py), and labels with the same function as the
estimator (:func:`stream_dec.online.gates.label`), so the same embedding gets the same
id and confidence from the learner and from any predictor holding that version (on
another kind of device the ids still match, and the confidence agrees to float
rounding, about 1e-6, as bench/run_gpu_check.py measured on a GPU). It
carries no reservoir, novelty window, EWC or rule state: it cannot learn.

Bytes (:meth:`PredictSnapshot.to_bytes`), deterministic for a given model state, so a
learner that redoes an update republishes identical bytes::

    MAGIC (8 bytes) | sha256 of the rest (32) | header length (4, little-endian) | header | arrays

The header is JSON (sorted keys): scalars, and each array's name, dtype, shape and
offset into the array section. Nothing is unpickled on load.

>>> import numpy as np
>>> from stream_dec import StreamDEC
>>> rng = np.random.default_rng(0)
>>> X = np.concatenate([rng.normal(c, 0.1, (40, 4)) for c in (-2, 0, 2)]).astype(np.float32)
>>> m = StreamDEC(n_clusters=3, hidden_dims=(), pretrain_epochs=2, refine_max_iter=0, n_init=1, random_state=0).fit(X)
>>> s = PredictSnapshot.from_bytes(PredictSnapshot.from_model(m).to_bytes())
>>> bool((s.predict(X) == m.predict(X)).all()), s.version
(True, 0)
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
import torch

from stream_dec._validation import check_embeddings, resolve_device
from stream_dec.online import gates
from stream_dec.online.clusters import ClusterTable
from stream_dec.online.confidence import Calibration

MAGIC = b"SDECSNP1"
_DIGEST = 32
_LEN = struct.Struct("<I")


class SnapshotError(ValueError):
    """Bytes that are not a valid snapshot (wrong magic, checksum or layout)."""


class PredictSnapshot:
    """One model version, predict-only: ``predict``, ``predict_with_confidence``, ``roots``, ``transform``.

    Build one with :meth:`from_model` (the learner) or :meth:`from_bytes` (a predictor).
    """

    def __init__(self, scalars: dict[str, Any], arrays: dict[str, np.ndarray], device: str | torch.device = "cpu"):
        self.scalars = scalars
        self.version = int(scalars["version"])
        self.n_features_in_ = int(scalars["n_features_in"])
        self.calibration = Calibration.from_state(scalars["calibration"])
        self.encoder_id = str(scalars["encoder_id"])
        dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.device = dev
        self._mean = torch.from_numpy(arrays["mean"]).to(dev)
        self._scale = float(scalars["scale"])
        self._layers = [
            (torch.from_numpy(arrays[f"enc.{i}.weight"]).to(dev), torch.from_numpy(arrays[f"enc.{i}.bias"]).to(dev))
            for i in range(int(scalars["encoder_layers"]))
        ]
        cols = {k[len("table."):]: v for k, v in arrays.items() if k.startswith("table.")}
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in cols.items()}
        state["next_id"] = int(scalars["next_id"])
        self.table = ClusterTable.from_state(state, dev)

    # ------------------------------------------------------------ build
    @classmethod
    def from_model(cls, model) -> PredictSnapshot:
        """The snapshot of a fitted :class:`~stream_dec.StreamDEC` at its current version (on CPU)."""
        model._check_fitted()
        linears = [m for m in model.autoencoder_.encoder if isinstance(m, torch.nn.Linear)]
        arrays: dict[str, np.ndarray] = {"mean": _np(model.mean_)}
        for i, lin in enumerate(linears):
            arrays[f"enc.{i}.weight"], arrays[f"enc.{i}.bias"] = _np(lin.weight), _np(lin.bias)
        table = model.clusters_.state()
        arrays.update({f"table.{k}": v.numpy() for k, v in table.items() if k != "next_id"})
        scalars = {
            "version": int(model.version_), "n_features_in": int(model.n_features_in_), "scale": float(model.scale_),
            "calibration": model.confidence_calibration().state(), "encoder_layers": len(linears), "next_id": int(table["next_id"]),
            "encoder_id": encoder_fingerprint(model),
        }
        return cls(scalars, arrays)

    def to_bytes(self) -> bytes:
        """The snapshot as self-checking bytes (same state, same bytes)."""
        arrays: dict[str, np.ndarray] = {"mean": _np(self._mean)}
        for i, (w, b) in enumerate(self._layers):
            arrays[f"enc.{i}.weight"], arrays[f"enc.{i}.bias"] = _np(w), _np(b)
        arrays.update({f"table.{k}": v.numpy() for k, v in self.table.state().items() if k != "next_id"})
        layout, chunks, offset = [], [], 0
        for name in sorted(arrays):
            a = np.ascontiguousarray(arrays[name])
            layout.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
            chunks.append(a.tobytes())
            offset += a.nbytes
        header = json.dumps({"scalars": self.scalars, "arrays": layout}, sort_keys=True, separators=(",", ":")).encode()
        body = _LEN.pack(len(header)) + header + b"".join(chunks)
        return MAGIC + hashlib.sha256(body).digest() + body

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device = "cpu") -> PredictSnapshot:
        """Read :meth:`to_bytes` output; :class:`SnapshotError` if it is damaged or not a snapshot."""
        data = bytes(data)
        if len(data) < len(MAGIC) + _DIGEST + _LEN.size or not data.startswith(MAGIC):
            raise SnapshotError("not a stream_dec model snapshot (wrong magic bytes)")
        digest, body = data[len(MAGIC) : len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST :]
        if hashlib.sha256(body).digest() != digest:
            raise SnapshotError("snapshot checksum mismatch: the bytes are damaged")
        (n,) = _LEN.unpack_from(body)
        try:
            header = json.loads(body[_LEN.size : _LEN.size + n])
            blob = memoryview(body)[_LEN.size + n :]
            arrays = {}
            for a in header["arrays"]:
                dt = np.dtype(a["dtype"])
                count = int(np.prod(a["shape"], dtype=np.int64))
                arrays[a["name"]] = np.frombuffer(blob, dtype=dt, count=count, offset=a["offset"]).reshape(a["shape"]).copy()
            return cls(header["scalars"], arrays, device)
        except (KeyError, ValueError, TypeError) as exc:
            raise SnapshotError(f"snapshot layout is invalid: {exc}") from exc

    # ------------------------------------------------------------ predict
    @torch.no_grad()
    def transform(self, X) -> np.ndarray:
        """Latent codes of ``X`` (what predictors send the learner)."""
        return self._latents(X).cpu().numpy()

    @torch.no_grad()
    def _latents(self, X) -> torch.Tensor:
        X = check_embeddings(X, n_features=self.n_features_in_)
        h = (torch.from_numpy(X).to(self.device) - self._mean) / self._scale
        out = []
        for i in range(0, h.shape[0], gates.PREDICT_CHUNK):
            x = h[i : i + gates.PREDICT_CHUNK]
            for j, (w, b) in enumerate(self._layers):
                x = torch.nn.functional.linear(x, w, b)
                if j < len(self._layers) - 1:
                    x = torch.relu(x)
            out.append(x)
        return torch.cat(out) if out else h.new_zeros((0, self._layers[-1][0].shape[0]))

    def predict_with_confidence_latent(self, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, confidence)`` of latents ``z`` (from :meth:`transform`)."""
        rows, conf = gates.label(self.table, z, self.calibration)
        return self.table.ids[rows.cpu().numpy()], conf.cpu().numpy()

    def predict_with_confidence(self, X) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, confidence)`` of every row of ``X``, as the model of this version gives them."""
        return self.predict_with_confidence_latent(self._latents(X))

    def predict(self, X) -> np.ndarray:
        """Cluster id of every row of ``X``."""
        return self.predict_with_confidence(X)[0]

    def roots(self, ids) -> np.ndarray:
        """The root id of every id in ``ids``."""
        return self.table.roots(np.asarray(ids, dtype=np.int64))

    @property
    def cluster_ids_(self) -> np.ndarray:
        """The ids this version can assign."""
        return self.table.ids.copy()


def encoder_fingerprint(model) -> str:
    """16 hex digits identifying the frozen encoder and input normalisation of a fitted model.

    Latents are comparable only under the same encoder: the learner refuses feed
    records made by another (a predictor still on the model of an older fit).
    """
    h = hashlib.sha256()
    h.update(_np(model.mean_).tobytes())
    h.update(struct.pack("<d", float(model.scale_)))
    for name, p in sorted(model.autoencoder_.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(_np(p).tobytes())
    return h.hexdigest()[:16]


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())

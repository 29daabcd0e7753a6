"""The model as a checkpoint state dict, and back (the file format is :mod:`stream_dec.checkpoint`).

Format 3 (the one written)::

    format            3
    params            get_params() (tuples as lists)
    autoencoder       state_dict of the frozen autoencoder; autoencoder_dims its layer sizes
    mean              input mean [n_features]; the global input scale is scalars["scale_"]
    scalars           seed_, n_features_in_, scale_, version_, cohesion_, separation_,
                      latent_scale_, min_support_, max_clusters_, n_seen_
    clusters          the cluster table (stream_dec/online/clusters.py): next_id and one
                      tensor per column: ids, centres, memory, spawned, gate, gate_cur, gate_ref
                      (a child's gate against its parent; restored as gate when absent), radius, freq,
                      parent (the id each refines, -1 for a root), born (model version of its
                      birth), support (items it was founded on; -1 where unknown)
    ewc               likelihood, fisher, anchor (stream_dec/online/ewc.py); older files held
                      fisher, anchor, evidence, resolved on load
    rule              {"name": centre rule, **its state}: nothing for "mean"; adam_m, adam_v,
                      adam_t for "dec" (stream_dec/online/rules.py)
    reservoir, buffer the reservoir and novelty window (numpy arrays stored as tensors)
    extra             the caller's plain data (e.g. consumer offsets)

Format 2 is format 3 without the ``parent``, ``born`` and ``support`` columns; it is
migrated on load with every id a root, born at version 0 when fitted and at an unknown
version (-1) when spawned, support unknown (-1): a format-2 model had no hierarchy.

Format 1 (written before) is migrated on load (to format 2, then 3): ``tensors`` held every per-cluster
tensor under its attribute name (``centres_`` ... ``evidence_``) plus ``mean_``;
``cluster_ids`` and ``scalars["next_id_"]`` move into ``clusters``; ``fisher_``,
``ewc_anchor_`` and ``evidence_`` into ``ewc``; ``adam_m_``, ``adam_v_`` and ``adam_t_``
into ``rule`` when the centre rule is ``"dec"`` and are dropped under ``"mean"``
(a format-1 file always held them; the mean rule never reads them). The migrated
model predicts and continues exactly as the format-1 model did.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stream_dec.checkpoint import CheckpointError
from stream_dec.model import Autoencoder
from stream_dec.online.clusters import NO_PARENT, UNKNOWN, ClusterTable
from stream_dec.online.ewc import OnlineEWC
from stream_dec.online.novelty import NoveltyBuffer
from stream_dec.online.reservoir import Reservoir
from stream_dec.online.rules import make_rule

if TYPE_CHECKING:  # pragma: no cover
    from stream_dec.online.estimator import StreamDEC

FORMAT_VERSION = 3
SCALARS = ("seed_", "n_features_in_", "scale_", "version_", "cohesion_", "separation_", "latent_scale_", "min_support_", "max_clusters_", "n_seen_")


def model_state(est: "StreamDEC", extra: dict | None) -> dict:
    """The checkpoint state of a fitted model (CPU tensors and plain data, no references into it)."""
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in est.get_params().items()}
    rule = est.rule_
    return {
        "format": FORMAT_VERSION,
        "params": params,
        "autoencoder": {k: v.detach().cpu().clone() for k, v in est.autoencoder_.state_dict().items()},
        "autoencoder_dims": list(est.autoencoder_.dims),
        "mean": est.mean_.detach().cpu().clone(),
        "scalars": {name: getattr(est, name) for name in SCALARS},
        "clusters": est.clusters_.state(),
        "ewc": est.ewc_.state(),
        "rule": {"name": rule.name, **rule.state()},
        "reservoir": _tensors(est.reservoir_.state()),
        "buffer": _tensors(est.buffer_.state()),
        "extra": dict(extra or {}),
    }


def model_from_state(cls: type["StreamDEC"], state: dict, device: str | None, source: Path) -> "StreamDEC":
    """A fitted model from a checkpoint state of any supported format.

    Raises :class:`CheckpointError` for an unknown format and ``KeyError``,
    ``ValueError``... for an incomplete or inconsistent state (the caller wraps them).
    """
    state = migrate(state, source)
    params = dict(state["params"])
    params["hidden_dims"] = tuple(params["hidden_dims"])
    # A model saved before children could refine their parent continues as it was saved:
    # with no refinement (its ids keep the flat churn promise it was run under).
    params.setdefault("refine_share", 0.0)
    params.setdefault("refine_budget", 0.0)
    if device is not None:
        params["device"] = device
    m = cls(**params)
    dev = m._resolve_device()
    sc = state["scalars"]
    ae = Autoencoder(int(sc["n_features_in_"]), m.hidden_dims, int(state["autoencoder_dims"][-1]))
    ae.load_state_dict(state["autoencoder"])
    ae.to(dev).eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    m.autoencoder_, m.device_, m.mean_ = ae, dev, state["mean"].to(dev)
    for name in SCALARS:
        setattr(m, name, sc[name])
    m.clusters_ = ClusterTable.from_state(state["clusters"], dev)
    m.ewc_ = OnlineEWC.from_state(state["ewc"], dev)
    if state["rule"]["name"] != m.centre_rule:
        raise ValueError(f"rule state {state['rule']['name']!r} does not match centre_rule {m.centre_rule!r}")
    m.rule_ = make_rule(m.centre_rule, len(m.clusters_), m.clusters_.centres.shape[1], dev)
    m.rule_.load_state(state["rule"])
    m.clusters_.parts = [m.ewc_, m.rule_]
    if m.ewc_.fisher.shape != m.clusters_.centres.shape:
        raise ValueError("per-cluster arrays disagree in length")
    m.reservoir_ = Reservoir.from_state(_arrays(state["reservoir"]))
    m.buffer_ = NoveltyBuffer.from_state(_arrays(state["buffer"]))
    m.checkpoint_extra_ = dict(state.get("extra", {}))
    m.checkpoint_path_ = source
    return m


def migrate(state: dict, source: Path | str = "checkpoint") -> dict:
    """``state`` in the current format (format 1 is converted; unknown formats raise)."""
    fmt = state.get("format")
    if fmt == 1:
        state, fmt = _v1_to_v2(state), 2
    if fmt == 2:
        state, fmt = _v2_to_v3(state), 3
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{source} has format {state.get('format')!r}, expected 1, 2 or {FORMAT_VERSION}")
    return state


def _v1_to_v2(state: dict) -> dict:
    t, sc = state["tensors"], dict(state["scalars"])
    rule: dict[str, Any] = {"name": state["params"]["centre_rule"]}
    if rule["name"] == "dec":
        rule.update(adam_m=t["adam_m_"], adam_v=t["adam_v_"], adam_t=t["adam_t_"])
    clusters = {"next_id": sc.pop("next_id_"), "ids": state["cluster_ids"]}
    clusters.update({name: t[f"{name}_"] for name in ("centres", "memory", "spawned", "gate", "gate_cur", "radius", "freq")})
    return {
        **{k: state[k] for k in ("params", "autoencoder", "autoencoder_dims", "reservoir", "buffer")},
        "format": 2,
        "mean": t["mean_"],
        "scalars": sc,
        "clusters": clusters,
        "ewc": {"fisher": t["fisher_"], "anchor": t["ewc_anchor_"], "evidence": t["evidence_"]},
        "rule": rule,
        "extra": state.get("extra", {}),
    }


def _v2_to_v3(state: dict) -> dict:
    clusters = dict(state["clusters"])
    spawned = clusters["spawned"].cpu().numpy().astype(bool)
    clusters["parent"] = torch.full((len(spawned),), NO_PARENT, dtype=torch.int64)
    clusters["born"] = torch.from_numpy(np.where(spawned, UNKNOWN, 0).astype(np.int64))
    clusters["support"] = torch.full((len(spawned),), UNKNOWN, dtype=torch.int64)
    return {**state, "format": 3, "clusters": clusters}


def _tensors(d: dict) -> dict:
    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _arrays(d: dict) -> dict:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}

"""Writes the format-1 checkpoints of ``tests/test_checkpoint.py``'s migration test.

Run it against the code that wrote format 1 (commit 5172af7)::

    git worktree add /tmp/old_sd 5172af7
    PYTHONPATH=/tmp/old_sd python tests/data/make_format1.py tests/data

For each centre rule it fits a tiny model on blobs, runs partial_fit until a cluster
has been spawned, saves ``format1_<rule>.sdec``, then records what that code did next
in ``format1_<rule>.npz``: the labels of ``X`` from the saved model, and the report
and labels after one more partial_fit on ``X_next``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def _blobs(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    k = rng.integers(0, len(centres), n)
    return (centres[k] + 0.5 * rng.standard_normal((n, centres.shape[1]))).astype(np.float32)


def main(out: Path) -> None:
    """Fit, update, save and record, once per centre rule."""
    import stream_dec
    from stream_dec import StreamDEC

    print("stream_dec from", stream_dec.__file__, file=sys.stderr)
    rng = np.random.default_rng(2024)
    centres = rng.standard_normal((5, 8)).astype(np.float32) * 4.0
    X_fit = _blobs(rng, centres[:4], 240)
    stream = [np.concatenate([_blobs(rng, centres[:4], 60), _blobs(rng, centres[4:], 30)]) for _ in range(6)]
    X_next = np.concatenate([_blobs(rng, centres[:4], 60), _blobs(rng, centres[4:], 30)])
    X = np.concatenate([X_fit[:100], _blobs(rng, centres[4:], 40)])
    small = dict(hidden_dims=(), latent_dim=4, pretrain_epochs=5, refine_max_iter=50, n_init=2, reservoir_size=200,
                 buffer_size=200, min_support=10, random_state=0, verbose=False, max_update_ms=60000.0)
    for rule in ("mean", "dec"):
        m = StreamDEC(n_clusters=4, centre_rule=rule, **small).fit(X_fit)
        for b in stream:
            m.partial_fit(b)
        assert m.n_clusters_ > 4, "no cluster was spawned: the fixture would not exercise per-cluster state"
        m.save(out / f"format1_{rule}.sdec", extra={"offsets": {"in": {"0": 42}}})
        labels = m.predict(X)
        r = m.partial_fit(X_next)
        report = r.to_dict()
        report.pop("update_ms")
        np.savez(
            out / f"format1_{rule}.npz", X=X, labels=labels, X_next=X_next, labels_next=m.predict(X),
            report_next=np.array(repr(report)),
        )
        print(rule, "clusters", m.n_clusters_, "report", report, file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

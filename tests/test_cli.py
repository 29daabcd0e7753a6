"""The stream-dec command line, run as a real subprocess on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

FAST_PARAMS = ["--param", "hidden_dims=(32,)", "--param", "latent_dim=8", "--param", "pretrain_epochs=5", "--param", "refine_max_iter=50"]


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "stream_dec.cli", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"stream-dec {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, blobs):
    d = tmp_path_factory.mktemp("data")
    np.savez(d / "blobs.npz", X=blobs["X"], y=blobs["y"])
    np.save(d / "blobs.npy", blobs["X"])
    return d


def test_help_of_every_command():
    out = _cli("--help").stdout
    for cmd in ("train", "evaluate", "inspect"):
        assert cmd in out
        assert "usage" in _cli(cmd, "--help").stdout


def test_train_evaluate_inspect_round_trip(data_files, tmp_path):
    ck = tmp_path / "ck"
    out = _cli("train", "--data", str(data_files / "blobs.npz"), "--n-clusters", "5", "--checkpoint-dir", str(ck), "--seed", "3", *FAST_PARAMS)
    info = json.loads(out.stdout)
    assert info["n_clusters"] == 5 and info["seed"] == 3
    assert "pretrain epoch" in out.stderr  # progress is shown
    assert len(list(ck.glob("ckpt-*.sdec"))) == 1

    ev = json.loads(_cli("evaluate", "--checkpoint", str(ck), "--data", str(data_files / "blobs.npz")).stdout)
    assert ev["items"] == 1500 and ev["acc"] > 0.95 and ev["nmi"] > 0.9

    ev_npy = json.loads(_cli("evaluate", "--checkpoint", str(ck), "--data", str(data_files / "blobs.npy")).stdout)
    assert "acc" not in ev_npy and ev_npy["clusters_used"] == 5

    ins = json.loads(_cli("inspect", "--checkpoint", str(ck)).stdout)
    assert ins["cluster_ids"] == [0, 1, 2, 3, 4] and ins["model_version"] == 0 and ins["n_features_in"] == 24


def test_train_from_npy_and_quiet(data_files, tmp_path):
    out = _cli("train", "--data", str(data_files / "blobs.npy"), "--n-clusters", "3", "--checkpoint-dir", str(tmp_path), "--quiet", *FAST_PARAMS)
    assert out.stderr == "" and json.loads(out.stdout)["n_clusters"] == 3


def test_clear_errors(data_files, tmp_path):
    bad = _cli("train", "--data", str(tmp_path / "missing.npz"), "--n-clusters", "3", "--checkpoint-dir", str(tmp_path), check=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = _cli("inspect", "--checkpoint", str(tmp_path / "empty"), check=False)
    assert bad.returncode == 2 and "checkpoint" in bad.stderr
    bad = _cli("train", "--data", str(data_files / "blobs.npz"), "--n-clusters", "3", "--checkpoint-dir", str(tmp_path), "--param", "bogus=1", check=False)
    assert bad.returncode == 2 and "bogus" in bad.stderr
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((10, 4), np.nan, dtype=np.float32))
    bad = _cli("train", "--data", str(nan), "--n-clusters", "2", "--checkpoint-dir", str(tmp_path), check=False)
    assert bad.returncode == 2 and "NaN" in bad.stderr

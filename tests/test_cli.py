"""The stream-dec command line, run as a real subprocess on real files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from stream_dec.cli import main

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

    shown = _cli("inspect", "--checkpoint", str(ck))
    ins = json.loads(shown.stdout)
    assert ins["cluster_ids"] == [0, 1, 2, 3, 4] and ins["model_version"] == 0 and ins["n_features_in"] == 24
    assert ins["parent_ids"] == {str(i): None for i in range(5)} and [n["id"] for n in ins["tree"]] == [0, 1, 2, 3, 4]
    assert sum(n["support"] for n in ins["tree"]) == 1500  # a fitted id's support: the fit items it got
    tree = shown.stderr.splitlines()
    assert tree[0].startswith("ids") and [line.split()[0] for line in tree[1:]] == ["0", "1", "2", "3", "4"]
    assert all("fitted, support" in line for line in tree[1:])


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


def _usage_error(capsys, command: str, *args: str) -> str:
    """Run ``stream-dec COMMAND ARGS`` in this process; assert exit 2 with one error line and no exception; return stderr."""
    capsys.readouterr()
    try:
        rc = main([command, *args])
    except SystemExit as exc:  # argparse rejects a flag
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert f"stream-dec {command}: error:" in err, err
    return err


def test_train_errors_name_the_flag_and_the_problem(capsys, data_files, tmp_path):
    npz = str(data_files / "blobs.npz")
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    ck = str(tmp_path / "ck")
    cases = [
        (["--checkpoint-dir", str(a_file)], ["--checkpoint-dir", "is a file, not a directory"]),
        (["--checkpoint-dir", str(a_file / "sub")], ["--checkpoint-dir", "cannot create it"]),
        (["--checkpoint-dir", ck, "--param", "latent_dim=abc"], ["latent_dim", "an int", "'abc'"]),
        (["--checkpoint-dir", ck, "--param", "alpha=abc"], ["alpha", "a number", "'abc'"]),
        (["--checkpoint-dir", ck, "--param", "latnt_dim=4"], ["unknown hyper-parameter", "did you mean latent_dim"]),
        (["--checkpoint-dir", ck, "--param", "n_clusters=4"], ["set it with --n-clusters"]),
        (["--checkpoint-dir", ck, "--limit", "-1"], ["--limit", "must be >= 0"]),
        (["--checkpoint-dir", ck, "--n-clusters", "two"], ["--n-clusters", "expected an integer"]),
    ]
    for extra, fragments in cases:
        err = _usage_error(capsys, "train", "--data", npz, "--n-clusters", "3", "--quiet", *FAST_PARAMS, *extra)
        for fragment in fragments:
            assert fragment in err, (extra, fragment, err)
    assert not list(tmp_path.glob("**/ckpt-*.sdec"))  # nothing was trained


def test_bad_data_files_are_named(capsys, data_files, tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "narrow.npy", np.zeros((10, 5), dtype=np.float32))
    np.savez(tmp_path / "short_labels.npz", X=np.zeros((10, 24), dtype=np.float32), y=np.arange(3))
    ck = tmp_path / "ck"
    assert main(["train", "--data", str(data_files / "blobs.npy"), "--n-clusters", "3", "--checkpoint-dir", str(ck), "--quiet", *FAST_PARAMS]) == 0
    cases = [
        ("junk.npz", ["junk.npz", "not a .npz file"]),
        ("junk.npy", ["junk.npy", "not a .npy file"]),
        ("objects.npy", ["objects.npy", "pickled data is refused"]),
        ("narrow.npy", ["5 features", "fitted with 24"]),
        ("short_labels.npz", ["labels 'y' must be one per row of X (10)", "(3,)"]),
        ("missing.npz", ["missing.npz does not exist"]),
    ]
    for name, fragments in cases:
        err = _usage_error(capsys, "evaluate", "--checkpoint", str(ck), "--data", str(tmp_path / name))
        for fragment in fragments:
            assert fragment in err, (name, fragment, err)


def _cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_missing(), reason="this host has CUDA")
def test_run_with_a_missing_gpu_says_so_before_reading_the_checkpoint(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("STREAM_DEC_MODEL__DEVICE", "cuda")
    monkeypatch.chdir(tmp_path)  # no ./.env of the caller
    # An empty checkpoint directory and no broker: the device is checked before either is used.
    err = _usage_error(capsys, "run", "--checkpoint-dir", str(tmp_path), "--bootstrap-servers", "127.0.0.1:1", "--metrics-port", "0")
    assert "STREAM_DEC_MODEL__DEVICE" in err and "CUDA" in err and "'cuda'" in err
    assert "checkpoint" not in err

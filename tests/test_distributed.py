"""torchrun with gloo: 2 processes give the same results as 1."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from imagedata import make_image_folder
from tracin.cli import main
from tracin.distributed import merge_topk, shard_range


def test_shards_are_whole_batches_covering_everything():
    for n, bs, world in [(24, 7, 2), (100, 8, 3), (5, 2, 2), (64, 64, 1)]:
        ranges = [shard_range(n, bs, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % bs == 0 for start, _ in ranges)


def test_merge_topk_is_exact():
    import torch

    M = torch.randn(4, 30)
    parts = []
    for lo, hi in [(0, 10), (10, 25), (25, 30)]:
        sub = M[:, lo:hi]
        k = min(5, hi - lo)
        v, i = sub.topk(k, 1)
        nv, ni = (-sub).topk(k, 1)
        parts.append((v, i + lo, -nv, ni + lo))
    pv, pi, ov, oi = merge_topk(parts, 5)
    assert torch.equal(pi, M.topk(5, 1).indices) and torch.equal(oi, (-M).topk(5, 1).indices)


@pytest.mark.parametrize("flags", [["--layers", "all"], ["--layers", "last", "--precondition", "kfac"]], ids=["plain", "kfac"])
def test_torchrun_two_processes_match_one(tmp_path, flags):
    """Plain: bit for bit. K-FAC: each rank fits on its shard and the factor sums are all-reduced, so
    the preconditioner (and the scores, to rounding) equal one process's."""
    kfac = "kfac" in flags
    data = make_image_folder(tmp_path / "d", n_train=8, n_test=3)
    ckpt = tmp_path / "c"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir", str(ckpt),
                 "--image_size", "16", "--quiet"]) == 0
    args = ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--top_k", "4",
            "--batch_size", "5", "--self_influence", "--quiet"] + flags
    one = subprocess.run([sys.executable, "-m", "tracin"] + args + ["--output_dir", str(tmp_path / "one"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tracin"] + args + ["--output_dir", str(tmp_path / "two"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})  # one host: gloo on loopback, whatever the hostname resolves to
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-8000:]
    for name in ("top_k_influences_indices.npy", "top_k_opponents_indices.npy"):
        assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)), name
    # same batches and the same thread count as torchrun's workers (1): bit-for-bit the same numbers
    for name in ("top_k_influences_values.npy", "top_k_opponents_values.npy", "self_influence.npy"):
        a, b = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
        assert (np.allclose(a, b, rtol=1e-5, atol=0) if kfac else np.array_equal(a, b)), name
    one = list(csv.DictReader(open(tmp_path / "one" / "self_influence.csv")))
    two = list(csv.DictReader(open(tmp_path / "two" / "self_influence.csv")))
    assert [r["train_file"] for r in one] == [r["train_file"] for r in two]
    import json

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    if kfac:
        assert manifest["precondition"]["fit_examples"] == 24  # both shards' images: the sums were all-reduced

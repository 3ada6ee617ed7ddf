"""torchrun with gloo: 2 processes give the same results as 1."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import close, make_image_folder
from tracin.workflows.cli import main
from tracin.engine.distributed import merge_topk, shard_range


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


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--layers", "all", "--precondition", "none"], ["--layers", "last", "--precondition", "kfac"]],
                         ids=["plain", "kfac"])
def test_torchrun_two_processes_match_one(tmp_path, flags):
    """Plain: bit for bit. K-FAC: each rank fits on its shard and the factor statistics are all-reduced (the last
    layer's few rows, which one process inverts in their low-rank form, become their sums), so the preconditioner and
    the scores equal one process's to rounding."""
    kfac = "none" not in flags
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
        assert (close(a, b) if kfac else np.array_equal(a, b)), name
    one = list(csv.DictReader(open(tmp_path / "one" / "self_influence.csv")))
    two = list(csv.DictReader(open(tmp_path / "two" / "self_influence.csv")))
    assert [r["train_file"] for r in one] == [r["train_file"] for r in two]
    import json

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    if kfac:
        assert manifest["precondition"]["fit_examples"] == 24  # both shards' images: the sums were all-reduced


BRANCHY = '''
import os, sys
import numpy as np, torch
from torch import nn
from torch.utils.data import TensorDataset
from tracin import Checkpoint, TracIn


class Branchy(nn.Module):
    """Batches whose first feature is positive on average go through head a, the others through head b."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.a(h) if bool(x[:, 0].mean() > 0) else self.b(h)


if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    torch.distributed.init_process_group("gloo")
g = torch.Generator().manual_seed(0)
torch.manual_seed(0)
model = Branchy()
x = torch.randn(16, 4, generator=g)
x[:8, 0], x[8:, 0] = 3.0, -3.0  # with two ranks, rank 0's shard reaches only head a, rank 1's only head b
y = torch.randint(0, 3, (16,), generator=g)
ckpts = [Checkpoint({k: v + 0.1 * i * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()},
                    learning_rate=0.1) for i in range(2)]
tr = TracIn(model, ckpts, layers=["body", "a", "b"], precondition="kfac", device="cpu", batch_size=4, progress=False)
scores = tr.self_influence(TensorDataset(x, y))
truncated = TracIn(model, ckpts, layers=["body", "a", "b"], precondition="kfac", device="cpu", batch_size=4, progress=False,
                   projection_dim=4)  # the three layers share 12 directions, sized from the reduced statistics
projected = truncated.self_influence(TensorDataset(x, y))
if int(os.environ.get("RANK", "0")) == 0:
    np.save(sys.argv[1], scores.numpy())
    np.save(sys.argv[1] + ".projected.npy", projected.numpy())
    print("fit examples", tr.preconditioner.fit_examples)
if torch.distributed.is_initialized():  # leave together, as the CLI does: a rank exiting alone can abort in gloo
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_torchrun_kfac_fit_with_a_layer_only_some_ranks_reach(tmp_path):
    """A data-dependent branch: each rank's shard reaches a different output head during the K-FAC fit.
    The ranks agree on the union of layers before reducing (a rank adds zeros for a head it never
    ran), so two processes give one process's scores; reducing each rank's own layers in name order
    summed head a's statistics into head b's. With projection_dim the layers share their kept directions as rank 0
    sizes them."""
    script = tmp_path / "branchy.py"
    script.write_text(BRANCHY)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.npy")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                          str(tmp_path / "two.npy")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-8000:]
    assert "fit examples 16" in one.stdout and "fit examples 16" in two.stdout
    assert close(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))
    assert close(np.load(tmp_path / "one.npy.projected.npy"), np.load(tmp_path / "two.npy.projected.npy"))


@pytest.mark.slow
def test_torchrun_ranks_write_different_shards_of_one_index(tmp_path):
    """Two processes build one index (each its own shards; the K-FAC fit all-reduced): it gives the top-k of an index
    built by one process, and every shard is complete."""
    import json

    data = make_image_folder(tmp_path / "d", n_train=8, n_test=3)
    ckpt = tmp_path / "c"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir", str(ckpt),
                 "--image_size", "16", "--quiet"]) == 0
    build = ["index", "build", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--layers", "all", "--batch_size", "5",
             "--memory_budget", "0.00002", "--device", "cpu", "--quiet"]
    assert main(build + ["--index_dir", str(tmp_path / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tracin"]
                         + build + ["--index_dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-8000:]
    meta = json.loads((tmp_path / "two" / "index.json").read_text())
    assert len(meta["shards"]) >= 2 and all((tmp_path / "two" / f"{s['name']}.json").is_file() for s in meta["shards"])
    assert meta["fit_examples"] == 24
    for index in ("one", "two"):
        assert main(["index", "query", "--index_dir", str(tmp_path / index), "--data_dir", str(data), "--checkpoint_dir",
                     str(ckpt), "--output_dir", str(tmp_path / f"q{index}"), "--top_k", "4", "--device", "cpu", "--quiet"]) == 0
    for name in ("top_k_influences_indices.npy", "top_k_opponents_indices.npy"):
        assert np.array_equal(np.load(tmp_path / "qone" / name), np.load(tmp_path / "qtwo" / name)), name
    assert close(np.load(tmp_path / "qone" / "top_k_influences_values.npy"), np.load(tmp_path / "qtwo" / "top_k_influences_values.npy"))

"""Resumable runs: kill -9 at a random tile, resume, and get the uninterrupted result."""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import CountingDataset, make_case, make_image_folder, perturbed_checkpoints
from tracin import TracIn, TracInError
from tracin.workflows.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_image_folder(root / "d", n_train=12, n_test=3)
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir", str(root / "c"),
                 "--image_size", "16", "--quiet"]) == 0
    return root, data


def _influence(root, data, out, *extra, env=None):
    args = [sys.executable, "-m", "tracin", "influence", "--data_dir", str(data), "--checkpoint_dir", str(root / "c"),
            "--output_dir", str(out), "--top_k", "4", "--layers", "all", "--batch_size", "2", "--self_influence",
            "--full_matrix", "--memory_budget", "0.00000001", "--quiet", *extra]
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_outputs(run_dir):
    root, data = run_dir
    assert _influence(root, data, root / "clean").returncode == 0
    tile = random.Random().randint(2, 15)  # 36 images in batches of 2: 18 tiles
    killed = _influence(root, data, root / "crash", env={"TRACIN_KILL_AFTER_TILES": str(tile)})
    assert killed.returncode == -signal.SIGKILL
    assert not (root / "crash" / "manifest.json").exists() and (root / "crash" / ".progress" / "state.safetensors").exists()
    resumed = _influence(root, data, root / "crash")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("top_k_influences_values.npy", "top_k_influences_indices.npy", "top_k_opponents_values.npy",
                 "top_k_opponents_indices.npy", "self_influence.npy", "influence_matrix.npy"):
        assert np.array_equal(np.load(root / "clean" / name), np.load(root / "crash" / name)), (name, tile)
    assert (root / "crash" / "self_influence.csv").read_text() == (root / "clean" / "self_influence.csv").read_text()
    assert json.loads((root / "crash" / "manifest.json").read_text())["complete"]
    assert not (root / "crash" / ".progress").exists()


@pytest.mark.slow
def test_changed_arguments_refuse_to_resume(run_dir):
    root, data = run_dir
    out = root / "changed"
    assert _influence(root, data, out, env={"TRACIN_KILL_AFTER_TILES": "3"}).returncode == -signal.SIGKILL
    refused = _influence(root, data, out, "--seed", "7")
    assert refused.returncode == 2 and "started with different settings or inputs" in refused.stderr and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _influence(root, data, out, "--seed", "7", "--overwrite").returncode == 0


def _interrupted(monkeypatch, run, after_tiles: int) -> None:
    """Call ``run()`` with a KeyboardInterrupt raised right after tile ``after_tiles`` is committed."""
    import tracin.engine.resume as R

    original, calls = R.ResumeState.tile_done, {"n": 0}

    def interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == after_tiles:
            raise KeyboardInterrupt

    monkeypatch.setattr(R.ResumeState, "tile_done", interrupt)
    with pytest.raises(KeyboardInterrupt, match="^$"):
        run()
    monkeypatch.setattr(R.ResumeState, "tile_done", original)


@pytest.mark.parametrize("kind, budget, after", [("tensors", 500, 4), ("map-style", 4_000, 1)])
def test_api_resume_after_interruption(tmp_path, monkeypatch, kind, budget, after):
    """Same results after an interruption; a map-style training set is not read again up to where
    the interrupted run stopped (interrupted after one tile, inside the first test chunk)."""
    model, train, test = make_case("mlp", 30, 5)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = (TensorDataset if kind == "tensors" else CountingDataset)(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device="cpu", batch_size=3, memory_budget=budget, progress=False, precondition="none")
    clean = tr.influence(train, test, top_k=4, self_influence=True)
    reads_clean = getattr(train, "reads", 0)
    _interrupted(monkeypatch, lambda: tr.influence(train, test, top_k=4, self_influence=True, resume_dir=tmp_path / "p"), after)
    if kind == "map-style":
        train.reads = 0
    again = tr.influence(train, test, top_k=4, self_influence=True, resume_dir=tmp_path / "p")
    assert again.stats["resumed_from_tile"] == after
    assert torch.equal(again.proponents.indices, clean.proponents.indices)
    assert torch.equal(again.proponents.values, clean.proponents.values)
    assert torch.equal(again.opponents.values, clean.opponents.values)
    assert torch.equal(again.self_influence, clean.self_influence)
    if kind == "map-style":
        assert clean.stats["tiles"] >= 2 * clean.stats["test_chunks"]
        start = again.stats["resumed_from"]
        assert 0 < start < 30 and train.reads == reads_clean - start
    _interrupted(monkeypatch, lambda: tr.influence(train, test, top_k=4, resume_dir=tmp_path / "q"), after)
    with pytest.raises(TracInError, match="top_k"):
        tr.influence(train, test, top_k=5, resume_dir=tmp_path / "q")


def test_loader_from_yields_the_tail_of_the_batches():
    from tracin.engine.loaders import loader_from, make_loader

    _, train, _ = make_case("mlp", 30, 5)
    # the tail of the original batches; an unaligned start is declined; tensor datasets keep their slicing
    full = make_loader(CountingDataset(*train), 3, "training")
    tail = loader_from(full, 9)
    assert [b[1].tolist() for b in tail] == [b[1].tolist() for b in full][3:]
    assert loader_from(full, 10) is None
    sliced = make_loader(TensorDataset(*train), 4, "training")
    assert [b[1].tolist() for b in loader_from(sliced, 8)] == [b[1].tolist() for b in sliced][2:]


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_planted_progress_file_never_runs_code(run_dir, tmp_path):
    root, data = run_dir
    marker = tmp_path / "pwned"
    for name in ("state.pt", "state.safetensors"):
        out = tmp_path / name
        (out / ".progress").mkdir(parents=True)
        torch.save({"key": "x", "payload": _Payload(marker)}, out / ".progress" / name)
        refused = _influence(root, data, out)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "--overwrite" in refused.stderr
        assert not marker.exists()
        assert _influence(root, data, out, "--overwrite").returncode == 0 and not marker.exists()


@pytest.mark.slow
def test_a_changed_progress_file_is_refused(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    root, data = run_dir
    out = tmp_path / "tampered"
    assert _influence(root, data, out, env={"TRACIN_KILL_AFTER_TILES": "3"}).returncode == -signal.SIGKILL
    state = out / ".progress" / "state.safetensors"
    tensors = load_file(str(state))
    with safe_open(str(state), framework="pt") as handle:
        header = handle.metadata()
    tensors["current.1"] = tensors["current.1"][:1]  # a running top-k that no longer fits its chunk
    save_file(tensors, str(state), metadata=header)
    refused = _influence(root, data, out)
    assert refused.returncode == 2 and "was not written by this version of tracin or was changed" in refused.stderr
    assert "Traceback" not in refused.stderr
    state.write_bytes(b"not a state file")
    refused = _influence(root, data, out)
    assert refused.returncode == 2 and "cannot be read" in refused.stderr

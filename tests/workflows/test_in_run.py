"""tracin train --in_run: in-run TracIn written as tracin influence's result files while the model trains, read by
tracin report; the README's plain-loop example runs as shown."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_image_folder
from tracin.workflows.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def in_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inrun")
    data = make_image_folder(root / "data", n_train=10, n_test=2)
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir",
                 str(root / "ck"), "--learning_rate", "0.05", "--batch_size", "8", "--image_size", "16", "--quiet",
                 "--in_run", str(root / "inrun"), "--val_fraction", "0.2"]) == 0
    return root


def test_train_in_run_writes_the_influence_result_files(in_run):
    out = in_run / "inrun"
    m = json.loads((out / "manifest.json").read_text())
    n_fit = m["data"]["n_train"]
    assert m["command"] == "train --in_run" and m["checkpoints"] == [] and m["in_run"]["steps"] == 2 * -(-n_fit // 8)
    assert n_fit < m["data"]["n_train_total"]  # the validation images are not trained on, so not recorded
    train_idx = np.load(out / "train_indices.npy")
    assert len(train_idx) == n_fit and set(np.load(out / "top_k_influences_indices.npy").ravel()) <= set(train_idx)
    s = np.load(out / "self_influence.npy")
    assert s.shape == (n_fit,) and np.isfinite(s).all() and (s > 0).all()
    values = np.load(out / "top_k_influences_values.npy")
    assert values.shape == (m["data"]["n_test"], min(100, n_fit)) and (np.diff(values, axis=1) <= 0).all()


def test_recording_leaves_the_training_as_it_is(in_run):
    """The same run without --in_run saves the same weights: the recorder draws nothing from the random state."""
    root = in_run
    assert main(["train", "--data_dir", str(root / "data"), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir",
                 str(root / "ck_plain"), "--learning_rate", "0.05", "--batch_size", "8", "--image_size", "16", "--quiet",
                 "--val_fraction", "0.2"]) == 0
    with_run = torch.load(root / "ck" / "checkpoint_epoch_2.pt", weights_only=True)["model_state_dict"]
    without = torch.load(root / "ck_plain" / "checkpoint_epoch_2.pt", weights_only=True)["model_state_dict"]
    assert all(torch.equal(with_run[k], without[k]) for k in without)


def test_report_reads_the_in_run_results(in_run):
    out = in_run / "inrun"
    assert main(["report", "--results_dir", str(out), "--quiet"]) == 0
    assert "every training step" in (out / "report.html").read_text()


def test_in_run_flags_are_checked(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_train=4, n_test=1)
    (tmp_path / "file").write_text("")
    code = main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir",
                 str(tmp_path / "ck"), "--image_size", "16", "--quiet", "--in_run", str(tmp_path / "file")])
    assert code == 2 and "--in_run" in capsys.readouterr().err


def test_the_readme_in_run_example_runs_as_shown():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "InRun" in b)
    scope = {"__name__": "__readme__"}
    exec(compile(block, "README.md", "exec"), scope)
    result = scope["result"]
    assert torch.isfinite(result.self_influence).all() and result.proponents.indices.shape[1] == 5

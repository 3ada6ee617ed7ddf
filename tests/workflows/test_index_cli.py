"""tracin index build / query on an image folder: the same top-k as tracin influence, report-ready, refusals."""
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from helpers import train_image_run
from tracin.tasks.classification import predict_proba
from tracin.workflows.cli import main
from tracin.workflows.image import influence


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_image_run(tmp_path_factory.mktemp("index"))


def _influence(data, ckpt, out, *flags):
    argv = ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "6",
            "--quiet", *flags]
    begin = time.perf_counter()
    assert main(argv) == 0
    return time.perf_counter() - begin


@pytest.mark.parametrize("flags", [["--layers", "all"], ["--layers", "all", "--precondition", "none", "--normalize", "cosine"]])
def test_query_writes_the_influence_files_with_the_same_top_k(run, flags, tmp_path, capsys, monkeypatch):
    root, data, ckpt = run
    _influence(data, ckpt, tmp_path / "influence", *flags)
    assert main(["index", "build", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--index_dir",
                 str(tmp_path / "index"), "--quiet", *flags]) == 0
    assert "Indexed 24 training images" in capsys.readouterr().out
    assert (tmp_path / "index" / "train_predictions.npz").is_file()
    predicted = []  # how many images each prediction pass of the query reads: the training images' come from the index
    monkeypatch.setattr(influence, "predict_proba", lambda model, data, *a: predicted.append(len(data)) or predict_proba(model, data, *a))
    assert main(["index", "query", "--index_dir", str(tmp_path / "index"), "--data_dir", str(data), "--checkpoint_dir",
                 str(ckpt), "--output_dir", str(tmp_path / "query"), "--top_k", "6", "--self_influence", "--quiet"]) == 0
    assert predicted == [9]  # the 9 test images only
    for name in ("top_k_influences_indices.npy", "top_k_opponents_indices.npy", "test_indices.npy", "train_indices.npy"):
        assert np.array_equal(np.load(tmp_path / "query" / name), np.load(tmp_path / "influence" / name)), name
    tables = [list(csv.DictReader((tmp_path / d / "top_k_influences.csv").open())) for d in ("query", "influence")]
    for column in ("train_predicted", "test_predicted"):  # the predictions the tables print are the same
        assert [row[column] for row in tables[0]] == [row[column] for row in tables[1]], column
    values = [np.load(tmp_path / d / "top_k_influences_values.npy") for d in ("query", "influence")]
    assert np.allclose(values[0], values[1], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "query" / "top_k_influences.csv").read_text().count("\n") == 9 * 12 + 1
    manifest = json.loads((tmp_path / "query" / "manifest.json").read_text())
    assert manifest["parameters"]["index_dir"] == str(tmp_path / "index")
    assert main(["report", "--results_dir", str(tmp_path / "query"), "--quiet"]) == 0
    assert (tmp_path / "query" / "report.html").is_file()


def test_query_refuses_an_index_of_other_images_and_a_missing_one(run, tmp_path, capsys):
    root, data, ckpt = run
    assert main(["index", "build", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--index_dir",
                 str(tmp_path / "index"), "--quiet"]) == 0
    other = Path(shutil.copytree(data, tmp_path / "other"))
    (other / "train" / "cat" / "extra.png").write_bytes(next((data / "train" / "cat").glob("*.png")).read_bytes())
    code = main(["index", "query", "--index_dir", str(tmp_path / "index"), "--data_dir", str(other), "--checkpoint_dir",
                 str(ckpt), "--output_dir", str(tmp_path / "q"), "--top_k", "5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "was not built from these 25 training images" in err and "Traceback" not in err
    code = main(["index", "query", "--index_dir", str(tmp_path / "none"), "--data_dir", str(data), "--checkpoint_dir",
                 str(ckpt), "--output_dir", str(tmp_path / "q"), "--quiet"])
    assert code == 2 and "holds no gradient index" in capsys.readouterr().err


def test_query_with_approximate_search_prints_its_recall(run, tmp_path, capsys):
    pytest.importorskip("faiss")
    root, data, ckpt = run
    assert main(["index", "build", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--index_dir",
                 str(tmp_path / "index"), "--quiet"]) == 0
    assert main(["index", "query", "--index_dir", str(tmp_path / "index"), "--data_dir", str(data), "--checkpoint_dir",
                 str(ckpt), "--output_dir", str(tmp_path / "q"), "--top_k", "3", "--ann_probes", "1000", "--quiet"]) == 0
    assert "recall@3 100.0% of the exact proponents, measured on 9 of the test images" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["engine"]["search"] == "ann, 1000 probes" and manifest["engine"]["ann_recall"] == 1.0


def test_info_says_what_an_index_holds_and_that_it_is_unfinished(run, tmp_path, capsys):
    root, data, ckpt = run
    assert main(["index", "build", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--index_dir",
                 str(tmp_path / "index"), "--layers", "all", "--use_projection", "--projection_dim", "16", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "info", "--index_dir", str(tmp_path / "index")]) == 0
    out = capsys.readouterr().out
    assert "24 rows (complete), float32" in out and "K-FAC (damping 0.1, 16 leading directions per layer)" in out
    assert "3 checkpoints" in out and f"Part 1: rows 0-23 ({data.resolve()})" in out
    next((tmp_path / "index").glob("shard-*.json")).unlink()
    assert main(["index", "info", "--index_dir", str(tmp_path / "index")]) == 0
    assert "INCOMPLETE: 1 of 1 shards missing" in capsys.readouterr().out
    assert main(["index", "info", "--index_dir", str(tmp_path / "none")]) == 2
    assert "holds no gradient index" in capsys.readouterr().err


def test_kept_predictions_are_used_only_under_their_key(tmp_path):
    """The training images' predictions an index keeps: read back under the key they were written with, for the rows
    asked; another key (other weights, images or preprocessing), rows past them or a damaged file give None, so the
    query predicts them itself."""
    from tracin.workflows.image import predictions

    probabilities = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    predictions.save(tmp_path, "key", probabilities)
    predicted, confidence = predictions.load(tmp_path, "key", np.array([2, 0]))
    assert predicted.tolist() == [1, 1] and np.allclose(confidence, [0.7, 0.9])
    assert predictions.load(tmp_path, "other", np.array([0])) is None
    assert predictions.load(tmp_path, "key", np.array([3])) is None
    assert predictions.load(tmp_path, None, np.array([0])) is None
    (tmp_path / predictions.FILE).write_bytes(b"not an npz")
    assert predictions.load(tmp_path, "key", np.array([0])) is None

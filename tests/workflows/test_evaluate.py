"""Label-noise injection, detection metrics, and the evaluate commands end to end on tiny data."""
import json

import numpy as np
import pytest

from helpers import make_image_folder
from tracin.workflows.cli import main
from tracin.workflows.image.folders import scan_split
from tracin.workflows.image.noise import inject_label_noise, parse_flip_map
from tracin.errors import DataError
from tracin.workflows.evaluation.common import recall_at, recall_curve, roc_auc
from tracin.workflows.evaluation.mislabel import checkpoint_subsets


def _true_class(path):
    return path.name.split("_")[1]  # files are named <index>_<true class>_<n>.png by make_image_folder


def test_uniform_noise_flips_the_stated_share(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=("a", "b", "c", "d"), n_train=10)
    records = inject_label_noise(src, tmp_path / "noisy", 0.25, seed=3)
    assert len(records) == 10
    split, classes = scan_split(tmp_path / "noisy", "train")
    assert len(split.paths) == 40 and len({p.name for p in split.paths}) == 40
    wrong = [p for p, label in zip(split.paths, split.labels) if _true_class(p) != classes[label]]
    assert sorted(str(p.relative_to(tmp_path / "noisy")) for p in wrong) == sorted(r["file"] for r in records)
    test, _ = scan_split(tmp_path / "noisy", "test", classes)
    assert all(_true_class(p) == classes[label] for p, label in zip(test.paths, test.labels))


def test_asymmetric_noise_follows_the_map(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=("a", "b", "c"), n_train=40)
    records = inject_label_noise(src, tmp_path / "noisy", 0.3, seed=0, kind="asymmetric", flip_map=parse_flip_map("a:b"))
    assert records and all(r["true_label"] == "a" and r["given_label"] == "b" for r in records)
    assert 4 <= len(records) <= 20  # about 30% of the 40 'a' images
    pair = inject_label_noise(src, tmp_path / "pair", 0.5, seed=0, kind="asymmetric")  # default: pair flips a->b->c->a
    assert {(r["true_label"], r["given_label"]) for r in pair} <= {("a", "b"), ("b", "c"), ("c", "a")}
    with pytest.raises(DataError, match="--flip names class 'z'"):
        inject_label_noise(src, tmp_path / "bad", 0.3, seed=0, kind="asymmetric", flip_map={"a": "z"})
    with pytest.raises(DataError, match="source:target"):
        parse_flip_map("a-b")


def test_detection_metrics():
    positive = np.array([True, True, False, False, False, False, False, False, False, False])
    perfect = np.arange(10, 0, -1).astype(float)
    assert roc_auc(perfect, positive) == 1.0 and roc_auc(-perfect, positive) == 0.0
    assert recall_at(perfect, positive, (0.1, 0.2, 0.3)) == {"10%": 0.5, "20%": 1.0, "30%": 1.0}
    curve = recall_curve(perfect, positive, points=11)
    assert curve[0] == 0 and curve[1] == 0.5 and curve[2] == 1.0 and curve[-1] == 1.0
    assert roc_auc(np.ones(10), positive) == 0.5  # ties count half


def test_checkpoint_subsets():
    s = checkpoint_subsets(6)
    assert s["all"] == [0, 1, 2, 3, 4, 5] and s["last"] == [5] and s["early half"] == [0, 1, 2]
    assert s["late half"] == [3, 4, 5] and s["every other"] == [1, 3, 5]
    assert checkpoint_subsets(1)["early half"] == [0]


TINY = ["--epochs", "2", "--save_every", "1", "--batch_size", "8", "--image_size", "12", "--device", "cpu", "--quiet"]


def test_evaluate_mislabel_end_to_end(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_train=12, n_test=3)
    out = tmp_path / "eval"
    assert main(["evaluate", "mislabel", "--data", str(data), "--noise_rate", "0.2", "--seeds", "0", "1",
                 "--cv_folds", "2", "--output_dir", str(out)] + TINY) == 0
    printed = capsys.readouterr().out
    assert "| tracin self-influence (last layer) |" in printed and "cleanlab" in printed
    r = json.loads((out / "mislabel_evaluation.json").read_text())
    assert set(r["summary"]) == {"tracin self-influence (last layer)", "tracin self-influence (all layers)",
                                 "tracin self-influence (output-layer bias)", "tracin self-influence (last layer, K-FAC)",
                                 "loss (final model)", "loss (summed over checkpoints)", "cleanlab (cross-validated)"}
    assert len(r["per_seed"]) == 14 and all(row["n_flipped"] == 7 for row in r["per_seed"])  # round(0.2 * 36)
    assert all(0 <= row["roc_auc"] <= 1 for row in r["per_seed"])
    assert set(r["checkpoint_study"]) >= {"all", "last", "first"}
    assert (out / "recall_vs_inspected.png").stat().st_size > 1000
    assert (out / "manifest.json").exists() is False  # not an influence results folder


@pytest.mark.parametrize("folds,message", [
    ("1", "--cv_folds must be at least 2, got 1."),
    ("5", "Class 'a' has 3 training images in"),
])
def test_too_few_images_for_the_folds_is_refused_before_training(tmp_path, capsys, folds, message):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=3, n_test=2)
    out = tmp_path / "eval"
    assert main(["evaluate", "mislabel", "--data", str(data), "--cv_folds", folds, "--output_dir", str(out)] + TINY) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "work" / "noisy_seed0").exists() and not (out / "mislabel_evaluation.json").exists()
    if folds == "5":
        assert "fewer than --cv_folds 5; lower --cv_folds, add images or pass --no_cleanlab." in err
        assert main(["evaluate", "mislabel", "--data", str(data), "--no_cleanlab", "--output_dir", str(out)] + TINY) == 0


def test_mislabel_evaluation_without_flipped_labels_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=3, n_test=2)
    out = tmp_path / "eval"
    assert main(["evaluate", "mislabel", "--data", str(data), "--noise_rate", "0", "--no_cleanlab", "--output_dir", str(out)] + TINY) == 2
    err = capsys.readouterr().err
    assert "Uniform noise at rate 0.0 flipped no label of the 6 training images (seed 0), so there is nothing to detect; " \
           "raise --noise_rate." in err
    assert not (out / "work" / "noisy_seed0" / "checkpoints").exists() and not (out / "mislabel_evaluation.json").exists()


def test_evaluate_cleaning_end_to_end(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=12, n_test=3)
    out = tmp_path / "clean"
    assert main(["evaluate", "cleaning", "--data", str(data), "--noise_rate", "0.25", "--fraction", "0.25",
                 "--output_dir", str(out)] + TINY) == 0
    r = json.loads((out / "cleaning_evaluation.json").read_text())
    rows = {row["method"]: row for row in r["per_seed"]}
    assert set(rows) == {"none (noisy labels)", "tracin self-influence", "loss (final model)", "random", "oracle (the flipped images)"}
    assert rows["oracle (the flipped images)"]["flipped_among_changed"] == 6 == rows["tracin self-influence"]["changed"]
    assert all(0 <= row["test_accuracy"] <= 1 for row in rows.values())
    assert main(["evaluate", "cleaning", "--data", str(tmp_path / "nowhere"), "--output_dir", str(out)] + TINY) == 2
    assert "neither 'digits', 'shapes' nor a folder" in capsys.readouterr().err


def test_cleaning_that_would_empty_a_class_is_refused(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=3, n_test=2)
    out = tmp_path / "clean"
    assert main(["evaluate", "cleaning", "--data", str(data), "--noise_rate", "0.2", "--fraction", "0.6",
                 "--output_dir", str(out)] + TINY) == 2
    err = capsys.readouterr().err
    assert "without training images; lower --fraction." in err and "Traceback" not in err
    assert not (out / "cleaning_evaluation.json").exists()


def test_output_bias_self_influence_is_the_error_at_the_logits(tmp_path):
    """The small CNN's last layer produces the logits, so its bias's per-example gradient is
    softmax - onehot: output-bias self-influence per checkpoint is lr_c |p_c - y|^2 (checked against
    the class probabilities of each checkpoint)."""
    import numpy as np
    import torch

    from tracin.device import resolve_device
    from tracin.workflows.evaluation.common import Training, per_checkpoint_scores
    from tracin.tasks.classification import checkpoint_probabilities
    from tracin.workflows.image.setup import image_setup

    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_train=8, n_test=2)
    training = Training(epochs=2, save_every=1, batch_size=8, image_size=12, device="cpu")
    training.fit(data, data / "checkpoints", seed=0)
    scores = per_checkpoint_scores(data, data / "checkpoints", training, also=[("output_bias", "none")])
    setup = image_setup(data, data / "checkpoints")
    onehot = torch.nn.functional.one_hot(torch.tensor(setup.train_split.labels), 3).double()
    probs = checkpoint_probabilities(setup.model, setup.checkpoints, setup.train, resolve_device("cpu"), 8)
    want = np.stack([ck.learning_rate * (p.double() - onehot).pow(2).sum(1).numpy() for ck, p in zip(setup.checkpoints, probs)])
    assert np.allclose(scores["self_influence:output_bias"], want, rtol=1e-4, atol=1e-7)


def test_evaluate_refuses_a_kfac_scope_with_batch_norm_before_training(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=6, n_test=2)
    out = tmp_path / "eval"
    code = main(["evaluate", "mislabel", "--data", str(data), "--noise_rate", "0.2", "--seeds", "0", "--no_cleanlab",
                 "--layers", "all", "--precondition", "kfac", "--output_dir", str(out)] + TINY)
    err = capsys.readouterr().err
    assert code == 2 and "precondition='kfac' covers Linear and Conv layers only" in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_with_kfac_as_the_main_ranking(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), n_train=10, n_test=2)
    out = tmp_path / "eval"
    assert main(["evaluate", "mislabel", "--data", str(data), "--noise_rate", "0.2", "--seeds", "0", "--no_cleanlab",
                 "--precondition", "kfac", "--output_dir", str(out)] + TINY) == 0
    r = json.loads((out / "mislabel_evaluation.json").read_text())
    assert "tracin self-influence (last layer, K-FAC)" in r["summary"] and r["training"]["precondition"] == "kfac"
    assert "tracin self-influence (last layer)" not in r["summary"]  # the main ranking is the K-FAC one, reported once

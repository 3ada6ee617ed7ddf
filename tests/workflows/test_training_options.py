"""Training options of the image workflow: augmentation and the learning-rate schedule, and the
step size each checkpoint then carries for TracIn."""
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_image_folder
from tracin import Checkpoint
from tracin.workflows.cli import main
from tracin.workflows.image.folders import image_transform, training_transform
from tracin.errors import TracInError
from tracin.workflows.image.train import epoch_learning_rates


def _image(size=12, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3)).astype(np.uint8))


def test_no_augmentation_is_the_plain_transform():
    img = _image()
    assert torch.equal(training_transform(12, "none")(img), image_transform(12)(img))


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
    img, plain = _image(), image_transform(12)(_image())
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = training_transform(12, "flip")(img)
        if torch.equal(out, plain):
            seen.add("plain")
        elif torch.equal(out, plain.flip(-1)):
            seen.add("mirror")
        else:
            raise AssertionError("a flip produced neither the image nor its mirror")
    assert seen == {"plain", "mirror"}


def test_crop_shifts_the_image_within_the_padding():
    img, plain = _image(16), image_transform(16)(_image(16))
    torch.manual_seed(0)
    outs = [training_transform(16, "crop")(img) for _ in range(30)]
    assert all(o.shape == plain.shape for o in outs)
    assert any(not torch.equal(o, plain) for o in outs)
    # every output is the plain image shifted by at most 2 pixels (16 // 8): find its shift
    for o in outs:
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                core_o = o[:, 2 + dy:14 + dy, 2 + dx:14 + dx]
                if torch.allclose(core_o, plain[:, 2:14, 2:14]):
                    found = True
        assert found


def test_cosine_schedule_and_constant():
    assert epoch_learning_rates(0.1, 3, "constant") == [0.1, 0.1, 0.1]
    rates = epoch_learning_rates(0.1, 4, "cosine")
    assert rates[0] == 0.1 and all(a > b > 0 for a, b in zip(rates, rates[1:]))
    assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    with pytest.raises(TracInError, match="--lr_schedule linear is not one of constant, cosine"):
        epoch_learning_rates(0.1, 3, "linear")
    with pytest.raises(TracInError, match="--augment rotate is not one of none, crop, flip, crop_flip"):
        training_transform(12, "rotate")


def test_checkpoints_carry_the_mean_rate_of_their_epochs(tmp_path):
    data = make_image_folder(tmp_path / "data")
    ckpt = tmp_path / "ckpts"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "5", "--save_every", "2",
                 "--checkpoint_dir", str(ckpt), "--learning_rate", "0.05", "--batch_size", "8", "--image_size", "12",
                 "--lr_schedule", "cosine", "--augment", "crop_flip", "--quiet"]) == 0
    rates = epoch_learning_rates(0.05, 5, "cosine")
    found = Checkpoint.discover(ckpt, pattern="checkpoint_epoch_*")
    assert [c.epoch for c in found] == [2, 4, 5]
    assert [c.learning_rate for c in found] == pytest.approx([np.mean(rates[0:2]), np.mean(rates[2:4]), rates[4]])
    assert found[0].metadata["augment"] == "crop_flip" and found[0].metadata["lr_schedule"] == "cosine"
    log = list(csv.DictReader(open(ckpt / "training_log.csv")))
    assert [float(r["learning_rate"]) for r in log] == pytest.approx(rates)


@pytest.mark.parametrize("argv,message", [
    (["--augment", "rotate"], "--augment rotate is not one of none, crop, flip, crop_flip; pick one of them."),
    (["--lr_schedule", "step"], "--lr_schedule step is not one of constant, cosine; pick one of them."),
])
def test_bad_training_options_exit_2_before_anything_is_written(tmp_path, capsys, argv, message):
    data = make_image_folder(tmp_path / "data")
    code = main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--checkpoint_dir", str(tmp_path / "c"),
                 "--quiet"] + argv)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    code = main(["evaluate", "mislabel", "--data", str(data), "--output_dir", str(tmp_path / "o"), "--quiet"] + argv)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_adamw_checkpoints_carry_the_optimizer_state(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=4, n_test=1)
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir", str(tmp_path / "ck"),
                 "--image_size", "12", "--optimizer", "adamw", "--learning_rate", "0.001", "--quiet"]) == 0
    ck = Checkpoint(tmp_path / "ck" / "checkpoint_epoch_1.pt")
    state = ck.metadata["optimizer_state_dict"]
    assert ck.metadata["optimizer"] == "adamw" and state["param_groups"][0]["lr"] == 0.001
    parameters = [k for k in ck.state_dict() if "running_" not in k and "num_batches" not in k]  # not the batch-norm buffers
    assert len(state["state"]) == len(parameters) and all("exp_avg_sq" in s for s in state["state"].values())


def test_a_validation_split_chooses_best_model_and_is_not_scored(tmp_path):
    from tracin.workflows.image.train import validation_split

    fit, val = validation_split([0] * 10 + [1] * 10 + [2] * 1, 0.2, seed=3)
    assert sorted(fit + val) == list(range(21)) and len(val) == 4 and 20 in fit  # 2 per class; a class's last image stays
    data = make_image_folder(tmp_path / "data", n_train=10, n_test=2)
    ck = tmp_path / "ck"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir", str(ck),
                 "--image_size", "12", "--val_fraction", "0.2", "--quiet"]) == 0
    held = Checkpoint(ck / "checkpoint_epoch_2.pt").metadata["validation_files"]
    log = list(csv.DictReader(open(ck / "training_log.csv")))
    assert len(held) == 6 and {"val_accuracy", "test_accuracy"} <= set(log[0])
    best = Checkpoint(ck / "best_model.pt")
    first_best = max(log, key=lambda r: (float(r["val_accuracy"]), -int(r["epoch"])))  # ties: the earliest epoch
    assert best.epoch == int(first_best["epoch"])
    out = tmp_path / "out"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ck), "--output_dir", str(out), "--top_k", "2",
                 "--self_influence", "--quiet"]) == 0
    scored = {r["train_file"] for r in csv.DictReader(open(out / "self_influence.csv"))}
    assert len(scored) == 30 - 6 and not scored & {str((data / f).resolve()) for f in held}
    with pytest.raises(Exception, match=r"--val_fraction must be in \[0, 1\)"):
        validation_split([0, 1], 1.0, 0)

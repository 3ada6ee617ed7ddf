"""Hostile and broken inputs through the command line: each ends in one clear line with exit code 2, or in a
correct run; no file outside the output folder changes; nothing half-written looks complete."""
import hashlib
import json
import os
import shutil
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_image_folder
from tracin import Checkpoint, save_checkpoint
from tracin.workflows.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = make_image_folder(root / "data", n_train=6, n_test=2)
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir",
                 str(root / "ck"), "--image_size", "12", "--batch_size", "6", "--quiet"]) == 0
    return root, data, root / "ck"


def snapshot(*folders: Path) -> dict:
    """{file: sha256} of everything under ``folders`` (links recorded as their targets' names)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            out[str(p)] = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def one_line_error(capsys, argv, match):
    """Run the CLI; assert exit code 2 and a single 'tracin: error:' line on stderr containing ``match``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("tracin: warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tracin: error:") and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def influence(data, ck, out, *extra):
    return ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ck), "--output_dir", str(out), "--top_k", "3",
            "--quiet", *extra]


def test_a_planted_progress_file_is_refused_unread(trained, tmp_path, capsys):
    root, data, ck = trained
    out = tmp_path / "out"
    (out / ".progress").mkdir(parents=True)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"payload": Payload()}, out / ".progress" / "state.safetensors")
    one_line_error(capsys, influence(data, ck, out), "was not written by this version of tracin or was changed")
    assert not marker.exists()


def test_spreadsheet_formulas_in_class_names_are_neutralised(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("=SUM(A1)", "+cmd", "-x", "@y"), n_train=4, n_test=1)
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir", str(ck),
                 "--image_size", "12", "--quiet"]) == 0
    assert main(influence(data, ck, out, "--self_influence")) == 0
    assert main(["report", "--results_dir", str(out)]) == 0
    for table in out.glob("*.csv"):
        text = table.read_text()
        for cell in (c for line in text.splitlines()[1:] for c in line.split(",")):
            assert not cell or cell[0] not in "=+@" and not (cell[0] == "-" and not cell[1:2].isdigit()), (table.name, cell)
    from tracin.io import read_csv

    assert {r["label"] for r in read_csv(out / "predictions_train.csv")} == {"=SUM(A1)", "+cmd", "-x", "@y"}


def test_links_planted_in_the_output_folder_are_never_followed(trained, tmp_path):
    root, data, ck = trained
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("top_k_influences.csv", "manifest.json", "analysis_dashboard.png", "report.html"):
        (out / name).symlink_to(outside / "precious.txt")
    (out / "top_influences").symlink_to(outside)
    (out / ".staging").symlink_to(outside)
    before = snapshot(outside, data, ck)
    assert main(influence(data, ck, out, "--self_influence")) == 0
    assert main(["report", "--results_dir", str(out)]) == 0
    assert snapshot(outside, data, ck) == before
    assert (out / "top_influences").is_dir() and not (out / "top_influences").is_symlink()


def test_an_output_folder_inside_the_data_folder_is_refused(trained, capsys):
    root, data, ck = trained
    one_line_error(capsys, influence(data, ck, data / "results"), "is inside --data_dir")
    assert not (data / "results").exists()


def test_the_report_names_no_absolute_path_and_works_from_another_folder(trained, tmp_path, monkeypatch):
    root, data, ck = trained
    monkeypatch.chdir(root)
    assert main(influence(Path("data"), Path("ck"), Path("rel_out"), "--self_influence")) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--results_dir", str(root / "rel_out")]) == 0
    page = (root / "rel_out" / "report.html").read_text()
    assert str(root) not in page and str(tmp_path) not in page
    assert any((root / "rel_out" / "top_influences").rglob("*.png"))


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A 1x1 PNG whose header claims side x side pixels (a decompression bomb to PIL)."""
    Image.new("RGB", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = side.to_bytes(4, "big") * 2
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(raw))


def test_a_decompression_bomb_and_a_named_pipe_are_skipped(trained, tmp_path, capsys):
    root, data, ck = trained
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    _bomb_png(copy / "train" / "cat" / "bomb.png")
    os.mkfifo(copy / "train" / "dog" / "pipe.png")
    from tracin.workflows.image.folders import scan_split

    done = {}
    scan = threading.Thread(target=lambda: done.update(split=scan_split(copy, "train")[0]), daemon=True)
    scan.start()
    scan.join(60)
    assert "split" in done, "scanning a folder with a named pipe hung"
    reasons = dict(done["split"].skipped)
    assert "DecompressionBombError" in reasons[str(copy / "train" / "cat" / "bomb.png")]
    assert reasons[str(copy / "train" / "dog" / "pipe.png")] == "not a regular file"
    assert main(influence(copy, ck, tmp_path / "out")) == 0
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["data"]["skipped_files"]) == 2


def test_mathtext_and_colliding_class_names_make_a_report(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("$x^", "a b", "a_b", "$\\foo$"), n_train=4, n_test=1)
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir", str(ck),
                 "--image_size", "12", "--quiet"]) == 0
    assert main(influence(data, ck, out)) == 0
    assert main(["report", "--results_dir", str(out)]) == 0
    folders = sorted(p.name for p in (out / "top_influences").iterdir())
    assert len(folders) == 4 and len(list(out.glob("*_summary.png"))) == 4, folders


@pytest.mark.parametrize("meta, match", [
    ({"learning_rate": "abc"}, "stored learning_rate is 'abc', not a number"),
    ({"learning_rate": 10 ** 400}, "not a number"),
    ({"learning_rate": float("nan")}, "invalid learning rate nan"),
    ({"learning_rate": float("inf")}, "invalid learning rate inf"),
    ({"learning_rate": 1e308}, "invalid learning rate 1e+308"),  # finite, but overflows float32 scores
    ({"image_size": "big"}, "image_size"),
])
def test_checkpoint_metadata_of_the_wrong_type(trained, tmp_path, capsys, meta, match):
    root, data, ck = trained
    bad = tmp_path / "ck"
    shutil.copytree(ck, bad)
    original = Checkpoint(bad / "checkpoint_epoch_2.pt")
    fields = {**{k: v for k, v in original.metadata.items()}, "learning_rate": original.learning_rate, **meta}
    torch.save({"model_state_dict": original.state_dict(), **fields}, bad / "checkpoint_epoch_2.pt")
    one_line_error(capsys, influence(data, bad, tmp_path / "out"), match)


def test_weights_that_are_not_finite_and_rates_that_are_all_zero(trained, tmp_path, capsys):
    root, data, ck = trained
    nan = tmp_path / "nan"
    shutil.copytree(ck, nan)
    original = Checkpoint(nan / "checkpoint_epoch_1.pt")
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    meta = {k: v for k, v in original.metadata.items() if k != "learning_rate"}
    save_checkpoint(nan / "checkpoint_epoch_1.pt", weights, original.learning_rate, **meta)
    one_line_error(capsys, influence(data, nan, tmp_path / "o1"), "has NaN or infinite weights")
    zero = tmp_path / "zero"
    zero.mkdir()
    for name in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt"):
        c = Checkpoint(ck / name)
        save_checkpoint(zero / name, c.state_dict(), 0.0, **{k: v for k, v in c.metadata.items() if k != "learning_rate"})
    one_line_error(capsys, influence(data, zero, tmp_path / "o2"), "Every checkpoint's learning rate is 0")


def test_two_training_runs_in_one_folder_are_not_summed(trained, tmp_path, capsys):
    root, data, ck = trained
    mixed = tmp_path / "mixed"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "4", "--checkpoint_dir", str(mixed),
                 "--image_size", "12", "--quiet"]) == 0
    for name in ("checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt"):
        shutil.copy(ck / name, mixed / name)  # epochs 1-2 of one run beside epochs 3-4 of another
    one_line_error(capsys, influence(data, mixed, tmp_path / "out"), "mixes checkpoints of 2 training runs")


def test_a_garbage_best_model_is_refused_before_scoring(trained, tmp_path, capsys):
    root, data, ck = trained
    bad = tmp_path / "ck"
    shutil.copytree(ck, bad)
    (bad / "best_model.pt").write_bytes(b"\x80\x04garbage, not a checkpoint")
    line = one_line_error(capsys, influence(data, bad, tmp_path / "out"), "best_model.pt is corrupt or not a PyTorch checkpoint")
    assert "pickled" not in line and not (tmp_path / "out" / ".progress").exists()


@pytest.mark.parametrize("extra, match", [
    (["--summed_loss"], "--summed_loss ranks training images beside their self-influence"),
    (["--projection_dim", "64"], "--projection_dim only applies with --use_projection"),
    (["--stratify_by", "label"], "--stratify_by only applies with --sample_rate"),
    (["--memory_budget", "inf"], "--memory-budget: must be a positive number of GiB"),
])
def test_flags_that_do_nothing_alone_are_refused(trained, tmp_path, capsys, extra, match):
    root, data, ck = trained
    one_line_error(capsys, influence(data, ck, tmp_path / "out", *extra), match)


def test_an_output_folder_that_is_a_file(trained, tmp_path, capsys):
    root, data, ck = trained
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, influence(data, ck, tmp_path / "file"), "is a file; give a folder")


def test_a_second_run_into_a_busy_folder_is_refused(trained, tmp_path, capsys):
    from tracin.workflows.results_dir import ResultsDir

    root, data, ck = trained
    with ResultsDir(tmp_path / "out"):  # another run holds the folder
        one_line_error(capsys, influence(data, ck, tmp_path / "out"), "Another tracin run is writing into")
    assert main(influence(data, ck, tmp_path / "out")) == 0


@pytest.mark.parametrize("damage, match", [
    ("column", "damaged or were changed"),
    ("type", "damaged or were changed"),
    ("index", "damaged or were changed"),
    ("nan", "top-k scores hold NaN or infinite values"),
])
def test_a_changed_results_folder_given_to_report(trained, tmp_path, capsys, damage, match):
    root, data, ck = trained
    out = tmp_path / "out"
    assert main(influence(data, ck, out)) == 0
    preds = out / "predictions_test.csv"
    if damage == "column":
        preds.write_text("\n".join(",".join(line.split(",")[:4]) for line in preds.read_text().splitlines()))
    elif damage == "type":
        np.save(out / "test_indices.npy", np.array(["a", "b"]))
    elif damage == "nan":
        values = np.load(out / "top_k_influences_values.npy")
        np.save(out / "top_k_influences_values.npy", np.full_like(values, np.nan))
    else:
        np.save(out / "top_k_influences_indices.npy", np.full((2, 3), 999))
    one_line_error(capsys, ["report", "--results_dir", str(out)], match)


def test_a_failed_write_keeps_the_old_results_and_the_progress(trained, tmp_path, capsys, monkeypatch):
    import tracin.workflows.results_dir as R

    root, data, ck = trained
    out = tmp_path / "out"
    assert main(influence(data, ck, out)) == 0
    before = snapshot(out)
    real = R.write_csv

    def full_disk(path, *args, **kwargs):
        if Path(path).name.startswith("predictions_"):
            raise R.unwritable(Path(path), OSError(28, "No space left on device"))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(R, "write_csv", full_disk)
    one_line_error(capsys, influence(data, ck, out, "--top_k", "2"), "No space left on device")
    assert snapshot(out).items() >= {k: v for k, v in before.items() if ".staging" not in k}.items()
    assert json.loads((out / "manifest.json").read_text())["parameters"]["top_k"] == 3  # the old, complete results
    assert (out / ".progress").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(R, "write_csv", real)
    assert main(influence(data, ck, out, "--top_k", "2")) == 0  # resumes with nothing left to score
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["top_k"] == 2 and manifest["engine"]["tiles"] == 0
    assert not (out / ".progress").exists() and not (out / ".staging").exists()


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    from tracin.workflows.image.folders import image_transform

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
        x = image_transform(16, ((0, 0, 0), (1, 1, 1)))(img)
    assert 0.4 < float(x.mean()) < 0.6 and float((x > 0.99).float().mean()) < 0.1


def test_written_files_follow_the_umask(tmp_path):
    """Results are readable by group and others under the usual umask 022 (a temporary file's 0600 is not kept)."""
    import os
    import stat

    from tracin.io import write_bytes

    previous = os.umask(0o022)
    try:
        shared = write_bytes(tmp_path / "shared.json", b"{}")
        os.umask(0o077)
        private = write_bytes(tmp_path / "private.json", b"{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644 and stat.S_IMODE(private.stat().st_mode) == 0o600


def own(data, ck, out, *extra):
    """An own-model influence run on the trained run's last weights."""
    return ["influence", "--data_dir", str(data), "--arch", "smallcnn", "--model_path", str(ck / "checkpoint_epoch_2.pt"),
            "--output_dir", str(out), "--top_k", "3", "--image_size", "12", "--quiet", *extra]


@pytest.mark.parametrize("extra, match", [
    (["--image_size", "0"], "--image_size must be between 1 and 8192 pixels"),
    (["--num_classes", "0"], "--num_classes must be at least 1"),
    (["--std", "inf"], "is not one or three comma-separated finite numbers"),
    (["--mean", "0.5,0.5"], "is not one or three comma-separated finite numbers"),
    (["--exclude", "nothing_like_this"], "exclude pattern 'nothing_like_this' matches nothing in the layers in scope"),
    (["--damping", "1e-12", "--layers", "all"], "scores are NaN or infinite"),
])
def test_own_model_flags_out_of_range(trained, tmp_path, capsys, extra, match):
    root, data, ck = trained
    one_line_error(capsys, own(data, ck, tmp_path / "out", *extra), match)


@pytest.mark.parametrize("arch, match", [
    (":build", "names no module or no callable"),
    ("os:", "names no module or no callable"),
    ("os:sep", "sep is a str, not a callable"),
    ("no_such_module_here:build", "cannot import build from no_such_module_here"),
    ("json:loads", "building the model failed (TypeError"),
])
def test_an_arch_that_builds_no_model(trained, tmp_path, capsys, arch, match):
    root, data, ck = trained
    argv = own(data, ck, tmp_path / "out")
    argv[argv.index("smallcnn")] = arch
    one_line_error(capsys, argv, match)


def test_a_users_module_never_shadows_an_installed_package(trained, tmp_path, capsys, monkeypatch):
    """--arch module:callable searches the working folder after the installed packages, for that import only."""
    import json as real_json
    import sys

    root, data, ck = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "json.py").write_text("raise SystemExit('planted module ran')\n")
    (tmp_path / "mynet.py").write_text("from tracin.workflows.image.models import build_model\n"
                                       "def build(num_classes):\n    return build_model('smallcnn', num_classes, 12)\n")
    argv = own(data, ck, tmp_path / "out")
    argv[argv.index("smallcnn")] = "mynet:build"
    assert main(argv) == 0
    assert sys.modules["json"] is real_json and str(tmp_path) not in sys.path


def test_a_copy_of_a_checkpoint_is_counted_once(trained, tmp_path):
    root, data, ck = trained
    folder = tmp_path / "ck"
    shutil.copytree(ck, folder)
    with pytest.warns(UserWarning, match="holds the same weights as"):
        found = Checkpoint.discover(folder)
    assert len(found) == 2  # best_model.pt is the last epoch's weights


@pytest.mark.parametrize("state, match", [
    (b"\xff\xfe not utf-8 \x80", "is not a Trainer state"),
    (b'{"log_history": 5}', "log_history is a int, not a list"),
    (b'{"log_history": [{"learning_rate": 0.1, "step": "ten"}]}', None),
    (b'{"log_history": [{"learning_rate": "fast", "step": 1}]}', None),
])
def test_a_damaged_trainer_state(tmp_path, state, match):
    from tracin.errors import CheckpointError

    from helpers import MLP

    folder = tmp_path / "run" / "checkpoint-10"
    folder.mkdir(parents=True)
    save_checkpoint(folder / "model.safetensors", MLP().state_dict(), 0.1)
    (folder / "trainer_state.json").write_bytes(state)
    if match is None:  # unusable entries are skipped: the weights file's own learning rate serves
        assert Checkpoint.discover(tmp_path / "run")[0].learning_rate == 0.1
    else:
        with pytest.raises(CheckpointError, match=match):
            Checkpoint.discover(tmp_path / "run")


def test_two_trainings_into_one_checkpoint_folder_and_a_validation_share_that_holds_nothing(trained, tmp_path, capsys):
    from tracin.workflows.results_dir import LOCK, folder_lock

    root, data, ck = trained
    busy = tmp_path / "busy"
    busy.mkdir()
    held = folder_lock(busy / LOCK)  # another run training into the folder
    try:
        one_line_error(capsys, ["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir",
                                str(busy), "--image_size", "12", "--quiet"], "Another tracin run is writing into")
    finally:
        held.close()
    assert not list(busy.glob("*.pt"))
    one_line_error(capsys, ["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir",
                            str(tmp_path / "val"), "--image_size", "12", "--quiet", "--val_fraction", "0.01"],
                   "--val_fraction 0.01 holds out no image")


def test_messages_that_say_what_the_file_is(trained, tmp_path, capsys):
    root, data, ck = trained
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(ck / "checkpoint_epoch_1.pt", folder / "a.pth")
    one_line_error(capsys, influence(data, folder, tmp_path / "o1"), "none written by 'tracin train'; for a model you "
                                                                     "trained yourself add --arch")
    argv = own(data, ck, tmp_path / "o2")
    argv[argv.index("--model_path") + 1] = str(folder)
    one_line_error(capsys, argv, "is a folder, not a weights file")
    text = tmp_path / "weights.txt"
    text.write_text("hello\n")
    argv[argv.index("--model_path") + 1] = str(text)
    line = one_line_error(capsys, argv, "is corrupt or not a PyTorch checkpoint")
    assert "pickled" not in line and "weights_only" not in line


def test_a_trainer_checkpoint_folder_as_the_model_path(trained, tmp_path):
    import json

    root, data, ck = trained
    folder = tmp_path / "run" / "checkpoint-5"
    folder.mkdir(parents=True)
    save_checkpoint(folder / "model.safetensors", Checkpoint(ck / "checkpoint_epoch_2.pt").state_dict(), 0.05)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": [{"learning_rate": 0.07, "step": 5}]}))
    argv = own(data, ck, tmp_path / "out")
    argv[argv.index("--model_path") + 1] = str(folder)
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [c["learning_rate"] for c in manifest["checkpoints"]] == [0.07]


def test_audit_takes_a_model_trained_elsewhere(trained, tmp_path, capsys):
    import json

    root, data, ck = trained
    assert main(["audit", "--data_dir", str(data), "--arch", "smallcnn", "--model_path", str(ck / "checkpoint_epoch_2.pt"),
                 "--image_size", "12", "--n_test", "2", "--projection_dims", "16", "--sample_rates", "--quiet",
                 "--output", str(tmp_path / "audit.json")]) == 0
    rows = json.loads((tmp_path / "audit.json").read_text())
    assert [r["config"] for r in rows] == ["exact", "projection 16"]


def test_a_whole_pickled_model_needs_no_arch(trained, tmp_path, capsys):
    from tracin.workflows.image.models import build_model

    root, data, ck = trained
    model = build_model("smallcnn", 3, 12)
    model.load_state_dict(Checkpoint(ck / "checkpoint_epoch_2.pt").state_dict())
    torch.save(model, tmp_path / "whole.pt")
    argv = ["influence", "--data_dir", str(data), "--model_path", str(tmp_path / "whole.pt"), "--output_dir",
            str(tmp_path / "out"), "--top_k", "3", "--image_size", "12", "--learning_rate", "0.1", "--quiet"]
    one_line_error(capsys, argv, "add --arch (its architecture), or --trust_checkpoint when --model_path holds the whole")
    with pytest.warns(UserWarning, match="full pickle"):
        assert main(argv + ["--trust_checkpoint"]) == 0
    assert (tmp_path / "out" / "manifest.json").is_file()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    argv[argv.index(str(tmp_path / "whole.pt"))] = str(tmp_path / "weights.pt")
    one_line_error(capsys, argv + ["--trust_checkpoint"], "holds weights, not a whole model")

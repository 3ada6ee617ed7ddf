"""End-to-end: train -> influence -> report through the CLI on tiny image folders, checking contents."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import close, make_image_folder, train_image_run
from tracin import Checkpoint, TracIn
from tracin.workflows.cli import main
from tracin.workflows.image.folders import ImageDataset, image_transform, scan_split
from tracin.workflows.image.models import build_model, normalization


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_image_run(tmp_path_factory.mktemp("e2e"))


def test_train_writes_checkpoints_with_metadata(trained):
    _, _, ckpt = trained
    found = Checkpoint.discover(ckpt, pattern="checkpoint_epoch_*")
    assert [c.epoch for c in found] == [1, 2, 3]
    meta = found[0].metadata
    assert meta["class_names"] == ["cat", "dog", "fox"] and meta["arch"] == "smallcnn" and meta["image_size"] == 16
    assert found[0].learning_rate == 0.05
    log = list(csv.DictReader(open(ckpt / "training_log.csv")))
    assert [int(r["epoch"]) for r in log] == [1, 2, 3] and all(0 <= float(r["test_accuracy"]) <= 1 for r in log)
    assert (ckpt / "best_model.pt").is_file() and (ckpt / "training_curve.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def scored(trained):
    """Influence of the trained run, all layers with self-influence, in root/out (dashed flags are accepted too)."""
    root, data, ckpt = trained
    out = root / "out"
    assert main(["influence", "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--output-dir", str(out),
                 "--top-k", "5", "--layers", "all", "--self-influence", "--batch-size", "7", "--quiet"]) == 0
    return out


def test_influence_and_report(trained, scored):
    root, data, ckpt = trained
    out = scored
    pro_v, pro_i = np.load(out / "top_k_influences_values.npy"), np.load(out / "top_k_influences_indices.npy")
    opp_v, opp_i = np.load(out / "top_k_opponents_values.npy"), np.load(out / "top_k_opponents_indices.npy")
    assert pro_v.shape == pro_i.shape == opp_v.shape == opp_i.shape == (9, 5)

    # The files hold the exact TracIn top-k, recomputed here through the API.
    classes = ["cat", "dog", "fox"]
    tf = image_transform(16, normalization("smallcnn"))
    train = ImageDataset(scan_split(data, "train", classes)[0], tf)
    test = ImageDataset(scan_split(data, "test", classes)[0], tf)
    M = TracIn(build_model("smallcnn", 3), Checkpoint.discover(ckpt, "checkpoint_epoch_*"), device="cpu",
               progress=False).influence_matrix(train, test)
    order = M.argsort(dim=1, descending=True)
    assert np.array_equal(pro_i, order[:, :5].numpy())
    assert np.allclose(pro_v, M.gather(1, order[:, :5]).numpy(), rtol=1e-4, atol=1e-6)
    assert np.array_equal(opp_i, M.argsort(dim=1)[:, :5].numpy())

    rows = list(csv.DictReader(open(out / "top_k_influences.csv")))
    assert len(rows) == 9 * 5 * 2
    first = rows[0]
    assert first["kind"] == "proponent" and first["rank"] == "1"
    assert int(first["train_index"]) == pro_i[0, 0] and abs(float(first["score"]) - pro_v[0, 0]) < 1e-4 * abs(pro_v[0, 0]) + 1e-6
    assert Path(first["train_file"]).parent.name == first["train_label"]
    selfs = list(csv.DictReader(open(out / "self_influence.csv")))
    assert len(selfs) == 24 and [int(r["rank"]) for r in selfs] == list(range(1, 25))
    scores = [float(r["score"]) for r in selfs]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["parameters"]["top_k"] == 5
    assert [c["learning_rate"] for c in manifest["checkpoints"]] == [0.05] * 3
    assert all(len(c["sha256"]) == 64 for c in manifest["checkpoints"])
    assert manifest["versions"]["torch"] == torch.__version__

    assert main(["report", "--results_dir", str(out), "--gradcam", "2"]) == 0
    cams = sorted((out / "gradcam").glob("test_*.png"))
    assert len(cams) == 2 and all(c.stat().st_size > 1000 for c in cams)
    for name in ("analysis_dashboard.png", "cat_summary.png", "fox_summary.png", "false_predictions.csv",
                 "misprediction_cross_analysis.csv", "mislabel_candidates.csv", "report.html", "report_summary.json"):
        assert (out / name).is_file(), name
    helpful = sorted((out / "top_influences" / "dog" / "helpful").iterdir())
    harmful = sorted((out / "top_influences" / "dog" / "harmful").iterdir())
    assert 1 <= len(helpful) <= 10 and 1 <= len(harmful) <= 10
    summary = json.loads((out / "report_summary.json").read_text())
    assert 0 <= summary["health_score"] <= 100 and summary["band"] in ("EXCELLENT", "GOOD", "FAIR", "NEEDS ATTENTION")
    mislabels = list(csv.DictReader(open(out / "mislabel_candidates.csv")))
    assert [r["file"] for r in mislabels] == [r["train_file"] for r in selfs]
    page = (out / "report.html").read_text()
    assert page.count("<div class='pair'>") == 9 and "Health score" in page
    assert {"report.html", "top_influences", "gradcam", "analysis_dashboard.png"} <= set(summary["outputs"])


def test_a_rerun_of_influence_removes_the_old_report(trained, tmp_path):
    """The report describes the results it was made from: new results take the old report's files away."""
    root, data, ckpt = trained
    out = tmp_path / "rerun"
    args = ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "3",
            "--quiet", "--test_subset", "3"]
    assert main(args) == 0 and main(["report", "--results_dir", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")  # a file the user put there is none of the report's
    assert (out / "report.html").is_file() and (out / "top_influences").is_dir()
    assert main(args) == 0
    left = {p.name for p in out.iterdir()}
    assert not left & {"report.html", "report_summary.json", "top_influences", "analysis_dashboard.png", "negative"}
    assert "notes.txt" in left and "manifest.json" in left


def test_subsets_map_indices_to_the_full_training_set(trained):
    root, data, ckpt = trained
    out = root / "subset"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
                 "--top_k", "3", "--train_subset", "10", "--test_subset", "4", "--full_matrix", "--quiet"]) == 0
    used = np.load(out / "train_indices.npy")
    matrix = np.load(out / "influence_matrix.npy")
    assert matrix.shape == (4, 10)  # columns follow train_indices.npy
    pro = np.load(out / "top_k_influences_values.npy")
    assert np.allclose(np.sort(matrix, axis=1)[:, ::-1][:, :3], pro, rtol=1e-4, atol=1e-6)
    assert len(used) == 10 and np.all(np.isin(np.load(out / "top_k_influences_indices.npy"), used))
    assert np.load(out / "top_k_influences_values.npy").shape == (4, 3)



def test_subset_as_large_as_the_split_warns_and_scores_all(trained):
    root, data, ckpt = trained
    out = root / "subset_all"
    n_test = sum(1 for p in (data / "test").rglob("*") if p.is_file())
    with pytest.warns(UserWarning, match=f"--test_subset 100000 is not smaller than the {n_test} test images; scoring all of them."):
        assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out),
                     "--top_k", "2", "--test_subset", "100000", "--quiet"]) == 0
    assert np.load(out / "top_k_influences_values.npy").shape == (n_test, 2)

def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_bad_input_messages(trained, tmp_path, capsys):
    root, data, ckpt = trained
    # missing folders
    code, err = _err(capsys, ["influence", "--data_dir", str(tmp_path / "nope"), "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in err and "Traceback" not in err and err.count("\n") == 1
    code, err = _err(capsys, ["influence", "--data_dir", str(data), "--checkpoint_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "Checkpoint directory" in err
    # top_k larger than the training set
    code, err = _err(capsys, ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "o"), "--top_k", "500", "--quiet"])
    assert code == 2 and "--top_k 500 is larger than the training set (24 images)" in err
    assert not (tmp_path / "o" / "manifest.json").exists()
    # worker count and memory budget out of range
    base = ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "o"), "--quiet",
            "--top_k", "3"]
    code, err = _err(capsys, base + ["--num_workers", "-1"])
    assert code == 2 and "num_workers must be 0 (load in this process) or more, got -1." in err and "Traceback" not in err
    for budget in ("0", "-1"):
        code, err = _err(capsys, base + ["--memory_budget", budget])
        assert code == 2 and f"--memory-budget: must be a positive number of GiB, got '{budget}'" in err
    # report counts out of range
    for flag in (["--top_n", "0"], ["--html_tests", "-1"], ["--gradcam", "-1"]):
        code, err = _err(capsys, ["report", "--results_dir", str(tmp_path)] + flag)
        assert code == 2 and "--top_n must be at least 1 and --html_tests and --gradcam 0 or more" in err
    # report on a directory with no results
    code, err = _err(capsys, ["report", "--results_dir", str(tmp_path)])
    assert code == 2 and "no manifest.json" in err


def test_empty_class_and_corrupt_image(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d")
    for f in (data / "train" / "fox").iterdir():
        f.unlink()
    code, err = _err(capsys, ["train", "--data_dir", str(data), "--arch", "smallcnn", "--checkpoint_dir", str(tmp_path / "c"), "--quiet"])
    assert code == 2 and "train/fox has no images" in err

    data = make_image_folder(tmp_path / "d2")
    (data / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    ckpt = tmp_path / "c2"
    with pytest.warns(UserWarning, match="Skipping unreadable image .*broken.png"):
        assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir", str(ckpt),
                     "--image_size", "16", "--quiet"]) == 0
    out = tmp_path / "o2"
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "2", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [Path(s["file"]).name for s in manifest["data"]["skipped_files"]] == ["broken.png"]
    assert manifest["data"]["n_train"] == 24


def test_checkpoint_from_another_architecture(trained, tmp_path, capsys):
    root, data, ckpt = trained
    other = tmp_path / "mixed"
    shutil.copytree(ckpt, other)
    model = build_model("resnet18", 3)
    from tracin import save_checkpoint

    run_id = Checkpoint(ckpt / "checkpoint_epoch_1.pt").metadata["run_id"]  # the same run, another architecture
    save_checkpoint(other / "checkpoint_epoch_9.pt", model.state_dict(), learning_rate=0.1, epoch=9,
                    class_names=["cat", "dog", "fox"], arch="resnet18", image_size=16, run_id=run_id)
    code, err = _err(capsys, ["influence", "--data_dir", str(data), "--checkpoint_dir", str(other), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "keep one training run per --checkpoint_dir" in err
    # a checkpoint whose weights do not match its stated architecture
    (other / "checkpoint_epoch_9.pt").unlink()
    save_checkpoint(other / "checkpoint_epoch_9.pt", model.state_dict(), learning_rate=0.1, epoch=9,
                    class_names=["cat", "dog", "fox"], arch="smallcnn", image_size=16, run_id=run_id)
    code, err = _err(capsys, ["influence", "--data_dir", str(data), "--checkpoint_dir", str(other), "--output_dir", str(tmp_path / "o"),
                              "--top_k", "3", "--quiet"])
    assert code == 2 and "checkpoint_epoch_9.pt does not match the model: missing keys" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_module_entry_point_and_usage_error():
    proc = subprocess.run([sys.executable, "-m", "tracin", "influence"], capture_output=True, text=True)
    assert proc.returncode == 2 and "required" in proc.stderr


def test_gradcam_without_the_package_is_a_clear_error(scored, monkeypatch, capsys):
    import builtins

    out = scored
    real_import = builtins.__import__

    def no_gradcam(name, *args, **kwargs):
        if name.startswith("pytorch_grad_cam"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradcam)
    code, err = _err(capsys, ["report", "--results_dir", str(out), "--gradcam", "1"])
    assert code == 2 and "pip install -e '.[gradcam]'" in err


def test_summed_loss_beside_self_influence(trained):
    """--summed_loss: each training image's cross-entropy summed over the checkpoints, in
    self_influence.csv, summed_loss.npy and the report's mislabel_candidates.csv."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    root, data, ckpt = trained
    out = root / "with_loss"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "3",
                 "--self_influence", "--summed_loss", "--quiet"]) == 0
    classes = ["cat", "dog", "fox"]
    split = scan_split(data, "train", classes)[0]
    train = ImageDataset(split, image_transform(16, normalization("smallcnn")))
    model = build_model("smallcnn", 3).eval()
    want = 0
    for ck in Checkpoint.discover(ckpt, "checkpoint_epoch_*"):
        model.load_state_dict(ck.state_dict())
        with torch.no_grad():
            want = want + torch.cat([F.cross_entropy(model(x), y, reduction="none") for x, y in DataLoader(train, batch_size=7)])
    got = np.load(out / "summed_loss.npy")
    assert close(got, want.double().numpy())
    rows = {int(r["train_index"]): r for r in csv.DictReader(open(out / "self_influence.csv"))}
    assert all(abs(float(rows[i]["summed_loss"]) - got[i]) <= 1e-6 * abs(got[i]) + 1e-9 for i in rows)
    assert sorted(int(r["summed_loss_rank"]) for r in rows.values()) == list(range(1, len(rows) + 1))
    assert main(["report", "--results_dir", str(out)]) == 0
    candidates = list(csv.DictReader(open(out / "mislabel_candidates.csv")))
    assert "summed_loss_rank" in candidates[0]


def test_summed_loss_rank_counts_only_the_sampled_images(trained):
    root, data, ckpt = trained
    out = root / "sampled_loss"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "3",
                 "--self_influence", "--summed_loss", "--sample_rate", "0.5", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "self_influence.csv")))
    assert len(rows) == 12  # half of the 24 training images
    assert sorted(int(r["summed_loss_rank"]) for r in rows) == list(range(1, 13))
    by_loss = sorted(rows, key=lambda r: -float(r["summed_loss"]))
    assert [int(r["summed_loss_rank"]) for r in by_loss] == list(range(1, 13))


def test_kfac_preconditioned_influence(trained, tmp_path, capsys):
    """--precondition kfac: self-influence equals the API's, the manifest records the preconditioner,
    and scopes it does not cover or a bad damping are refused before anything is written."""
    root, data, ckpt = trained
    out = root / "kfac"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "3",
                 "--self_influence", "--self_influence_layers", "same", "--precondition", "kfac", "--damping", "0.2", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precondition"] == {"precondition": "kfac", "damping": 0.2, "fisher": "empirical", "fit_examples": 24,
                                       "left_out": [], "rank": None}
    split = scan_split(data, "train", ["cat", "dog", "fox"])[0]
    train = ImageDataset(split, image_transform(16, normalization("smallcnn")))
    want = TracIn(build_model("smallcnn", 3), Checkpoint.discover(ckpt, "checkpoint_epoch_*"), layers="last", device="cpu",
                  progress=False, precondition="kfac", damping=0.2).self_influence(train)
    assert close(np.load(out / "self_influence.npy"), want.numpy())
    detector = root / "detector"  # the default mislabel ranking: K-FAC over the output layer's bias
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(detector), "--top_k", "3",
                 "--self_influence", "--damping", "0.2", "--quiet"]) == 0
    want = TracIn(build_model("smallcnn", 3), Checkpoint.discover(ckpt, "checkpoint_epoch_*"), layers="output_bias", device="cpu",
                  progress=False, precondition="kfac", damping=0.2).self_influence(train)
    assert close(np.load(detector / "self_influence.npy"), want.numpy())
    assert not np.allclose(np.load(detector / "self_influence.npy"), np.load(out / "self_influence.npy"), rtol=0.1)
    base = ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "o"), "--quiet",
            "--top_k", "3", "--precondition", "kfac"]
    code, err = _err(capsys, base + ["--layers", "all"])
    assert code == 2 and "precondition='kfac' covers Linear and Conv layers only, but features.1 (BatchNorm2d)" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, err = _err(capsys, base + ["--damping", "0"])
    assert code == 2 and "damping must be a positive number" in err
    assert not (tmp_path / "o").exists()


def test_version_and_defaults_in_help(capsys):
    from tracin import __version__

    with pytest.raises(SystemExit, match="0"):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"tracin {__version__}"
    with pytest.raises(SystemExit, match="0"):
        main(["influence", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: last)" in text and "{fp32,tf32,bf16,fp16}" in text


def test_audit_takes_quiet(trained, capsys):
    root, data, ckpt = trained
    assert main(["audit", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--n_test", "2", "--projection_dims", "32",
                 "--sample_rates", "--precondition", "none", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "projection 32 gaussian" in captured.out and "%|" not in captured.err  # plain TracIn: a random projection


def test_the_health_score_counts_suspected_mislabels():
    """The health score is the share of scored training images not flagged (the model disagrees with the label and
    the self-influence is above the median): it falls as more such images appear, and the page says what it counts."""
    from tracin.workflows.analysis.load import Results
    from tracin.workflows.analysis.metrics import health

    def results(wrong):
        train = {i: {"index": i, "label": "a", "predicted": "b" if i < wrong else "a", "correct": i >= wrong} for i in range(100)}
        selfs = [{"train_index": i, "label": "a", "predicted": train[i]["predicted"], "score": float(100 - i), "rank": i + 1}
                 for i in range(100)]
        return Results(Path("."), {}, ["a", "b"], np.zeros(1), np.zeros((1, 1)), np.zeros((1, 1), int), np.zeros((1, 1)),
                       np.zeros((1, 1), int), train, {}, selfs)

    clean, noisy = health(results(1)), health(results(30))
    assert (clean.score, clean.band, clean.flagged) == (99.0, "EXCELLENT", 1) and health(results(2)).band == "GOOD"
    assert (noisy.score, noisy.band, noisy.flagged) == (70.0, "NEEDS ATTENTION", 30) and "above the median" in noisy.rule
    no_self = results(30)
    no_self.self_influence = None
    assert health(no_self).flagged == 30 and "not computed" in health(no_self).rule


def test_the_report_renders_in_a_headless_browser(trained, scored, tmp_path):
    """report.html in a real browser (Chromium, when installed): the summary, navigation and files section render."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine")
    assert main(["report", "--results_dir", str(scored)]) == 0
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (scored / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    for text in ("id=\"summary\"", "Health score", "href=\"#tests\"", "manifest.json"):
        assert text in done.stdout, text


def test_the_report_writes_the_seed_tables_and_negative_folder(scored):
    assert main(["report", "--results_dir", str(scored)]) == 0
    summary = list(csv.DictReader(open(scored / "influence_summary.csv")))
    assert len(summary) == 9 and all(int(r["positive_count"]) + int(r["negative_count"]) <= 10 for r in summary)
    assert all(0 <= float(r["proponent_label_agreement"]) <= 1 for r in summary)
    negative = sorted((scored / "negative").iterdir())
    assert 1 <= len(negative) <= 20 and all("_-" in p.name for p in negative)  # negative summed opponent scores
    pairs = list(csv.DictReader(open(scored / "confusion_pairs.csv")))
    wrong = [r for r in csv.DictReader(open(scored / "predictions_test.csv")) if r["correct"] == "0"]
    assert {(r["test_label"], r["test_predicted"]) for r in pairs} == {(r["label"], r["predicted"]) for r in wrong}


def test_every_test_image_is_reachable_from_the_report(scored):
    assert main(["report", "--results_dir", str(scored), "--html_tests", "4", "--quiet"]) == 0
    page = (scored / "report.html").read_text()
    pages = sorted(scored.glob("report_tests_*.html"))
    assert pages and all(f"href='{p.name}'" in page for p in pages)
    wrong = sum(r["correct"] == "0" for r in csv.DictReader(open(scored / "predictions_test.csv")))
    first = max(4, wrong)
    assert sum(p.read_text().count("<div class='pair'>") for p in pages) == 9 - first
    assert main(["report", "--results_dir", str(scored), "--quiet"]) == 0  # the default shows all 9: no pages left over
    assert not list(scored.glob("report_tests_*.html"))


def test_full_matrix_also_as_csv_and_misprediction_analysis(trained, tmp_path):
    root, data, ckpt = trained
    out = tmp_path / "m"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "2",
                 "--train_subset", "10", "--full_matrix", "--quiet"]) == 0
    matrix, train_idx = np.load(out / "influence_matrix.npy"), np.load(out / "train_indices.npy")
    rows = list(csv.DictReader(open(out / "influence_scores.csv")))
    assert len(rows) == matrix.size == 9 * 10
    first = [r for r in rows if r["test_index"] == rows[0]["test_index"]]
    assert [int(r["train_index"]) for r in first] == train_idx.tolist()
    assert close([float(r["score"]) for r in first], matrix[0])
    assert main(["report", "--results_dir", str(out), "--quiet"]) == 0
    analysis = list(csv.DictReader(open(out / "misprediction_influence_analysis.csv")))
    wrong = [r for r in csv.DictReader(open(out / "predictions_test.csv")) if r["correct"] == "0"]
    assert len(analysis) == len(wrong)
    assert all(int(r["proponents_of_predicted_class"]) + int(r["proponents_of_true_class"]) <= 2 for r in analysis)


def test_the_cross_analysis_has_the_original_columns(scored):
    assert main(["report", "--results_dir", str(scored), "--quiet"]) == 0
    rows = list(csv.DictReader(open(scored / "misprediction_cross_analysis.csv")))
    header = open(scored / "misprediction_cross_analysis.csv").readline().strip().split(",")
    assert header == ["test_idx", "test_true", "test_pred", "train_idx", "train_true", "train_pred", "influence", "rank", "same_error"]
    preds = {int(r["index"]): r for r in csv.DictReader(open(scored / "predictions_train.csv"))}
    assert all(preds[int(r["train_idx"])]["correct"] == "0" and r["same_error"] == str(r["train_pred"] == r["test_pred"])
               for r in rows)

"""The accuracy audit (API and CLI) and the fast-mode flags of `tracin influence`."""
import json

import numpy as np
import torch

from helpers import make_image_folder, MLP, perturbed_checkpoints, random_sets
from tracin.workflows.audit import audit, compare
from tracin.workflows.cli import main


def test_compare_metrics_on_known_cases():
    exact = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    same = compare(exact, exact, top=2)
    assert same["top_overlap"] == 1.0 and abs(same["spearman"] - 1) < 1e-12 and abs(same["pearson"] - 1) < 1e-12
    reversed_ = compare(exact, -exact, top=2)
    assert reversed_["top_overlap"] == 0.0 and abs(reversed_["spearman"] + 1) < 1e-9
    sampled = torch.tensor([[5.0, float("nan"), 3.0, float("nan"), 1.0]])
    m = compare(exact, sampled, top=2)
    assert m["top_overlap"] == 0.5 and abs(m["spearman"] - 1) < 1e-12


def test_audit_api_rows():
    torch.manual_seed(0)
    model = MLP(d_in=30, hidden=40, classes=6)
    train, test = random_sets(120, 30, 30, 6, seed=0)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.1])
    rows = audit(model, ckpts, train, test, {"big": {"projection_dim": 10**6}, "tiny": {"projection_dim": 4}, "half": {"sample_rate": 0.5}},
                 n_test=8, top=5, device="cpu", progress=False, precondition="none")  # K-FAC would also be fitted on the half
    by = {r["config"]: r for r in rows}
    assert list(by) == ["exact", "big", "tiny", "half"]
    assert by["big"]["top_overlap"] == 1.0 and by["big"]["spearman"] > 0.9999  # nothing projected: exact
    assert by["tiny"]["spearman"] < by["big"]["spearman"]
    assert by["half"]["spearman"] > 0.9999 and by["half"]["top_overlap"] < 1.0
    assert all(r["seconds"] > 0 and r["speedup"] > 0 for r in rows)


def test_cli_fast_flags_and_audit(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", n_train=10, n_test=3)
    ckpt = tmp_path / "c"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "2", "--checkpoint_dir", str(ckpt),
                 "--image_size", "16", "--quiet"]) == 0
    out = tmp_path / "o"
    assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--top_k", "3",
                 "--layers", "all", "--use_projection", "--projection_dim", "64", "--projection_type", "rademacher",
                 "--sample_rate", "0.5", "--stratify_by", "label", "--self_influence"]) == 0
    err = capsys.readouterr().err
    assert "parameters in scope, projected to ~64 dims per layer (rademacher), K-FAC preconditioned (damping 0.1); left " \
           "out: features.1, features.5 (layers K-FAC does not cover; --precondition none scores them), 50% of the " \
           "training set" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["projection_dim"] == 64 and manifest["parameters"]["sample_rate"] == 0.5
    idx = np.load(out / "top_k_influences_indices.npy")
    assert idx.shape == (9, 3) and idx.max() < 30
    assert len(open(out / "self_influence.csv").read().strip().splitlines()) == 1 + 15  # 5 per class sampled
    report = tmp_path / "audit.json"
    assert main(["audit", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--n_test", "4", "--layers", "all",
                 "--projection_dims", "32", "--sample_rates", "0.5", "--output", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "projection 32 " in printed and "projection 32 gaussian" not in printed and "Spearman" in printed  # K-FAC: no random kind
    assert [r["config"] for r in json.loads(report.read_text())] == ["exact", "projection 32", "sample 0.5"]


def test_the_audit_seed_seeds_the_projections():
    torch.manual_seed(0)
    model = MLP(d_in=30, hidden=40, classes=6)
    train, test = random_sets(60, 12, 30, 6, seed=0)
    ckpts, _ = perturbed_checkpoints(model, [0.1])

    def spearman(seed):
        rows = audit(model, ckpts, train, test, {"p": {"projection_dim": 8}}, n_test=12, device="cpu", progress=False,
                     precondition="none", seed=seed)
        return rows[1]["spearman"]

    assert spearman(1) == spearman(1) and spearman(1) != spearman(2)

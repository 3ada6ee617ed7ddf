"""Ranking pairs: MarginRankingLoss and the GHM loss against the float64 reference; pair files; CLI."""
import json
import warnings

import numpy as np
import pytest
import torch

from helpers import close, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.workflows.cli import main
from tracin.errors import DataError
from tracin.tasks.ranking import PairData, RankingTask, ranking_mlp, read_pairs, write_pairs_csv
from tracin.tasks.ranking import RankingTraining, train_ranking
from tracin.engine.scope import parameterised_modules


def all_modules(model):
    return [name for name, _, _ in parameterised_modules(model)]


def make_pairs(n: int, seed: int, flip: int = 0, d: int = 6) -> PairData:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=torch.Generator().manual_seed(99))
    x1, x2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    margins = (x1 - x2) @ w
    t = torch.where(margins > 0, 1.0, -1.0)
    flipped = torch.argsort(-margins.abs())[:flip]  # flip the clearest pairs: surely wrong labels
    t[flipped] *= -1
    pairs = PairData(x1, x2, t, [f"u{seed}_{i}" for i in range(n)], [f"v{seed}_{i}" for i in range(n)])
    pairs.flipped = flipped.tolist()
    return pairs


@pytest.mark.parametrize("loss_type", ["standard", "ghm"])
def test_ranking_matches_reference(loss_type):
    torch.manual_seed(0)
    model = ranking_mlp(6, (8, 5))
    train, test = make_pairs(21, 0), make_pairs(6, 1)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05, 0.02], scale=0.5)
    task = RankingTask(loss_type, margin=0.3, ghm_bins=5, ghm_alpha=0.8, train=train, batch_size=8)
    tr = TracIn(model, ckpts, layers="all", task=task, batch_size=5, progress=False, precondition="none")
    got = tr.influence_matrix(train, test)
    want = task_reference_matrix(model, raw, all_modules(model), task, [train[i] for i in range(len(train))],
                                 [test[i] for i in range(len(test))])
    assert rel_err(got, want) <= 1e-4
    top = tr.influence(train, test, top_k=4)
    assert torch.equal(top.proponents.indices, torch.argsort(got, dim=1, descending=True, stable=True)[:, :4])
    self_inf = tr.self_influence(train)
    assert rel_err(self_inf, torch.diagonal(task_reference_matrix(
        model, raw, all_modules(model), task, [train[i] for i in range(len(train))],
        [train[i] for i in range(len(train))]))) <= 1e-4


def test_ghm_loss_of_a_pair_does_not_depend_on_its_batch():
    model = ranking_mlp(6, (8,)).eval()
    train = make_pairs(30, 0)
    task = RankingTask("ghm", ghm_bins=4, train=train)
    with torch.no_grad():
        task.on_checkpoint(model, 0)
        whole = task.loss(model, (train.x1, train.x2, train.target, train.pair_ids))
        parts = torch.cat([task.loss(model, (train.x1[i:i + 7], train.x2[i:i + 7], train.target[i:i + 7], None)) for i in range(0, 30, 7)])
    assert close(whole, parts)
    (w,) = task.bin_weights.values()
    assert w.shape == (4,) and (w >= 0).all()


def test_ghm_task_reused_with_other_checkpoints_recomputes_its_histograms():
    model = ranking_mlp(6, (8,))
    train, test = make_pairs(24, 0), make_pairs(5, 1)
    first, _ = perturbed_checkpoints(model, [0.1, 0.05], seed=1, scale=0.5)
    second, _ = perturbed_checkpoints(model, [0.1, 0.05], seed=2, scale=0.5)
    shared = RankingTask("ghm", ghm_bins=4, train=train)
    TracIn(model, first, task=shared, progress=False, precondition="none").influence_matrix(train, test)
    reused = TracIn(model, second, task=shared, progress=False, precondition="none").influence_matrix(train, test)
    fresh = TracIn(model, second, task=RankingTask("ghm", ghm_bins=4, train=train), progress=False, precondition="none").influence_matrix(train, test)
    assert close(reused, fresh)


def test_pair_files_round_trip(tmp_path):
    pairs = make_pairs(5, 3)
    back = read_pairs(write_pairs_csv(tmp_path / "p.csv", pairs))
    assert back.pair_ids == pairs.pair_ids and torch.allclose(back.x1, pairs.x1) and torch.equal(back.target, pairs.target)
    np.savez(tmp_path / "p.npz", x1=pairs.x1.numpy(), x2=pairs.x2.numpy(), target=pairs.target.numpy())
    assert read_pairs(tmp_path / "p.npz").pair_ids[0] == "0_5"


@pytest.mark.parametrize("content,message", [
    ("id1,id2,target,x1_0,x2_0\na,b,2,0.1,0.2\n", "target 2 is not -1 or 1"),
    ("id1,id2,target,x1_0,x2_0\na,b,1,0.1\n", "line 2 has 4 fields"),
    ("id1,id2,x1_0,x2_0\na,b,0.1,0.2\n", "needs a header with target"),
    ("id1,id2,target,x1_0,x2_0\na,b,1,zero,0.2\n", "line 2 has a non-numeric"),
    ("id1,id2,target,x1_0,x2_0\n", "holds no pairs"),
])
def test_malformed_pair_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_pairs(path)


def test_ranking_cli_end_to_end(tmp_path, capsys):
    train, test = make_pairs(40, 0, flip=3), make_pairs(8, 1)
    write_pairs_csv(tmp_path / "train.csv", train)
    write_pairs_csv(tmp_path / "test.csv", test)
    train_ranking(train, tmp_path / "ck", RankingTraining(epochs=3, learning_rate=0.1))
    out = tmp_path / "out"
    assert main(["ranking", "--pairs_train", str(tmp_path / "train.csv"), "--pairs_test", str(tmp_path / "test.csv"),
                 "--checkpoint_dir", str(tmp_path / "ck"), "--checkpoint_prefix", "model_epoch_", "--compute_self_influence",
                 "--compute_influence", "--num_test_samples", "3", "--margin", "0.1", "--device", "cpu", "--output_dir", str(out), "--quiet"]) == 0
    self_json = json.loads((out / "self_influence.json").read_text())
    assert set(self_json) == set(train.pair_ids)
    assert all(set(v) == {"tracin_self_influence"} for v in self_json.values())
    ranked = sorted(self_json, key=lambda k: -self_json[k]["tracin_self_influence"])
    assert set(ranked[:5]) >= {train.pair_ids[i] for i in train.flipped}  # the flipped pairs surface first
    infl = json.loads((out / "influence.json").read_text())
    matrix = np.load(out / "influence_matrix.npy")
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = [test.pair_ids[i] for i in manifest["data"]["test_indices"]]
    assert matrix.shape == (3, 40) and set(infl) == set(train.pair_ids)
    for j, pid in enumerate(train.pair_ids):
        assert list(infl[pid]) == [f"tracin_influence_{t}" for t in chosen]
        assert np.allclose([infl[pid][f"tracin_influence_{t}"] for t in chosen], matrix[:, j])


def test_ranking_cli_bad_input(tmp_path, capsys):
    train = make_pairs(10, 0)
    write_pairs_csv(tmp_path / "train.csv", train)
    train_ranking(train, tmp_path / "ck", RankingTraining(epochs=1))
    (tmp_path / "bad.csv").write_text("id1,id2,target,x1_0\n")
    base = ["ranking", "--checkpoint_dir", str(tmp_path / "ck"), "--output_dir", str(tmp_path / "o"), "--quiet"]
    assert main(base + ["--pairs_train", str(tmp_path / "bad.csv"), "--compute_self_influence"]) == 2
    assert "bad.csv" in capsys.readouterr().err
    assert main(base + ["--pairs_train", str(tmp_path / "train.csv")]) == 2
    assert "Nothing to compute" in capsys.readouterr().err
    assert main(base + ["--pairs_train", str(tmp_path / "train.csv"), "--compute_influence"]) == 2
    assert "--pairs_test" in capsys.readouterr().err


def test_the_trained_loss_settings_are_stored_and_used(tmp_path, capsys):
    train = make_pairs(30, 0, flip=3)
    write_pairs_csv(tmp_path / "train.csv", train)
    train_ranking(train, tmp_path / "ck", RankingTraining(epochs=2, learning_rate=0.1, margin=0.3))
    base = ["ranking", "--pairs_train", str(tmp_path / "train.csv"), "--checkpoint_dir", str(tmp_path / "ck"),
            "--compute_self_influence", "--device", "cpu", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch warning when nothing is given
        assert main(base + ["--output_dir", str(tmp_path / "stored")]) == 0
    stored = np.load(tmp_path / "stored" / "self_influence.npy")
    assert main(base + ["--output_dir", str(tmp_path / "given"), "--margin", "0.3"]) == 0
    assert np.array_equal(stored, np.load(tmp_path / "given" / "self_influence.npy"))  # the stored margin was used
    with pytest.warns(UserWarning, match="--margin 0.0 differs from the 0.3"):
        assert main(base + ["--output_dir", str(tmp_path / "other"), "--margin", "0"]) == 0
    assert (np.load(tmp_path / "other" / "self_influence.npy") == 0).sum() > (stored == 0).sum()

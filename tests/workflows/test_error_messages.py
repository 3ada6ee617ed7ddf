"""Each catalogued user error not exercised elsewhere, triggered once, by its message."""
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from helpers import make_image_folder, MLP, rel_err, task_reference_matrix
from tracin.tasks import ClassificationTask
from tracin import Checkpoint, CheckpointError, DataError, TracIn, TracInError, save_checkpoint
from tracin.workflows.cli import main


def _ck(model):
    return [Checkpoint(model.state_dict(), learning_rate=0.1)]


def _data(n=6):
    return TensorDataset(torch.randn(n, 12), torch.randint(0, 5, (n,)))


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


# -- API arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"checkpoints": ["not a checkpoint"]}, "checkpoints must be Checkpoint objects"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"num_workers": -1}, r"num_workers must be 0 \(load in this process\) or more, got -1"),
    ({"stratify_by": 3}, "stratify_by must be a key the task provides"),
    ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]"),
    ({"projection_dim": 0}, "projection_dim must be a positive integer"),
    ({"projection_dim": 8, "projection": "fourier"}, "projection='fourier' is not one of"),
    ({"layers": True}, "is not a layer selection"),
    ({"layers": []}, "layers is an empty list"),
])
def test_bad_constructor_arguments(kwargs, message):
    model = MLP()
    kwargs = {"checkpoints": _ck(model), **kwargs}
    with pytest.raises(TracInError, match=message):
        TracIn(model, kwargs.pop("checkpoints"), device="cpu", **kwargs)


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(TracInError, match="CUDA is not available here"):
            TracIn(MLP(), _ck(MLP()), device="cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(TracInError, match="MPS is not available here"):
            TracIn(MLP(), _ck(MLP()), device="mps")


def test_frozen_model_and_bad_top_k(tmp_path):
    frozen = MLP().requires_grad_(False)
    with pytest.raises(TracInError, match="no parameters that require grad"):
        TracIn(frozen, _ck(frozen), device="cpu")
    model = MLP()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    with pytest.raises(TracInError, match="top_k must be a positive integer"):
        tr.influence(_data(), _data(2), top_k=0)
    tr.build_index(_data(), tmp_path / "s")
    with pytest.raises(TracInError, match="between 1 and the index's 6 rows"):
        tr.query(tmp_path / "s", _data(2), top_k=7)


def test_full_matrix_refused_under_distributed(monkeypatch, tmp_path):
    import tracin.api as api

    model = MLP()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    monkeypatch.setattr(api, "rank_and_world", lambda: (0, 2))
    with pytest.raises(TracInError, match="not supported under torch.distributed yet"):
        tr.influence(_data(), _data(2), top_k=2, matrix_path=tmp_path / "m.npy")


def test_rank_without_examples(monkeypatch):
    import tracin.engine.sampling as sampling

    model = MLP()
    monkeypatch.setattr(sampling, "rank_and_world", lambda: (0, 4))  # 2 batches for 4 ranks: rank 0 gets none
    with pytest.raises(TracInError, match="Rank 0 has no training examples"):
        TracIn(model, _ck(model), device="cpu", batch_size=4, progress=False).self_influence(_data(6))


def test_labels_needed_for_stratification_and_audit_size():
    from tracin.workflows.audit import audit

    model = MLP()
    tr = TracIn(model, _ck(model), task=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
                device="cpu", sample_rate=0.5, stratify_by="label", progress=False)
    with pytest.raises(TracInError, match="stratify_by='label' is not a key this task provides"):
        tr.self_influence(_data())
    with pytest.raises(TracInError, match="n_test must be at least 1"):
        audit(model, _ck(model), _data(), _data(2), {}, n_test=0, device="cpu")


def test_iterable_dataset_has_no_length():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(12), torch.tensor(0)

    model = MLP()
    with pytest.raises(DataError, match="has no length"):
        TracIn(model, _ck(model), device="cpu", progress=False).self_influence(Stream())


# -- capture ------------------------------------------------------------------------------------------
def test_layer_run_without_autograd_and_unbatched_conv():
    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 5)

        def forward(self, x):
            with torch.no_grad():
                frozen = self.a(x)
            return self.b(x) + frozen

    model = NoGrad()
    with pytest.raises(TracInError, match="Module 'a' ran without autograd"):
        TracIn(model, _ck(model), device="cpu", progress=False).self_influence(_data())

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)

        def forward(self, x):
            return torch.stack([self.conv(xi).sum(-1) for xi in x])

    model = Unbatched()  # a module called once per example: its rows are not the batch, so it is scored exactly
    data = TensorDataset(torch.randn(4, 2, 6), torch.randint(0, 3, (4,)))
    tr = TracIn(model, _ck(model), device="cpu", kernel="ghost", progress=False)
    got = tr.self_influence(data)
    want = task_reference_matrix(model, [(model.state_dict(), 0.1)], None, ClassificationTask(), [data[i] for i in range(4)],
                                 [data[i] for i in range(4)]).diagonal()
    assert tr.scope()[0]["kernel"] == "exact" and torch.allclose(got.double(), want, rtol=1e-4)


def test_module_returning_a_non_tensor():
    class PairLinear(nn.Linear):
        def forward(self, x):
            return (super().forward(x), x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = PairLinear(12, 5)

        def forward(self, x):
            return self.pair(x)[0]

    model = Model()
    with pytest.raises(TracInError, match="returned tuple, not a tensor"):
        TracIn(model, _ck(model), device="cpu", progress=False).self_influence(_data())


# -- checkpoint files ---------------------------------------------------------------------------------
def test_checkpoint_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; check the path"):
        Checkpoint(tmp_path / "missing.pt", learning_rate=0.1)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Checkpoint(tmp_path / "bad.safetensors", learning_rate=0.1)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict of weights"):
        Checkpoint(tmp_path / "list.pt", learning_rate=0.1)
    with pytest.raises(CheckpointError, match="has no weights"):
        Checkpoint({"learning_rate": 0.1, "epoch": 2})
    with pytest.raises(CheckpointError, match="non-tensor entries in its state dict"):
        Checkpoint({"model_state_dict": {"w": torch.zeros(1), "note": "x"}}, learning_rate=0.1)
    with pytest.raises(CheckpointError, match="invalid learning rate -1"):
        Checkpoint(MLP().state_dict(), learning_rate=-1)
    with pytest.raises(CheckpointError, match="has no learning rate"):
        Checkpoint(MLP().state_dict())


class Custom:
    pass


def test_trusted_files_that_still_fail(tmp_path):
    with open(tmp_path / "broken.pt", "wb") as f:
        pickle.dump({"x": Custom()}, f)
    (tmp_path / "broken.pt").write_bytes((tmp_path / "broken.pt").read_bytes()[:-5])  # truncated pickle
    with pytest.raises(CheckpointError, match="could not be unpickled"), pytest.warns(UserWarning):
        Checkpoint(tmp_path / "broken.pt", learning_rate=0.1, trust=True)
    torch.save([Custom()], tmp_path / "custom_list.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="not a model or a dict of weights"):
        Checkpoint(tmp_path / "custom_list.pt", learning_rate=0.1, trust=True)


# -- image workflow --------------------------------------------------------------------------------------
def test_image_folder_errors(tmp_path, capsys):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    code, err = _err(capsys, ["train", "--data_dir", str(root), "--arch", "smallcnn", "--checkpoint_dir", str(tmp_path / "c")])
    assert code == 2 and "has no class folders" in err
    data = make_image_folder(tmp_path / "d2", n_train=2, n_test=1)
    (data / "test" / "zebra").mkdir()
    code, err = _err(capsys, ["train", "--data_dir", str(data), "--arch", "smallcnn", "--checkpoint_dir", str(tmp_path / "c")])
    assert code == 2 and "are not among the classes" in err
    broken = make_image_folder(tmp_path / "d3", classes=("a", "b"), n_train=1, n_test=1)
    for f in (broken / "test").rglob("*.png"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        code, err = _err(capsys, ["train", "--data_dir", str(broken), "--arch", "smallcnn", "--checkpoint_dir", str(tmp_path / "c")])
    assert code == 2 and "has no readable images" in err
    one = make_image_folder(tmp_path / "d4", classes=("only",), n_train=2, n_test=1)
    code, err = _err(capsys, ["train", "--data_dir", str(one), "--arch", "smallcnn", "--checkpoint_dir", str(tmp_path / "c")])
    assert code == 2 and "needs at least 2 classes" in err


def test_training_argument_errors(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", n_train=2, n_test=1)
    base = ["train", "--data_dir", str(data), "--checkpoint_dir", str(tmp_path / "c"), "--quiet"]
    code, err = _err(capsys, base + ["--arch", "smallcnn", "--epochs", "0"])
    assert code == 2 and "--epochs, --save_every and --batch_size must be at least 1" in err
    code, err = _err(capsys, base + ["--arch", "smallcnn", "--learning_rate", "0"])
    assert code == 2 and "--learning_rate must be positive" in err
    code, err = _err(capsys, base + ["--arch", "smallcnn", "--learning_rate", "1e30", "--image_size", "16"])
    assert code == 2 and "The training loss became" in err
    torch.save({"model_state_dict": {"nothing.weight": torch.zeros(1)}}, tmp_path / "pre.pt")
    code, err = _err(capsys, base + ["--arch", "smallcnn", "--pretrained", str(tmp_path / "pre.pt"), "--image_size", "16"])
    assert code == 2 and "shares no weights with this architecture" in err
    from tracin.workflows.image.models import build_model

    with pytest.raises(TracInError, match="Unknown architecture 'vgg'"):
        build_model("vgg", 3)


def test_influence_job_errors(tmp_path, capsys):
    data = make_image_folder(tmp_path / "d", n_train=3, n_test=1)
    ckpt = tmp_path / "c"
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir", str(ckpt),
                 "--image_size", "16", "--quiet"]) == 0
    base = ["influence", "--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / "o"),
            "--top_k", "2", "--quiet"]
    code, err = _err(capsys, base + ["--train_subset", "0"])
    assert code == 2 and "--train_subset must be at least 1" in err
    plain = tmp_path / "plain"
    save_checkpoint(plain / "checkpoint_epoch_1.pt", MLP().state_dict(), learning_rate=0.1)
    code, err = _err(capsys, ["influence", "--data_dir", str(data), "--checkpoint_dir", str(plain), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "it was not written by 'tracin train'" in err
    # results directories: missing, incomplete, corrupt
    code, err = _err(capsys, ["report", "--results_dir", str(tmp_path / "none")])
    assert code == 2 and "does not exist; run 'tracin influence" in err
    out = tmp_path / "o"
    assert main(base) == 0
    (out / "predictions_test.csv").unlink()
    code, err = _err(capsys, ["report", "--results_dir", str(out)])
    assert code == 2 and "lacks ['predictions_test.csv']" in err
    (out / "manifest.json").write_text("{not json")
    code, err = _err(capsys, ["report", "--results_dir", str(out)])
    assert code == 2 and "manifest.json is corrupt" in err


def test_gradcam_needs_a_conv_model(tmp_path):
    from tracin.workflows.analysis.gradcam import _target_layer

    with pytest.raises(TracInError, match="Grad-CAM needs a convolutional model"):
        _target_layer(MLP())


def test_image_changed_after_scan(tmp_path):
    from tracin.workflows.image.folders import ImageDataset, image_transform, scan_split

    data = make_image_folder(tmp_path / "d", n_train=1, n_test=1)
    split, _ = scan_split(data, "train")
    split.paths[0].write_bytes(b"now broken")
    with pytest.raises(DataError, match="changed after the scan"):
        ImageDataset(split, image_transform(16))[0]


def test_demo_arguments(tmp_path, capsys):
    code, err = _err(capsys, ["demo", "--output_dir", str(tmp_path), "--noise_rate", "0.95"])
    assert code == 2 and "--noise_rate must be in [0, 0.9)" in err
    (tmp_path / "busy" / "data").mkdir(parents=True)
    (tmp_path / "busy" / "data" / "x").write_text("x")
    code, err = _err(capsys, ["demo", "--output_dir", str(tmp_path / "busy")])
    assert code == 2 and "is not empty; give --output_dir a new or empty folder" in err


def test_module_whose_rows_are_not_the_examples_is_scored_exactly():
    class Folded(nn.Module):
        """Runs its Linear on two half-rows per example: rows are not examples."""

        def __init__(self):
            super().__init__()
            self.halves = nn.Linear(6, 5)

        def forward(self, x):
            return self.halves(x.reshape(-1, 6)).reshape(x.shape[0], 2, 5).sum(1)

    model = Folded()  # its rows are not the examples: scored exactly by per-example passes instead
    data = _data()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    with pytest.warns(UserWarning, match="precondition='auto' scores plain TracIn over every requested layer: 'halves' needs exact"):
        got = tr.self_influence(data)  # the default (K-FAC) does not cover it: plain TracIn, said once
    want = task_reference_matrix(model, [(model.state_dict(), 0.1)], None, ClassificationTask(), [data[i] for i in range(6)],
                                 [data[i] for i in range(6)]).diagonal()
    assert tr.scope()[0]["kernel"] == "exact" and torch.allclose(got.double(), want, rtol=1e-4)
    assert tr.preconditioner is None

    class FoldedNormed(Folded):
        """The same, with a LayerNorm that K-FAC would leave out: once K-FAC is declined it is scored too."""

        def __init__(self):
            super().__init__()
            self.norm, self.head = nn.LayerNorm(5), nn.Linear(5, 60)  # Linear layers hold 97% of the parameters

        def forward(self, x):
            return self.head(self.norm(super().forward(x)))

    normed = FoldedNormed()
    tr = TracIn(normed, _ck(normed), device="cpu", progress=False)
    assert [row["name"] for row in tr.scope()] == ["halves", "head"]  # K-FAC planned: the norm layer left out
    with pytest.warns(UserWarning, match="plain TracIn over every requested layer"):
        got = tr.self_influence(data)
    want = task_reference_matrix(normed, [(normed.state_dict(), 0.1)], None, ClassificationTask(), [data[i] for i in range(6)],
                                 [data[i] for i in range(6)]).diagonal()
    assert [row["name"] for row in tr.scope()] == ["halves", "norm", "head"] and torch.allclose(got.double(), want, rtol=1e-4)

    class Broadcast(nn.Module):
        """Position embeddings looked up once per batch: with a first batch of one example the rows look right."""

        def __init__(self):
            super().__init__()
            self.pos, self.head = nn.Embedding(4, 12), nn.Linear(12, 5)

        def forward(self, x):
            return self.head(x + self.pos(torch.arange(4)[None]).mean(1))

    model = Broadcast()  # decided on a training batch of several examples, so a test set of one example works too
    one = TensorDataset(torch.randn(1, 12), torch.tensor([1]))
    tr = TracIn(model, _ck(model), device="cpu", batch_size=6, progress=False)
    got = tr.influence_matrix(data, one)
    want = task_reference_matrix(model, [(model.state_dict(), 0.1)], None, ClassificationTask(), [data[i] for i in range(6)],
                                 [one[0]])
    # its one row is expanded to the first training batch's six (the losses unchanged), so it keeps a kernel
    assert {row["name"]: row["kernel"] for row in tr.scope()}["pos"] in ("ghost", "materialize") and rel_err(got, want) <= 1e-4
    tr = TracIn(model, _ck(model), device="cpu", batch_size=6, progress=False)
    assert rel_err(tr.influence_matrix(one, data), want.T) <= 1e-4  # a first batch of one example shows nothing: exact
    assert {row["name"]: row["kernel"] for row in tr.scope()}["pos"] == "exact"

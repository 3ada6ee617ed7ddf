"""Bad input gets one clear error naming the thing and the fix."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import MLP
from tracin import Checkpoint, DataError, TracIn, TracInError, UnsupportedModuleError


def _ck(model, lr=0.1):
    return [Checkpoint(model.state_dict(), learning_rate=lr)]


def _data(n=6, d=12, classes=5):
    return TensorDataset(torch.randn(n, d), torch.randint(0, classes, (n,)))


class WithBilinear(nn.Module):
    """nn.Bilinear has no kernel of its own."""

    def __init__(self):
        super().__init__()
        self.pair = nn.Bilinear(4, 4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.pair(x, x.flip(1)))


def _exact_parameters(tr):
    return [n for row in tr.scope() if row["kernel"] == "exact" and row["type"] == "parameters" for n in row["parameters"]]


def test_a_module_without_a_kernel_is_scored_not_dropped():
    model = WithBilinear()
    tr = TracIn(model, _ck(model), device="cpu")
    assert _exact_parameters(tr) == [f"pair.{n}" for n, _ in model.pair.named_parameters()]
    # leaving it out works
    assert [h.name for h in TracIn(model, _ck(model), layers="last", device="cpu").handlers] == ["head"]


def test_custom_parameter_on_container_is_not_dropped():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * self.scale

    model = Scaled()
    assert _exact_parameters(TracIn(model, _ck(model), device="cpu")) == ["scale"]


def test_tied_weights_are_scored_once_with_every_use():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.emb(x)).mean(1)

    model = Tied()
    tr = TracIn(model, _ck(model), device="cpu")
    tied = [row for row in tr.scope() if row["name"] == "emb.weight (tied to out.weight)"]
    assert len(tr.scope()) == 1 and tied and tr.num_parameters == 40  # one parameter, both uses
    assert [row["name"] for row in TracIn(model, _ck(model), layers="out", device="cpu").scope()] == [tied[0]["name"]]


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModuleError, match="track_running_stats=False"):
        TracIn(model, _ck(model), device="cpu")


def test_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True))
    with pytest.raises(UnsupportedModuleError, match="scale_grad_by_freq"):
        TracIn(model, _ck(model), device="cpu")


def test_unknown_layer_name_lists_choices():
    model = MLP()
    with pytest.raises(TracInError, match="Layer 'fc9' matches no module.*choose from: fc1, fc2, head"):
        TracIn(model, _ck(model), layers=["fc9"], device="cpu")
    with pytest.raises(TracInError, match="last 4"):
        TracIn(model, _ck(model), layers=4, device="cpu")
    with pytest.raises(TracInError, match=r"'fc1\.gamma' matches no module or parameter.*such as its \.bias"):
        TracIn(model, _ck(model), layers=["fc1.gamma"], device="cpu")
    no_bias = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with pytest.raises(TracInError, match="output_bias' needs a trainable bias on the last parameterised module, and 2 has none"):
        TracIn(no_bias, _ck(no_bias), layers="output_bias", device="cpu")


def test_nan_loss_names_the_examples():
    model = MLP()
    x = torch.randn(6, 12)
    x[4, 0] = float("nan")
    tr = TracIn(model, _ck(model), device="cpu", batch_size=4, progress=False)
    with pytest.raises(DataError, match=r"NaN or infinite for training example\(s\) \[4\]"):
        tr.self_influence(TensorDataset(x, torch.zeros(6, dtype=torch.long)))


def test_label_out_of_range():
    model = MLP()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    with pytest.raises(DataError, match="Label 7 is out of range for a model with 5 outputs"):
        tr.self_influence(TensorDataset(torch.randn(3, 12), torch.tensor([0, 7, 1])))


def test_empty_data_and_top_k_too_large():
    model = MLP()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    with pytest.raises(DataError, match="training set is empty"):
        tr.influence(_data(0), _data(2), top_k=1)
    with pytest.raises(TracInError, match=r"top_k=10 is larger than the training set \(6 examples\)"):
        tr.influence(_data(6), _data(2), top_k=10)


def test_shuffling_loader_is_refused():
    model = MLP()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    with pytest.raises(DataError, match="shuffle=False"):
        tr.self_influence(DataLoader(_data(), batch_size=2, shuffle=True))


def test_loss_must_be_per_example():
    model = MLP()
    tr = TracIn(model, _ck(model), task=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), device="cpu", progress=False)
    with pytest.raises(TracInError, match="one unreduced loss per example"):
        tr.self_influence(_data())


def test_input_modified_in_place_after_layer_is_detected():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.tanh(x * 1.0)
            out = self.fc(h)
            h.mul_(2.0)  # rewrites fc's recorded input
            return self.head(out + h)

    model = Sneaky()
    tr = TracIn(model, _ck(model), device="cpu", progress=False)
    with pytest.raises(TracInError, match="input of module 'fc' was modified in place"):
        tr.self_influence(TensorDataset(torch.randn(3, 4), torch.tensor([0, 1, 0])))


def test_bad_arguments():
    model = MLP()
    with pytest.raises(TracInError, match="No checkpoints"):
        TracIn(model, [], device="cpu")
    with pytest.raises(TracInError, match="kernel="):
        TracIn(model, _ck(model), device="cpu", kernel="fast")
    with pytest.raises(TracInError, match="memory_budget"):
        TracIn(model, _ck(model), device="cpu", memory_budget=-5)
    with pytest.raises(TracInError, match="Unknown device"):
        TracIn(model, _ck(model), device="tpu9")

"""Every numeric path against the float64 torch.func reference (relative error <= 1e-4)."""
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import all_module_names, DEVICE, make_case, perturbed_checkpoints, reference_matrix, rel_err, scope_names
from tracin import TracIn

TOL = 1e-4


@pytest.mark.parametrize("kind", ["mlp", "cnn", "conv1d", "seq"])
@pytest.mark.parametrize("kernel", ["auto", "ghost", "materialize"])
def test_matrix_matches_reference(kind, kernel):
    model, train, test = make_case(kind)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05, 0.02])
    want = reference_matrix(model, raw, all_module_names(model), train, test)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=8, progress=False, kernel=kernel, precondition="none")
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_self_influence_is_reference_diagonal(kind):
    model, train, _ = make_case(kind)
    ckpts, raw = perturbed_checkpoints(model, [0.3, 0.1])
    want = reference_matrix(model, raw, all_module_names(model), train, train).diagonal()
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=5, progress=False, precondition="none")
    got = tr.self_influence(TensorDataset(*train))
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("layers,modules", [("last", ["head"]), (2, ["fc2", "head"]), (["fc1"], ["fc1"]), ("fc*", ["fc1", "fc2"])])
def test_layer_selection(layers, modules):
    model, train, test = make_case("mlp")
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.2])
    want = reference_matrix(model, raw, modules, train, test)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, progress=False, precondition="none")
    assert [h.name for h in tr.handlers] == modules
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL


def test_frozen_parameters_are_out_of_scope():
    model, train, test = make_case("mlp")
    model.fc1.weight.requires_grad_(False)  # fc1.bias stays in scope on its own
    model.fc2.requires_grad_(False)
    ckpts, raw = perturbed_checkpoints(model, [0.1])
    want = reference_matrix(model, raw, ["fc1", "head"], train, test)
    assert scope_names(model, ["fc1", "head"]) == ["fc1.bias", "head.weight", "head.bias"]
    got = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert rel_err(got, want) <= TOL
    assert model.fc1.weight.requires_grad is False and model.fc1.bias.requires_grad is True


@pytest.mark.parametrize("layers,scope", [(["head.bias"], ["head.bias"]), ("*.bias", ["fc1.bias", "fc2.bias", "head.bias"]),
                                          (["head", "fc1.bias"], ["fc1.bias", "head.weight", "head.bias"])])
def test_parameter_selection(layers, scope):
    """A name that matches a parameter rather than a module scores that parameter alone, exactly
    (the reference differentiates only those parameters); the model's flags are left as they were."""
    import copy

    model, train, test = make_case("mlp")
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.2])
    ref = copy.deepcopy(model)
    for name, param in ref.named_parameters():
        param.requires_grad_(name in scope)
    modules = sorted({n.rsplit(".", 1)[0] for n in scope}, key=["fc1", "fc2", "head"].index)
    assert scope_names(ref, modules) == scope
    want = reference_matrix(ref, raw, modules, train, test)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, progress=False, precondition="none")
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL
    assert tr.num_parameters == sum(p.numel() for n, p in model.named_parameters() if n in scope)
    assert all(p.requires_grad for p in model.parameters())
    if layers == ["head.bias"]:
        assert [(h.name, h.param_names) for h in TracIn(model, ckpts, layers="output_bias", progress=False, precondition="none").handlers] == [("head", ["bias"])]


def test_module_called_twice_sums_over_calls():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.shared(torch.tanh(self.shared(x))))

    model = Twice()
    g = torch.Generator().manual_seed(3)
    train = (torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g))
    test = (torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.3])
    want = reference_matrix(model, raw, ["shared", "head"], train, test)
    for kernel in ("ghost", "materialize"):
        got = TracIn(model, ckpts, device=DEVICE, progress=False, kernel=kernel, precondition="none").influence_matrix(
            TensorDataset(*train), TensorDataset(*test))
        assert rel_err(got, want) <= TOL


def test_model_state_is_restored():
    model, train, test = make_case("cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").self_influence(TensorDataset(*train))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["cnn", "conv1d"])
def test_other_device_conv_gradient_path_matches_reference(kind, monkeypatch):
    """Materialised conv gradients use a grouped convolution on CPUs and chunked unfold + matmul
    elsewhere; this runs the path the test device would not take (unfold in chunks of one example)."""
    from tracin.layers import linear

    grouped = ("cpu", "cuda", "mps") if DEVICE != "cpu" else ()
    monkeypatch.setattr(linear.ConvHandler, "grouped_devices", grouped)
    monkeypatch.setattr(linear, "UNFOLD_BYTES", 1)  # one example per chunk
    model, train, test = make_case(kind)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])
    want = reference_matrix(model, raw, all_module_names(model), train, test)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=8, progress=False, kernel="materialize", precondition="none")
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL
    assert rel_err(tr.self_influence(TensorDataset(*train)), reference_matrix(model, raw, all_module_names(model), train, train).diagonal()) <= TOL

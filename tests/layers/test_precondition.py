"""K-FAC preconditioning (precondition="kfac") against a naive float64 reference, and its errors."""
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import (CNN, CountingDataset, DEVICE, inverse_tolerance, kfac_reference_matrix, matrix_rel_err, MLP,
                     perturbed_checkpoints, rel_err)
from tracin import TracIn
from tracin.errors import TracInError
from tracin.config import ScoringConfig
from tracin.layers.precondition import CovarianceSums, fit_whiteners

TOL = 1e-4
CNN_LAYERS = ["conv1", "conv2", "conv3", "fc"]  # conv2: grouped, dilated, reflect-padded, no bias


def case(kind: str, n_train: int = 21, n_test: int = 6):
    g = torch.Generator().manual_seed(3)
    model, shape, classes, layers = (MLP(), (12,), 5, ["fc1", "fc2", "head"]) if kind == "mlp" else (CNN(), (3, 8, 10), 4, CNN_LAYERS)
    xs = torch.randn((n_train + n_test,) + shape, generator=g)
    ys = torch.randint(0, classes, (n_train + n_test,), generator=g)
    ckpts, raw = perturbed_checkpoints(model, [0.2, 0.05])
    return model, layers, ckpts, raw, (xs[:n_train], ys[:n_train]), (xs[n_train:], ys[n_train:])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("kernel", ["auto", "ghost", "materialize"])
def test_kfac_matrix_and_self_influence_match_reference(kind, kernel):
    model, layers, ckpts, raw, train, test = case(kind)
    want = kfac_reference_matrix(model, raw, layers, train, test, damping=0.1)
    want_self = kfac_reference_matrix(model, raw, layers, train, test, damping=0.1, self_only=True)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, kernel=kernel, precondition="kfac")
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert rel_err(got, want) <= TOL
    assert rel_err(tr.self_influence(TensorDataset(*train)), want_self) <= TOL
    plain = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="none")
    assert rel_err(plain.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) > 0.1  # it does change scores


def test_kfac_damping_and_last_layer_scope():
    model, _, ckpts, raw, train, test = case("cnn")
    want = kfac_reference_matrix(model, raw, ["fc"], train, test, damping=0.7)
    tr = TracIn(model, ckpts, layers="last", device=DEVICE, batch_size=5, progress=False, precondition="kfac", damping=0.7)
    result = tr.influence(TensorDataset(*train), TensorDataset(*test), top_k=4, self_influence=True)
    assert rel_err(result.proponents.values, want.topk(4, dim=1).values) <= TOL
    assert torch.equal(result.proponents.indices, want.topk(4, dim=1).indices)
    assert torch.equal(result.opponents.indices, (-want).topk(4, dim=1).indices)
    assert rel_err(result.self_influence, kfac_reference_matrix(model, raw, ["fc"], train, test, 0.7, self_only=True)) <= TOL


def test_projection_wide_enough_to_be_exact_keeps_kfac_exact():
    model, layers, ckpts, raw, train, test = case("mlp")
    want = kfac_reference_matrix(model, raw, layers, train, test)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac",
                projection_dim=10_000)
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_projection_under_kfac_keeps_leading_directions_as_the_reference(kind):
    """projection_dim under K-FAC: each factor's whiteners keep its leading eigen-directions (no random matrix),
    every pass both-sided; against the float64 reference truncated the same way, and the passes agree."""
    model, layers, ckpts, raw, train, test = case(kind)
    rank = 12 if kind == "mlp" else 24
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac",
                projection_dim=rank)
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    whiteners = tr.preconditioner.state()  # the directions each layer kept (how many: tests/layers/test_budget.py)
    kept = {name: (whiteners[f"0|{name}|0"].shape[-1], whiteners[f"0|{name}|1"].shape[-1]) for name in layers}
    assert all(whiteners[f"{c}|{name}|{side}"].shape[-1] == kept[name][side]
               for c in range(len(ckpts)) for name in layers for side in (0, 1))
    want = kfac_reference_matrix(model, raw, layers, train, test, kept=kept)
    exact = kfac_reference_matrix(model, raw, layers, train, test)
    assert matrix_rel_err(got, want) <= TOL and matrix_rel_err(want, exact) > 10 * TOL  # truncated, and it shows
    result = tr.influence(TensorDataset(*train), TensorDataset(*test), top_k=4, self_influence=True)
    assert torch.equal(result.proponents.indices, got.topk(4, dim=1).indices)
    assert rel_err(result.self_influence, kfac_reference_matrix(model, raw, layers, train, test, kept=kept, self_only=True)) <= TOL
    tr.cache_test(TensorDataset(*test))
    assert matrix_rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL
    other_seed = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac",
                        projection_dim=rank, seed=7, projection="rademacher")
    assert matrix_rel_err(other_seed.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL


def test_cached_test_needs_a_fitted_preconditioner_and_an_index_carries_its_own(tmp_path):
    model, layers, ckpts, raw, train, test = case("mlp")
    want = kfac_reference_matrix(model, raw, layers, train, test)
    kwargs = dict(layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac")
    tr = TracIn(model, ckpts, **kwargs)
    test_set = TensorDataset(*test)
    with pytest.raises(TracInError, match="fit_preconditioner"):
        tr.cache_test(test_set)
    tr.fit_preconditioner(TensorDataset(*train))
    tr.cache_test(test_set)
    result = tr.influence(TensorDataset(*train), test_set, top_k=3)
    assert torch.equal(result.proponents.indices, want.topk(3, dim=1).indices)
    tr.build_index(TensorDataset(*train), tmp_path / "index")
    fresh = TracIn(model, ckpts, **kwargs)  # never fitted: the index's whiteners are taken, no training data read
    saved = fresh.query(tmp_path / "index", test_set, top_k=3)
    assert torch.equal(saved.proponents.indices, want.topk(3, dim=1).indices)
    assert fresh.preconditioner.fit_examples == len(train[1])
    plain = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="none")
    with pytest.raises(TracInError, match="different precondition"):
        plain.query(tmp_path / "index", test_set, top_k=3)


def test_bad_settings_are_refused():
    model, _, ckpts, _, _, _ = case("cnn")
    with pytest.raises(TracInError, match=r"covers Linear and Conv layers only, but bn1 \(BatchNorm2d\)"):
        TracIn(model, ckpts, layers="all", device=DEVICE, progress=False, precondition="kfac")
    with pytest.raises(TracInError, match="precondition='shampoo' is not one of auto, kfac, none"):
        TracIn(model, ckpts, layers="last", device=DEVICE, progress=False, precondition="shampoo")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TracInError, match="damping must be a positive number"):
            ScoringConfig(damping=bad)
    with pytest.raises(TracInError, match="fit_preconditioner needs precondition='kfac'"):
        TracIn(model, ckpts, layers="last", device=DEVICE, progress=False, precondition="none").fit_preconditioner(TensorDataset(torch.zeros(2, 3, 8, 10)))


def test_auto_is_kfac_over_linear_and_conv_layers_unless_others_carry_the_parameters():
    """The default: the CNN's batch and group norms (a few parameters) are left out and named; a model whose embedding holds
    most of its parameters gets plain TracIn."""
    model, layers, ckpts, raw, train, test = case("cnn")
    want = kfac_reference_matrix(model, raw, CNN_LAYERS, train, test, damping=0.1)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=8, progress=False)
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL
    assert [row["name"] for row in tr.scope()] == CNN_LAYERS
    assert tr.preconditioner.describe()["left_out"] == ["bn1", "gn"]
    embedded = torch.nn.Sequential(torch.nn.Embedding(500, 16), torch.nn.Flatten(), torch.nn.Linear(32, 3))
    plain = TracIn(embedded, perturbed_checkpoints(embedded, [0.1])[0], device=DEVICE, progress=False)
    assert plain.preconditioner is None and len(plain.scope()) == 2


def test_whiteners_of_all_checkpoints_at_once_equal_one_checkpoint_at_a_time():
    """The batched fit groups a layer's factors by shape over the checkpoints; one checkpoint lacks a layer."""
    g = torch.Generator().manual_seed(1)
    sums = [CovarianceSums(torch.float64, torch.device("cpu")) for _ in range(3)]
    for c, s in enumerate(sums):
        for name, da in (("a", 4), ("b", 6)) if c != 1 else (("a", 4),):
            s.add(name, torch.randn(7, 1, 2, da, generator=g), torch.randn(7, 1, 2, 3, generator=g), ones=name == "b")
        s.count = 7
    together = fit_whiteners(sums, 0.1, torch.device("cpu"), torch.float64)
    assert [sorted(w) for w in together] == [["a", "b"], ["a"], ["a", "b"]]
    for c, s in enumerate(sums):
        alone = fit_whiteners([s], 0.1, torch.device("cpu"), torch.float64)[0]
        for name, (inputs, outputs) in alone.items():
            W_in, W_out, P_in, P_out = inputs.whitener(), outputs.whitener(), inputs.inverse(), outputs.inverse()
            S_in = s.sums[name][0][0] / 7
            # the statistics are products of float32 factors, symmetric only to float32 rounding (~1e-8 relative, which
            # a BLAS with other kernels leaves elsewhere); the whitener inverts the symmetric part, and so does this
            S_in = (S_in + S_in.T) / 2
            damped = S_in + 0.1 * torch.diagonal(S_in).mean() * torch.eye(P_in.shape[-1], dtype=torch.float64)
            tol = inverse_tolerance(damped)  # the output factors' damped inverses are as well conditioned or better here
            assert matrix_rel_err(P_in, W_in @ W_in.transpose(1, 2)) <= tol and matrix_rel_err(P_out, W_out @ W_out.transpose(1, 2)) <= tol
            assert matrix_rel_err(P_in[0], torch.linalg.inv(damped)) <= tol
            # batched and one-at-a-time factorisations may take different BLAS paths: equal to the same bound
            assert all(matrix_rel_err(x.inverse(), y.inverse()) <= tol and matrix_rel_err(x.whitener(), y.whitener()) <= tol
                       for x, y in zip(together[c][name], alone[name]))


class Branchy(torch.nn.Module):
    """Runs ``a`` only on inputs whose first feature is large, else ``b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) if bool(x[0, 0] > 100) else self.b(x)


def test_a_layer_the_fit_never_reached_is_named():
    model = Branchy()
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    train = TensorDataset(torch.randn(6, 4), torch.randint(0, 3, (6,)))
    test = TensorDataset(torch.randn(2, 4) + torch.tensor([200.0, 0, 0, 0]), torch.randint(0, 3, (2,)))
    tr = TracIn(model, ckpts, layers=["a", "b"], device=DEVICE, batch_size=3, progress=False, precondition="kfac")
    with pytest.raises(TracInError, match="Layer 'a' never ran while K-FAC was fitted"):
        tr.influence_matrix(train, test)


@pytest.mark.parametrize("budget, reads_per_example", [(None, 2), (1000, 4)])
def test_fit_self_influence_and_stores_read_the_data_once(budget, reads_per_example, tmp_path):
    """Two checkpoints: the fit reads the data once when both checkpoints' statistics fit in the budget
    (else once more per checkpoint, after judging on the first group: 1 + 2), then self-influence and
    a gradient store read it once each."""
    model, layers, ckpts, raw, train, test = case("mlp")
    want_self = kfac_reference_matrix(model, raw, layers, train, test, damping=0.1, self_only=True)
    data = CountingDataset(*train)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac",
                memory_budget=budget)
    assert rel_err(tr.self_influence(data), want_self) <= TOL
    assert data.reads == reads_per_example * len(data)  # 21 small examples form one group
    tr.build_index(data, tmp_path / "index")
    assert data.reads == (reads_per_example + 1) * len(data)  # fitted already: one pass writes the index
    saved = tr.query(tmp_path / "index", TensorDataset(*test), top_k=3)
    want = kfac_reference_matrix(model, raw, layers, train, test, damping=0.1)
    assert rel_err(saved.proponents.values, want.topk(3, dim=1).values) <= TOL


@pytest.mark.parametrize("budget, train_examples_run", [(None, 8 + 2 * 21), (1000, 8 + 21 + 2 * 21 + 2 * 21)])
def test_influence_pairs_the_fit_pass_training_factors_while_they_fit_the_budget(budget, train_examples_run):
    """Two checkpoints, 21 training examples; the first batch (8) is probed once for the layers' modes. Budget
    enough: the fit runs the examples at each checkpoint and the influence pass pairs those factors (no second
    run). Budget of 1000 bytes: the fit judges after checkpoint 0's group that the statistics do not fit (21) and
    reads once per checkpoint (2 x 21); keeping the factors would pass the budget, which the first batch already
    shows, so the influence pass runs the examples again (2 x 21). The scores are the reference's either way."""
    model, layers, ckpts, raw, train, test = case("mlp")
    want = kfac_reference_matrix(model, raw, layers, train, test, damping=0.1)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac",
                memory_budget=budget)
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL
    assert sum(b for b in seen if b in (8, 5)) == train_examples_run  # training batches of 8, 8, 5; the test's is 6


def test_keeping_the_fit_factors_is_given_up_at_the_first_batch_when_the_whole_fit_would_not_fit():
    from types import SimpleNamespace

    from tracin.engine.preconditioning import Preconditioning

    raw = {"fc": (torch.zeros(10, 1, 1, 25), torch.zeros(10, 1, 1, 25), False, True)}  # 10 examples, 2,000 bytes
    for budget, kept in ((4 * 2000 * 50, True), (4 * 2000 * 50 - 4, False)):  # 50 batches' worth over the whole fit
        owner = Preconditioning(SimpleNamespace(budget=budget), kfac=None)
        owner.kept, owner.expected_examples = {}, 500
        owner.keep(0, 0, raw)
        assert (owner.kept is not None) == kept and owner.kept_bytes == (2000 if kept else 0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_few_training_examples_take_the_low_rank_inverse_and_match_the_reference(kind, monkeypatch):
    import tracin.layers.precondition as precondition

    taken = []
    exact_low_rank = precondition.low_rank_inverses
    monkeypatch.setattr(precondition, "low_rank_inverses", lambda X, *args: taken.append(X.shape) or exact_low_rank(X, *args))
    model, layers, ckpts, raw, train, test = case(kind, n_train=3)
    want = kfac_reference_matrix(model, raw, layers, train, test, damping=0.1)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=8, progress=False, precondition="kfac")
    assert rel_err(tr.influence_matrix(TensorDataset(*train), TensorDataset(*test)), want) <= TOL
    assert rel_err(tr.self_influence(TensorDataset(*train)), kfac_reference_matrix(
        model, raw, layers, train, test, damping=0.1, self_only=True)) <= TOL
    assert taken and all(2 * rows <= width for _, rows, width in taken)  # the low-rank path ran, on few rows only

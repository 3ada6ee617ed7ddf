"""Random projection and sampling: explicit approximations with statistical guarantees."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import close, DEVICE, make_case, MLP, perturbed_checkpoints, random_sets
from tracin import TracIn, TracInError
from tracin.layers.projection import Projector
from tracin.engine.sampling import sample_indices


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sparse"])
def test_projected_inner_products_are_unbiased(kind):
    # E[<R a, R b>] = <a, b>: the mean over many seeds falls within a few standard errors of the truth.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, generator=g, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)
    b = b + 0.8 * a  # a clearly non-zero inner product
    est = []
    for seed in range(400):
        R = Projector(64, kind, seed).matrix("k", 64, 300, torch.device("cpu"), torch.float64)
        est.append(float((R @ a) @ (R @ b)))
    est = np.array(est)
    truth = float(a @ b)
    assert abs(est.mean() - truth) < 4 * est.std(ddof=1) / np.sqrt(len(est))


def test_factor_projection_is_unbiased_for_a_linear_layer():
    # LoGra-style P_out G P_in^T with the bias column: unbiased for the exact ghost score.
    model, train, test = make_case("mlp", 12, 3)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    exact = TracIn(model, ckpts, layers="last", device=DEVICE, progress=False, precondition="none").influence_matrix(TensorDataset(*train), TensorDataset(*test))
    runs = torch.stack([TracIn(model, ckpts, layers="last", device=DEVICE, progress=False, projection_dim=6, seed=s, precondition="none")
                        .influence_matrix(TensorDataset(*train), TensorDataset(*test)) for s in range(300)])
    se = runs.std(0) / np.sqrt(len(runs))
    assert ((runs.mean(0) - exact).abs() <= 5 * se + 1e-6).float().mean() >= 0.97


def test_projection_is_deterministic_given_a_seed_and_differs_across_seeds():
    model, train, test = make_case("cnn")
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    run = lambda seed: TracIn(model, ckpts, device=DEVICE, progress=False, projection_dim=16, seed=seed, precondition="none").influence_matrix(  # noqa: E731
        TensorDataset(*train), TensorDataset(*test))
    first, again = run(3), run(3)
    if DEVICE == "cpu":
        assert torch.equal(first, again)
    else:  # cuDNN/cuBLAS may pick other algorithms (summation orders) from run to run
        assert close(first, again)
    assert not torch.allclose(first, run(4))


def test_agreement_improves_with_dimension():
    torch.manual_seed(0)
    model = MLP(d_in=40, hidden=64, classes=8)
    train, test = random_sets(200, 10, 40, 8, seed=1)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.1])
    exact = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").influence_matrix(train, test)
    errors = []
    # ghost-form layers (here: all) keep k_in + k_out = dim; widths are 41+64, 65+64 and 65+8
    for dim in (4, 16, 40, 80, 130):
        approx = TracIn(model, ckpts, device=DEVICE, progress=False, projection_dim=dim, seed=0, precondition="none").influence_matrix(train, test)
        errors.append(float((approx - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.5 * errors[1]
    assert errors[4] < 1e-5  # 130 >= every layer's factor width: nothing is projected


def test_projection_covers_every_layer_kind_and_small_layers_stay_exact():
    model, train, test = make_case("seq")
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    exact = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").influence_matrix(TensorDataset(*train), TensorDataset(*test))
    huge = TracIn(model, ckpts, device=DEVICE, progress=False, projection_dim=10**6, precondition="none").influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert close(huge, exact)  # every layer fits: nothing is projected
    small = TracIn(model, ckpts, device=DEVICE, progress=False, projection_dim=4, precondition="none").influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert small.shape == exact.shape and torch.isfinite(small).all() and not torch.allclose(small, exact)


def test_blockwise_projection_of_materialised_gradients_matches_one_matrix():
    from tracin.layers.factors import GradFactors
    import tracin.layers.projection as P

    G = torch.randn(5, 1000, dtype=torch.float64)
    proj = Projector(8, "gaussian", 1)
    old = P.BLOCK_ELEMENTS
    try:
        P.BLOCK_ELEMENTS = 8 * 300  # blocks of 300 columns
        blocked = proj.grads("n", GradFactors(G)).G
    finally:
        P.BLOCK_ELEMENTS = old
    whole = sum(G[:, s:s + 300] @ proj.matrix(f"n:grad:{s}", 8, min(300, 1000 - s), torch.device("cpu"), torch.float64).T
                for s in range(0, 1000, 300))
    assert torch.allclose(blocked, whole)


def test_stratified_sampling_keeps_proportions_and_indices():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx = sample_indices(100, 0.5, seed=0, strata=labels)
    counts = np.bincount(labels[idx].numpy())
    assert counts.tolist() == [30, 15, 5] and np.all(np.diff(idx) > 0)
    assert len(sample_indices(100, 0.3, seed=1)) == 30
    with pytest.raises(TracInError, match="sample_rate"):
        sample_indices(100, 0.0)


def test_sampled_influence_reports_full_set_indices():
    model, train, test = make_case("mlp", 40, 5)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    full = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none")
    M = full.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    tr = TracIn(model, ckpts, device=DEVICE, progress=False, sample_rate=0.5, stratify_by="label", seed=2, precondition="none")
    res = tr.influence(TensorDataset(*train), TensorDataset(*test), top_k=4)
    sampled = torch.as_tensor(tr.last_stats["sampled_indices"])
    assert len(sampled) < 40
    sub = M[:, sampled]
    assert torch.equal(res.proponents.indices, sampled[sub.argsort(1, descending=True)[:, :4]])
    Ms = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert torch.isnan(Ms).sum() == 5 * (40 - len(sampled))
    assert close(Ms[:, sampled], sub)
    s = tr.self_influence(TensorDataset(*train))
    assert torch.isnan(s).sum() == 40 - len(sampled)

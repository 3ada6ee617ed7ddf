"""Normalised score variants (cosine, train) against the float64 reference."""
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import all_module_names, DEVICE, make_case, perturbed_checkpoints, reference_matrix, rel_err
from tracin import TracIn, TracInError


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("normalize", ["cosine", "train"])
def test_normalized_matrix_matches_reference(kind, normalize):
    model, train, test = make_case(kind, 17, 5)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])
    want = reference_matrix(model, raw, all_module_names(model), train, test, normalize=normalize)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, memory_budget=4_000, progress=False, normalize=normalize, precondition="none")
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert rel_err(got, want) <= 1e-4
    res = tr.influence(TensorDataset(*train), TensorDataset(*test), top_k=3, self_influence=True)
    assert torch.equal(res.proponents.indices, got.argsort(1, descending=True)[:, :3])
    # self-influence stays the plain TracIn(z, z, precondition="none")
    plain = reference_matrix(model, raw, all_module_names(model), train, train).diagonal()
    assert rel_err(res.self_influence, plain) <= 1e-4


def test_cosine_scores_are_bounded_by_the_learning_rate_sum():
    model, train, test = make_case("mlp", 20, 4)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.3])
    M = TracIn(model, ckpts, device=DEVICE, progress=False, normalize="cosine", precondition="none").influence_matrix(
        TensorDataset(*train), TensorDataset(*test))
    assert M.abs().max() <= 0.4 + 1e-5


def test_normalized_index_matches_streaming(tmp_path):
    model, train, test = make_case("mlp", 30, 5)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = TensorDataset(*train), TensorDataset(*test)
    for normalize in ("cosine", "train"):
        tr = TracIn(model, ckpts, device=DEVICE, progress=False, normalize=normalize, precondition="none")
        tr.build_index(train, tmp_path / normalize)
        stored = tr.query(tmp_path / normalize, test, top_k=30)
        M = tr.influence_matrix(train, test)
        assert torch.allclose(stored.proponents.values, M.sort(1, descending=True).values, rtol=1e-4, atol=1e-5)


def test_unknown_normalization_is_refused():
    model, _, _ = make_case("mlp", 4, 2)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    with pytest.raises(TracInError, match="normalize='l2'"):
        TracIn(model, ckpts, device=DEVICE, normalize="l2", precondition="none")

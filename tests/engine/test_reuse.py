"""Reusing work: cached test factors and saved (projected) training gradients."""
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import close, DEVICE, make_case, perturbed_checkpoints
from tracin import TracIn, TracInError, UnsupportedModuleError


def test_cached_test_factors_give_identical_results_with_fewer_loads():
    model, train, test = make_case("cnn", 30, 6)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=8, progress=False, precondition="none")
    plain = tr.influence(train, test, top_k=5)
    loads_plain = tr.last_stats["checkpoint_loads"]
    tr.cache_test(test)
    again = tr.influence(train, test, top_k=5)
    assert torch.equal(again.proponents.indices, plain.proponents.indices)
    assert close(again.proponents.values, plain.proponents.values)
    assert tr.last_stats["checkpoint_loads"] < loads_plain
    other = TensorDataset(*make_case("cnn", 30, 4)[2])  # another test set is not served from the cache
    assert tr.influence(train, other, top_k=2).proponents.values.shape == (4, 2)
    tr.clear_cache()
    assert tr._cached_test is None


def test_saved_projected_gradients_score_new_test_sets(tmp_path):
    model, train, test = make_case("mlp", 40, 6)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.3])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=16, progress=False, projection_dim=32, seed=5, precondition="none")
    tr.save_train_gradients(train, tmp_path / "store")
    from_store = tr.influence_from_saved(tmp_path / "store", test, top_k=4)
    streaming = TracIn(model, ckpts, device=DEVICE, batch_size=16, progress=False, projection_dim=32, seed=5, precondition="none")
    streaming.projector = tr.projector.for_vectors()  # the store's sizing (k_in * k_out = dim)
    direct = streaming.influence_matrix(train, test)  # same projection, computed the streaming way
    order = direct.argsort(1, descending=True)[:, :4]
    assert torch.equal(from_store.proponents.indices, order)
    assert torch.allclose(from_store.proponents.values, direct.gather(1, order), rtol=1e-4, atol=1e-5)
    # a scorer with another projection seed (or checkpoints) must not reuse the store
    other = TracIn(model, ckpts, device=DEVICE, progress=False, projection_dim=32, seed=6, precondition="none")
    with pytest.raises(TracInError, match="different projection"):
        other.influence_from_saved(tmp_path / "store", test, top_k=4)
    moved, _ = perturbed_checkpoints(model, [0.1, 0.3], seed=9)
    with pytest.raises(TracInError, match="different checkpoints"):
        TracIn(model, moved, device=DEVICE, progress=False, projection_dim=32, seed=5, precondition="none").influence_from_saved(tmp_path / "store", test)
    with pytest.raises(TracInError, match="no complete gradient store"):
        tr.influence_from_saved(tmp_path / "nothing", test)


def test_exact_store_equals_exact_matrix(tmp_path):
    model, train, test = make_case("cnn", 20, 5)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none")
    tr.save_train_gradients(train, tmp_path / "s")
    res = tr.influence_from_saved(tmp_path / "s", test, top_k=20)
    M = tr.influence_matrix(train, test)
    assert torch.allclose(res.proponents.values, M.sort(1, descending=True).values, rtol=1e-4, atol=1e-5)


def test_embeddings_cannot_be_saved(tmp_path):
    model, train, _ = make_case("seq", 10, 2)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").save_train_gradients(TensorDataset(*train), tmp_path / "s")

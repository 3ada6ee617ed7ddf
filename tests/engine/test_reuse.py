"""Reusing work: cached test factors (the gradient index: test_index.py)."""
import torch
from torch.utils.data import TensorDataset

from helpers import close, DEVICE, make_case, perturbed_checkpoints
from tracin import TracIn


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

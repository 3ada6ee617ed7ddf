"""Reduced precision (autocast) and recovery from out-of-memory tiles."""
import pytest
import torch
from torch.utils.data import TensorDataset

from models import perturbed_checkpoints
from reference import reference_matrix, rel_err
from test_exact import all_module_names, make_case
from tracin import TracIn, TracInError
from tracin.audit import compare


@pytest.mark.parametrize("precision,tol", [("bf16", 0.15), ("fp16", 0.08)])
def test_reduced_precision_is_close_to_exact(precision, tol):
    model, train, test = make_case("cnn", 40, 8)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])
    want = reference_matrix(model, raw, all_module_names(model), train, test)
    got = TracIn(model, ckpts, device="cpu", batch_size=8, progress=False, precision=precision).influence_matrix(
        TensorDataset(*train), TensorDataset(*test))
    assert got.dtype == torch.float32
    assert 1e-6 < rel_err(got, want) < tol  # approximate, but not wildly
    assert compare(want.float(), got, top=5)["spearman"] > 0.99


def test_out_of_memory_tiles_are_halved(monkeypatch):
    import tracin.engine as E

    model, train, test = make_case("mlp", 40, 6)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device="cpu", batch_size=4, progress=False)
    want = tr.influence(train, test, top_k=5, self_influence=True)
    original = E.Scheduler._score_tile

    def small_memory(self, tile, cache, m, with_self):
        if sum(b[0].shape[0] for _, b in tile) > 12:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original(self, tile, cache, m, with_self)

    monkeypatch.setattr(E.Scheduler, "_score_tile", small_memory)
    with pytest.warns(UserWarning, match="out of memory on a tile of 40 training examples; halving"):
        got = tr.influence(train, test, top_k=5, self_influence=True)
    assert tr.last_stats["tiles"] > 1
    assert torch.equal(got.proponents.indices, want.proponents.indices)
    assert torch.allclose(got.self_influence, want.self_influence)

    def no_memory(self, tile, cache, m, with_self):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(E.Scheduler, "_score_tile", no_memory)
    with pytest.warns(UserWarning), pytest.raises(TracInError, match="single batch of 4 examples; lower --batch_size"):
        tr.influence(train, test, top_k=5)


def test_unknown_precision_is_refused():
    model, _, _ = make_case("mlp", 4, 2)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    with pytest.raises(TracInError, match="precision='int8'"):
        TracIn(model, ckpts, device="cpu", precision="int8")


def test_tiles_after_an_out_of_memory_split_use_the_smaller_size(monkeypatch):
    import warnings

    import tracin.engine as E

    model, train, test = make_case("mlp", 40, 6)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device="cpu", batch_size=4, memory_budget=4000, progress=False)  # tiles of 12
    want = tr.influence(train, test, top_k=3)
    original = E.Scheduler._score_tile
    sizes = []

    def small_memory(self, tile, cache, m, with_self):
        sizes.append(self._span(tile)[1])
        if sizes[-1] > 8:
            raise torch.cuda.OutOfMemoryError("simulated")
        return original(self, tile, cache, m, with_self)

    monkeypatch.setattr(E.Scheduler, "_score_tile", small_memory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = tr.influence(train, test, top_k=3)
    assert sizes[0] == 12
    assert len([w for w in caught if "out of memory" in str(w.message)]) == 1  # only the first tile is split
    assert max(sizes[1:]) <= 8
    assert torch.equal(got.proponents.indices, want.proponents.indices)

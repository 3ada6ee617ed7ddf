"""Reduced precision (autocast) and recovery from out-of-memory tiles."""
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import close, all_module_names, DEVICE, make_case, perturbed_checkpoints, reference_matrix, rel_err
from tracin import TracIn, TracInError
from tracin.workflows.audit import compare


@pytest.mark.parametrize("precision,tol", [("bf16", 0.25), ("fp16", 0.08)])  # bf16: 0.07 on a CPU, 0.17 on an H100
def test_reduced_precision_is_close_to_exact(precision, tol):
    model, train, test = make_case("cnn", 40, 8)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])
    want = reference_matrix(model, raw, all_module_names(model), train, test)
    got = TracIn(model, ckpts, device=DEVICE, batch_size=8, progress=False, precision=precision, precondition="none").influence_matrix(
        TensorDataset(*train), TensorDataset(*test))
    assert got.dtype == torch.float32
    assert 1e-6 < rel_err(got, want) < tol  # approximate, but not wildly
    assert compare(want.float(), got, top=5)["spearman"] > 0.98  # bf16 on an H100: 0.989


def test_out_of_memory_tiles_are_halved(monkeypatch):
    import tracin.engine.scheduler as E

    model, train, test = make_case("mlp", 40, 6)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, progress=False, precondition="none")
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
    assert close(got.self_influence, want.self_influence)

    def no_memory(self, tile, cache, m, with_self):
        raise torch.cuda.OutOfMemoryError("simulated")

    monkeypatch.setattr(E.Scheduler, "_score_tile", no_memory)
    with pytest.warns(UserWarning), pytest.raises(TracInError, match="single batch of 4 examples; lower --batch_size"):
        tr.influence(train, test, top_k=5)


def test_unknown_precision_is_refused():
    model, _, _ = make_case("mlp", 4, 2)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    with pytest.raises(TracInError, match="precision='int8'"):
        TracIn(model, ckpts, device=DEVICE, precision="int8", precondition="none")


def test_tiles_after_an_out_of_memory_split_use_the_smaller_size(monkeypatch):
    import warnings

    import tracin.engine.scheduler as E

    model, train, test = make_case("mlp", 40, 6)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    train, test = TensorDataset(*train), TensorDataset(*test)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, memory_budget=4000, progress=False, precondition="none")  # tiles of 12
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


def _math_flags():
    """The fp32_precision settings scoring may change (torch >= 2.9), as one tuple."""
    b = torch.backends
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision,
            b.mkldnn.matmul.fp32_precision)


@pytest.mark.skipif(not hasattr(torch.backends.cudnn.conv, "fp32_precision"), reason="torch < 2.9 has no per-op fp32_precision")
@pytest.mark.parametrize("precision,inside", [("fp32", ("ieee", "ieee", "ieee", "ieee")),
                                              ("tf32", ("tf32", "tf32", "tf32", "tf32")),
                                              ("bf16", ("tf32", "tf32", "tf32", "tf32"))])
def test_float32_math_is_set_while_scoring_and_restored(precision, inside):
    """fp32 turns TF32 off while scoring even where the process allows it (here: everywhere, as
    torch.set_float32_matmul_precision("high") and cuDNN's default do); tf32 turns it on; autocast
    precisions leave the settings alone. Afterwards the process's settings are back, also after an error."""
    model, train, test = make_case("mlp", 12, 3)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    b = torch.backends
    before = _math_flags()
    try:
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = "tf32", "tf32"
        b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "tf32"
        seen = []

        def task(net, batch):
            seen.append(_math_flags())
            x, y = batch
            return torch.nn.functional.cross_entropy(net(x), y, reduction="none")

        tr = TracIn(model, ckpts, task=task, device=DEVICE, batch_size=4, progress=False, precision=precision, precondition="none")
        tr.influence(TensorDataset(*train), TensorDataset(*test), top_k=2)
        assert seen and set(seen) == {inside}
        assert _math_flags() == ("tf32",) * 4

        def failing(net, batch):
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            TracIn(model, ckpts, task=failing, device=DEVICE, progress=False, precondition="none").self_influence(TensorDataset(*train))
        assert _math_flags() == ("tf32",) * 4
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.mkldnn.matmul.fp32_precision = before


def test_fp16_loss_scaling_keeps_small_gradients():
    """Output-gradients of 1e-5 (a loss scaled down, as a well-fit model's are) square to below fp16's
    smallest number, so an unscaled fp16 pass scores most pairs 0; with loss scaling and fp32 factors
    fp16 tracks the float64 reference."""
    model, train, test = make_case("mlp", 40, 8)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])

    def small(out, y):
        return 1e-5 * torch.nn.functional.cross_entropy(out, y, reduction="none")

    want = reference_matrix(model, raw, all_module_names(model), train, test, loss=small)
    got = TracIn(model, ckpts, task=lambda net, batch: small(net(batch[0]), batch[1]), device=DEVICE, batch_size=8,
                 progress=False, precision="fp16", precondition="none").influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert (got != 0).all()
    assert rel_err(got, want) < 0.02
    assert compare(want.float(), got, top=5)["spearman"] > 0.99


def test_fp16_gradient_that_is_never_finite_is_refused():
    model, train, _ = make_case("mlp", 8, 2)
    ckpts, _ = perturbed_checkpoints(model, [0.1])

    def kinked(net, batch):  # sqrt at 0: an infinite gradient whatever the loss scale
        out = net(batch[0])
        return (out - out.detach()).abs().sqrt().sum(1) + torch.nn.functional.cross_entropy(out, batch[1], reduction="none")

    with pytest.raises(TracInError, match="not finite in fp16 at any loss scale"):
        TracIn(model, ckpts, task=kinked, device=DEVICE, progress=False, precision="fp16", precondition="none").self_influence(TensorDataset(*train))


def test_fp16_warns_when_gradients_stay_flushed():
    """A loss of ~1e-40 has gradients that no loss scale within float32 brings into fp16's range."""
    model, train, test = make_case("mlp", 8, 2)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    task = lambda net, batch: 1e-40 * torch.nn.functional.cross_entropy(net(batch[0]), batch[1], reduction="none")  # noqa: E731
    with pytest.warns(UserWarning, match=r"fp16: the output-gradients of \d+ example\(s\) of a batch stayed 0"):
        TracIn(model, ckpts, task=task, device=DEVICE, progress=False, precision="fp16", precondition="none").self_influence(TensorDataset(*train))

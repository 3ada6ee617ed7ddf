"""Scheduler behaviour: exact top-k, self-influence, tiling, checkpoint loads."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import close, CNN, DEVICE, make_case, MLP, perturbed_checkpoints
from tracin import TracIn


def _sets(kind="mlp", n_train=41, n_test=9):
    model, train, test = make_case(kind, n_train, n_test)
    return model, TensorDataset(*train), TensorDataset(*test)


def test_topk_equals_argsort_of_full_matrix():
    model, train, test = _sets()
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.05, 0.2])
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=6, progress=False, precondition="none")
    M = tr.influence_matrix(train, test)
    res = tr.influence(train, test, top_k=7)
    order = torch.argsort(M, dim=1, descending=True)
    assert torch.equal(res.proponents.indices, order[:, :7])
    assert close(res.proponents.values, M.gather(1, order[:, :7]))
    order_neg = torch.argsort(M, dim=1)
    assert torch.equal(res.opponents.indices, order_neg[:, :7])
    assert close(res.opponents.values, M.gather(1, order_neg[:, :7]))
    assert (res.proponents.values[:, :-1] >= res.proponents.values[:, 1:]).all()
    assert (res.opponents.values[:, :-1] <= res.opponents.values[:, 1:]).all()


def test_topk_is_of_checkpoint_sum_not_merged_per_checkpoint_lists():
    # With several checkpoints the exact top-1 of the sum differs from the best per-checkpoint entry
    # for some test example; the engine must return the former.
    model, train, test = _sets()
    ckpts, _ = perturbed_checkpoints(model, [1.0, 1.0, 1.0], scale=1.0)
    M = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").influence_matrix(train, test)
    per_ckpt = [TracIn(model, [c], device=DEVICE, progress=False, precondition="none").influence_matrix(train, test) for c in ckpts]
    res = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none").influence(train, test, top_k=1)
    assert torch.equal(res.proponents.indices[:, 0], M.argmax(1))
    assert close(sum(per_ckpt), M)
    # the case matters: some checkpoint's own best proponent is not the best of the sum
    assert any(bool((m.argmax(1) != M.argmax(1)).any()) for m in per_ckpt)

@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_self_influence_is_matrix_diagonal(kind):
    model, train, _ = _sets(kind, n_train=17)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.3])
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, progress=False, precondition="none")
    diag = tr.influence_matrix(train, train).diagonal()
    s = tr.self_influence(train)
    assert close(s, diag)
    both = tr.influence(train, train, top_k=3, self_influence=True)
    assert close(both.self_influence, s)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_results_do_not_depend_on_batch_size_or_budget(kind):
    model, train, test = _sets(kind)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.05])
    base = TracIn(model, ckpts, device=DEVICE, batch_size=64, progress=False, precondition="none")
    M = base.influence_matrix(train, test)
    ref = base.influence(train, test, top_k=5)
    assert base.last_stats["tiles"] == 1 and base.last_stats["test_chunks"] == 1
    for bs, budget in [(1, 1), (4, 2_000), (7, 50_000), (13, None)]:
        tr = TracIn(model, ckpts, device=DEVICE, batch_size=bs, memory_budget=budget, progress=False, precondition="none")
        assert close(tr.influence_matrix(train, test), M)
        res = tr.influence(train, test, top_k=5)
        assert torch.equal(res.proponents.indices, ref.proponents.indices)
        assert torch.equal(res.opponents.indices, ref.opponents.indices)
        assert close(res.proponents.values, ref.proponents.values)
        if budget is not None and budget <= 2_000:
            assert tr.last_stats["tiles"] > 1 and tr.last_stats["test_chunks"] > 1


def test_checkpoints_are_loaded_once_per_tile_not_per_batch():
    model, train, test = _sets("mlp", n_train=40, n_test=8)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2, 0.3])
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, progress=False, precondition="none")
    tr.influence(train, test, top_k=2)
    stats = tr.last_stats
    C = 3
    # one probe load, one per checkpoint per test chunk for the test cache, one per checkpoint per tile
    assert stats["checkpoint_loads"] == 1 + C * stats["test_chunks"] + C * stats["tiles"] * stats["test_chunks"]
    assert stats["tiles"] == 1  # 10 train batches share one tile
    tr.self_influence(train)
    assert tr.last_stats["checkpoint_loads"] == C


def test_raw_test_batches_are_released_once_staged(monkeypatch):
    """With the staging bound at one byte, each raw test batch is dropped once its factors for
    every checkpoint exist: while the loader builds batch k, at most the batch before it is alive.
    Scores and top-k are those of the all-at-once run."""
    import gc
    import weakref

    from tracin.engine import blocks

    model, train, test = _sets("mlp", n_train=30, n_test=21)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.2])
    ref = TracIn(model, ckpts, device=DEVICE, batch_size=4, progress=False, precondition="none")
    M, res_ref = ref.influence_matrix(train, test), ref.influence(train, test, top_k=3)
    alive_at_collate = []
    batches = []

    def collate(items):
        gc.collect()
        alive_at_collate.append(sum(r() is not None for r in batches))
        x = torch.stack([i[0] for i in items])
        batches.append(weakref.ref(x))
        return x, torch.stack([i[1] for i in items])

    monkeypatch.setattr(blocks, "STAGING_BYTES", 1)
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, progress=False, precondition="none")
    res = tr.influence(train, DataLoader(test, batch_size=4, collate_fn=collate), top_k=3)
    assert max(alive_at_collate) <= 1
    n_batches = len(batches)
    assert n_batches == 6
    # one probe load, every checkpoint once per staged batch, then once per checkpoint per tile
    assert tr.last_stats["checkpoint_loads"] == 1 + 2 * n_batches + 2 * tr.last_stats["tiles"]
    assert torch.equal(res.proponents.indices, res_ref.proponents.indices)
    assert close(res.proponents.values, res_ref.proponents.values)
    assert close(tr.influence_matrix(train, DataLoader(test, batch_size=4)), M)


def test_dataloader_input_and_kernel_choice():
    model = MLP()
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(20, 12, generator=g), torch.randint(0, 5, (20,), generator=g))
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    tr = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none")
    a = tr.self_influence(DataLoader(train, batch_size=3))
    b = tr.self_influence(train)
    assert close(a, b)
    assert {row["name"]: row["kernel"] for row in tr.scope()} == {"fc1": "ghost", "fc2": "ghost", "head": "ghost"}
    assert tr.num_parameters == sum(p.numel() for p in model.parameters())


def test_conv_kernel_choice_follows_shapes():
    model = CNN()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, 8, 10, generator=g), torch.randint(0, 4, (6,), generator=g))
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    tr = TracIn(model, ckpts, device=DEVICE, progress=False, precondition="none")
    tr.influence(data, data, top_k=2)
    kinds = {row["name"]: row["kernel"] for row in tr.scope()}
    assert kinds["conv1"] == "materialize"  # 20 positions, 28 x 8 weights: T^2 (da + dd) > da * dd
    assert kinds["fc"] == "ghost"
    assert kinds["bn1"] == "materialize"


def test_tensor_datasets_are_batched_by_slicing():
    from tracin.engine.loaders import make_loader

    data = TensorDataset(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    batches = list(make_loader(data, 4, "training"))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    sub = torch.utils.data.Subset(data, [1, 3, 5])
    assert [b[1].tolist() for b in make_loader(sub, 2, "training")] == [[1, 3], [5]]


def test_full_matrix_written_to_disk_in_tiles(tmp_path):
    import numpy as np

    model, train, test = _sets("mlp", n_train=41, n_test=9)
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.05])
    tr = TracIn(model, ckpts, device=DEVICE, batch_size=4, memory_budget=3_000, progress=False, precondition="none")
    res = tr.influence(train, test, top_k=3, matrix_path=tmp_path / "m.npy")
    assert tr.last_stats["tiles"] > 1
    on_disk = np.load(tmp_path / "m.npy", mmap_mode="r")
    M = tr.influence_matrix(train, test)
    assert close(on_disk, M.numpy())
    assert torch.equal(res.proponents.indices, M.argsort(1, descending=True)[:, :3])
    assert not list(tmp_path.glob(".*tmp"))
    sampled = TracIn(model, ckpts, device=DEVICE, progress=False, sample_rate=0.5, seed=1, precondition="none")
    sampled.influence(train, test, top_k=2, matrix_path=tmp_path / "s.npy")
    s = np.load(tmp_path / "s.npy")
    cols = sampled.last_stats["sampled_indices"]
    assert np.isnan(s).sum() == 9 * (41 - len(cols)) and close(s[:, cols], M.numpy()[:, cols])

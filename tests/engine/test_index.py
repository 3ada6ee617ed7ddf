"""The gradient index: built once, queried without the training data, resumable, growable, metadata-checked."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import (CNN, DEVICE, MLP, CountingDataset, kfac_reference_matrix, make_case, perturbed_checkpoints,
                     reference_matrix, rel_err)
from tracin import TracIn, TracInError, UnsupportedModuleError
from tracin.engine.index import GradientIndex

TOL = 1e-4


def _case(kind="mlp", n_train=30, n_test=5, lrs=(0.1, 0.3)):
    model, train, test = make_case(kind, n_train, n_test)
    ckpts, raw = perturbed_checkpoints(model, list(lrs))
    return model, ckpts, raw, train, test


def _scorer(model, ckpts, **kw):
    return TracIn(model, ckpts, device=DEVICE, batch_size=8, progress=False, **kw)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_query_equals_the_float64_reference_plain_and_kfac(tmp_path, kind):
    g = torch.Generator().manual_seed(3)
    model, shape, classes, layers = ((MLP(), (12,), 5, ["fc1", "fc2", "head"]) if kind == "mlp"
                                     else (CNN(), (3, 8, 10), 4, ["conv1", "conv2", "conv3", "fc"]))
    xs, ys = torch.randn((35,) + shape, generator=g), torch.randint(0, classes, (35,), generator=g)
    train, test = (xs[:30], ys[:30]), (xs[30:], ys[30:])
    ckpts, raw = perturbed_checkpoints(model, [0.2, 0.05])
    for precondition, want in (("none", reference_matrix(model, raw, layers, train, test)),
                               ("kfac", kfac_reference_matrix(model, raw, layers, train, test))):
        directory = tmp_path / precondition
        _scorer(model, ckpts, layers=layers, precondition=precondition, memory_budget=4000).build_index(TensorDataset(*train), directory)
        assert len(json.loads((directory / "index.json").read_text())["shards"]) > 1  # the small budget makes shards
        got = _scorer(model, ckpts, layers=layers, precondition=precondition).query(directory, TensorDataset(*test), top_k=30)
        order = want.argsort(1, descending=True)
        assert torch.equal(got.proponents.indices, order[:, :30])
        assert rel_err(got.proponents.values, want.gather(1, order[:, :30])) <= TOL
        assert torch.equal(got.opponents.indices, want.argsort(1)[:, :30])


def test_self_influence_is_stored_beside_every_row(tmp_path):
    model, ckpts, _, train, test = _case()
    tr = _scorer(model, ckpts, layers="all")
    tr.build_index(TensorDataset(*train), tmp_path / "i")
    got = tr.query(tmp_path / "i", TensorDataset(*test), top_k=3, self_influence=True)
    assert rel_err(got.self_influence, tr.self_influence(TensorDataset(*train))) <= TOL


def test_projection_under_kfac_index_matches_the_streaming_scores(tmp_path):
    model, ckpts, _, train, test = _case()
    tr = _scorer(model, ckpts, layers="all", projection_dim=12)
    tr.build_index(TensorDataset(*train), tmp_path / "i")
    got = tr.query(tmp_path / "i", TensorDataset(*test), top_k=30)
    want = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert torch.equal(got.proponents.indices, want.argsort(1, descending=True)[:, :30])


def test_plain_projection_index_matches_streaming_with_the_same_sizing(tmp_path):
    model, ckpts, _, train, test = _case()
    tr = _scorer(model, ckpts, projection_dim=32, seed=5, precondition="none")
    tr.build_index(TensorDataset(*train), tmp_path / "i")
    got = tr.query(tmp_path / "i", TensorDataset(*test), top_k=4)
    streaming = _scorer(model, ckpts, projection_dim=32, seed=5, precondition="none")
    streaming.projector = tr.projector.for_vectors()  # the index's sizing (k_in * k_out = dim)
    direct = streaming.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    order = direct.argsort(1, descending=True)[:, :4]
    assert torch.equal(got.proponents.indices, order)
    assert rel_err(got.proponents.values, direct.gather(1, order)) <= TOL


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_16_bit_storage_halves_the_bytes_and_keeps_the_scores_close(tmp_path, dtype, tol):
    model, ckpts, _, train, test = _case()
    tr = _scorer(model, ckpts, precondition="none")
    tr.build_index(TensorDataset(*train), tmp_path / "f32")
    tr.build_index(TensorDataset(*train), tmp_path / dtype, dtype=dtype)
    full = tr.query(tmp_path / "f32", TensorDataset(*test), top_k=30)
    half = tr.query(tmp_path / dtype, TensorDataset(*test), top_k=30)
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("shard-*[0-9].npy")) for d in ("f32", dtype)}
    assert size[dtype] < 0.6 * size["f32"]
    scores = torch.zeros_like(full.proponents.values).scatter_(1, half.proponents.indices, half.proponents.values)
    exact = torch.zeros_like(scores).scatter_(1, full.proponents.indices, full.proponents.values)
    assert rel_err(scores, exact) <= tol
    assert rel_err(scores, exact) > 0  # the storage is 16-bit indeed
    with pytest.raises(TracInError, match="stores float32, not float16"):
        tr.build_index(TensorDataset(*train), tmp_path / "f32", dtype="float16")


def test_an_interrupted_build_resumes_with_only_the_missing_shards(tmp_path, monkeypatch):
    model, ckpts, _, train, test = _case(n_train=40)
    kw = dict(precondition="kfac", layers="all", memory_budget=6000)
    written = []
    real = GradientIndex.write_shard

    def dies_after_two(self, shard, rows, selfs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(shard["name"])
        real(self, shard, rows, selfs)

    monkeypatch.setattr(GradientIndex, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _scorer(model, ckpts, **kw).build_index(CountingDataset(*train), tmp_path / "i")
    with pytest.raises(TracInError, match="incomplete"):
        _scorer(model, ckpts, **kw).query(tmp_path / "i", TensorDataset(*test), top_k=3)
    monkeypatch.setattr(GradientIndex, "write_shard", real)
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    done = sum(s["rows"] for s in meta["shards"] if s["name"] in written)
    data = CountingDataset(*train)
    _scorer(model, ckpts, **kw).build_index(data, tmp_path / "i")  # no refit: the whiteners are in the index
    assert data.reads == len(data) - done
    _scorer(model, ckpts, **kw).build_index(TensorDataset(*train), tmp_path / "whole")
    a = _scorer(model, ckpts, **kw).query(tmp_path / "i", TensorDataset(*test), top_k=40)
    b = _scorer(model, ckpts, **kw).query(tmp_path / "whole", TensorDataset(*test), top_k=40)
    assert torch.equal(a.proponents.indices, b.proponents.indices)
    assert rel_err(a.proponents.values, b.proponents.values) <= TOL


def test_added_examples_follow_the_existing_rows_with_the_index_whiteners(tmp_path):
    model, ckpts, _, (x, y), test = _case(n_train=40)
    first, later = TensorDataset(x[:25], y[:25]), TensorDataset(x[25:], y[25:])
    _scorer(model, ckpts, layers="all").build_index(first, tmp_path / "i")
    _scorer(model, ckpts, layers="all").add_to_index(DataLoader(later, batch_size=4), tmp_path / "i", source="later")
    got = _scorer(model, ckpts, layers="all").query(tmp_path / "i", TensorDataset(*test), top_k=40)
    tr = _scorer(model, ckpts, layers="all")
    tr.fit_preconditioner(first)  # the index keeps the whiteners of the data it was built from
    want = tr.influence_matrix(TensorDataset(x, y), TensorDataset(*test))
    assert torch.equal(got.proponents.indices, want.argsort(1, descending=True))
    assert rel_err(got.proponents.values, want.sort(1, descending=True).values) <= TOL
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    assert [(p["first"], p["rows"], p["source"]) for p in meta["parts"]] == [(0, 25, None), (25, 15, "later")]
    with pytest.raises(TracInError, match="other data"):
        _scorer(model, ckpts, layers="all").build_index(TensorDataset(x, y), tmp_path / "i")


def test_an_index_refuses_other_settings_checkpoints_and_data(tmp_path):
    model, ckpts, _, train, test = _case()
    _scorer(model, ckpts, projection_dim=32, seed=5, precondition="none").build_index(TensorDataset(*train), tmp_path / "i")
    cases = [(dict(projection_dim=32, seed=6, precondition="none"), ckpts, "different projection"),
             (dict(projection_dim=32, seed=5), ckpts, "different precondition"),
             (dict(projection_dim=32, seed=5, precondition="none", normalize="cosine"), ckpts, "different normalize"),
             (dict(projection_dim=32, seed=5, precondition="none"), perturbed_checkpoints(model, [0.1, 0.3], seed=9)[0],
              "different checkpoints")]
    for kw, checkpoints, message in cases:
        with pytest.raises(TracInError, match=message):
            _scorer(model, checkpoints, **kw).query(tmp_path / "i", TensorDataset(*test), top_k=3)
    with pytest.raises(TracInError, match="holds no gradient index"):
        _scorer(model, ckpts).query(tmp_path / "nothing", TensorDataset(*test))
    with pytest.raises(TracInError, match="drop sample_rate"):
        _scorer(model, ckpts, sample_rate=0.5).build_index(TensorDataset(*train), tmp_path / "s")
    with pytest.raises(TracInError, match="dtype='float8'"):
        _scorer(model, ckpts).build_index(TensorDataset(*train), tmp_path / "d", dtype="float8")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    with pytest.raises(TracInError, match="not a tracin index description"):
        _scorer(model, ckpts).query(tmp_path / "bad", TensorDataset(*test))


def test_embeddings_cannot_be_indexed(tmp_path):
    model, ckpts, _, train, _ = _case("seq", n_train=10, lrs=(0.1,))
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        _scorer(model, ckpts, precondition="none").build_index(TensorDataset(*train), tmp_path / "s")
    assert not list(tmp_path.glob("s/shard-*"))


def test_whiteners_are_read_without_unpickling(tmp_path):
    model, ckpts, _, train, _ = _case()
    _scorer(model, ckpts).build_index(TensorDataset(*train), tmp_path / "i")
    with np.load(tmp_path / "i" / "kfac_whiteners.npz", allow_pickle=False) as stored:
        assert stored.files and all(stored[k].dtype != object for k in stored.files)


def test_approximate_search_probing_every_list_is_exact_and_is_kept_until_the_rows_change(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    model, ckpts, _, (x, y), test = _case(n_train=120)
    tr = _scorer(model, ckpts, precondition="none")
    tr.build_index(TensorDataset(x[:100], y[:100]), tmp_path / "i")
    exact = tr.query(tmp_path / "i", TensorDataset(*test), top_k=5)
    every = tr.query(tmp_path / "i", TensorDataset(*test), top_k=5, ann_probes=10**6)
    assert torch.equal(every.proponents.indices, exact.proponents.indices)
    assert torch.equal(every.opponents.indices, exact.opponents.indices)
    assert rel_err(every.proponents.values, exact.proponents.values) <= TOL
    built = (tmp_path / "i" / "ann.faiss").stat().st_mtime_ns
    tr.query(tmp_path / "i", TensorDataset(*test), top_k=5, ann_probes=1)
    assert (tmp_path / "i" / "ann.faiss").stat().st_mtime_ns == built
    tr.add_to_index(TensorDataset(x[100:], y[100:]), tmp_path / "i")
    grown = tr.query(tmp_path / "i", TensorDataset(*test), top_k=5, ann_probes=10**6)
    assert torch.equal(grown.proponents.indices, tr.query(tmp_path / "i", TensorDataset(*test), top_k=5).proponents.indices)
    assert json.loads((tmp_path / "i" / "ann.json").read_text())["rows"] == 120
    (tmp_path / "i" / "ann.faiss").write_bytes(b"damaged")  # a damaged FAISS file is built again
    again = tr.query(tmp_path / "i", TensorDataset(*test), top_k=5, ann_probes=10**6)
    assert torch.equal(again.proponents.indices, grown.proponents.indices)
    with pytest.raises(TracInError, match="ann_probes must be a positive integer"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=5, ann_probes=0)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(TracInError, match=r"pip install -e '.\[ann\]'"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=5, ann_probes=2)


def test_a_damaged_or_planted_index_is_refused_in_one_sentence(tmp_path):
    model, ckpts, _, train, test = _case()
    tr = _scorer(model, ckpts)
    tr.build_index(TensorDataset(*train), tmp_path / "i")
    meta_path = tmp_path / "i" / "index.json"
    good = meta_path.read_text()
    meta = json.loads(good)
    meta["shards"][0]["name"] = "../../outside"  # a planted name never becomes a path
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TracInError, match="not a tracin index description"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)
    meta = json.loads(good)
    del meta["shards"][0]["rows"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TracInError, match="not a tracin index description"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)
    meta_path.write_text(good)
    shard = tmp_path / "i" / "shard-00000.npy"
    rows = np.load(shard)
    np.save(shard, rows[:-1])  # a shard shorter than its table entry
    with pytest.raises(TracInError, match="not the 30 rows of float32 the index lists"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)
    shard.write_bytes(b"not an array")
    with pytest.raises(TracInError, match="missing or damaged"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)
    np.save(shard, np.array([object()] * 30, dtype=object), allow_pickle=True)  # pickled objects are never loaded
    with pytest.raises(TracInError, match="missing or damaged"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)
    np.savez(tmp_path / "i" / "kfac_whiteners.npz", **{"0|fc1": np.eye(3)})  # a key without its factor's side
    with pytest.raises(TracInError, match="do not describe 2 checkpoints' layers"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)
    (tmp_path / "i" / "kfac_whiteners.npz").write_bytes(b"PK broken")
    with pytest.raises(TracInError, match="kfac_whiteners.npz is damaged"):
        tr.query(tmp_path / "i", TensorDataset(*test), top_k=3)

"""PyKEEN ConvE: exact against the float64 reference, triples files, the tracin kge command."""
import gzip
import json

import numpy as np
import pytest
import torch

pytest.importorskip("pykeen")

from helpers import close, perturbed_checkpoints, rel_err, task_reference_matrix  # noqa: E402
from tracin import TracIn  # noqa: E402
from tracin.workflows.cli import main  # noqa: E402
from tracin.errors import DataError, TracInError  # noqa: E402
from tracin.tasks.kge import KGETask, KGETraining, TripleData, build_pykeen_model, read_mapping, read_triples, train_kge  # noqa: E402
from tracin.engine.scope import parameterised_modules  # noqa: E402

KWARGS = {"embedding_dim": 8, "output_channels": 3, "embedding_height": 2, "embedding_width": 4}


def random_triples(n: int, entities: int = 7, relations: int = 4, seed: int = 0) -> torch.Tensor:
    """n distinct random triples [n, 3] (a repeated triple ties exactly with its twin, and the order of ties in a
    top-k list is arbitrary)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randperm(entities * relations * entities, generator=g)[:n]
    return torch.stack([codes // (relations * entities), codes // entities % relations, codes % entities], 1)


@pytest.mark.parametrize("inverse,direction", [(False, "tail"), (True, "both")])
def test_conve_matches_reference(inverse, direction):
    torch.manual_seed(0)
    model = build_pykeen_model("ConvE", 7, 4, KWARGS, create_inverse_triples=inverse)
    triples = random_triples(26)
    train, test = TripleData(triples[:20]), TripleData(triples[20:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.03], scale=0.3)
    task = KGETask(7, direction=direction, label_smoothing=0.1)
    tr = TracIn(model, ckpts, layers="all", task=task, batch_size=6, progress=False)
    got = tr.influence_matrix(train, test)
    names = [n for n, _, _ in parameterised_modules(model)]
    want = task_reference_matrix(model, raw, names, task, [(train[i],) for i in range(20)], [(test[i],) for i in range(6)])
    assert rel_err(got, want) <= 1e-4
    assert any(s["type"] == "Embedding" for s in tr.scope())  # entity and relation embeddings are in scope
    top = tr.influence(train, test, top_k=3)
    assert torch.equal(top.proponents.indices, torch.argsort(got, dim=1, descending=True, stable=True)[:, :3])


def test_head_side_without_inverse_triples_is_refused():
    model = build_pykeen_model("ConvE", 7, 4, KWARGS)
    with pytest.raises(TracInError, match="inverse triples"):
        KGETask(7, direction="both").loss(model.eval(), random_triples(3))


def test_stratified_sampling_by_relation():
    model = build_pykeen_model("ConvE", 7, 4, KWARGS)
    triples = random_triples(80)
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    tr = TracIn(model, ckpts, task=KGETask(7), sample_rate=0.5, stratify_by="relation", progress=False)
    s = tr.self_influence(TripleData(triples))
    kept = torch.isfinite(s)
    for r in range(4):
        members = triples[:, 1] == r
        assert abs(int(kept[members].sum()) - round(0.5 * int(members.sum()))) <= 1


def write_graph(folder, train, test, entities=7, relations=4, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    ent = {f"e{i}": i for i in range(entities)}
    rel = {f"r{i}": i for i in range(relations)}
    opener = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    suffix = ".tsv.gz" if gz else ".tsv"
    for name, mapping in (("entity_to_id", ent), ("relation_to_id", rel)):
        with opener(folder / f"{name}{suffix}") as f:
            f.write("id\tlabel\n" + "".join(f"{i}\t{label}\n" for label, i in mapping.items()))
    for name, triples in (("train", train), ("test", test)):
        with opener(folder / f"{name}{suffix}") as f:
            f.write("".join(f"e{h}\tr{r}\te{t}\n" for h, r, t in triples.tolist()))
    return {k: folder / f"{k}{suffix}" for k in ("entity_to_id", "relation_to_id", "train", "test")}


def test_files_read_back_gzipped_or_not(tmp_path):
    train, test = random_triples(12), random_triples(4, seed=1)
    for gz in (False, True):
        files = write_graph(tmp_path / str(gz), train, test, gz=gz)
        ent, rel = read_mapping(files["entity_to_id"]), read_mapping(files["relation_to_id"], "relation_to_id")
        assert torch.equal(read_triples(files["train"], ent, rel), train)


def test_unknown_entity_is_named(tmp_path):
    files = write_graph(tmp_path, random_triples(5), random_triples(2, seed=1))
    files["test"].write_text("e1\tr0\te2\ne1\tr0\tatlantis\n")
    ent, rel = read_mapping(files["entity_to_id"]), read_mapping(files["relation_to_id"], "relation_to_id")
    with pytest.raises(DataError, match="line 2 names entity 'atlantis'"):
        read_triples(files["test"], ent, rel, "Test triples")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("kge")
    train, test = random_triples(60, seed=2), random_triples(5, seed=3)
    files = write_graph(root / "data", train, test)
    torch.manual_seed(0)
    model = build_pykeen_model("ConvE", 7, 4, KWARGS)
    train_kge(model, train, root / "ck", "ConvE", KWARGS, KGETraining(epochs=4, save_every=2))
    return root, files, model


def _cli(files, model_path, out, *extra):
    return main(["kge", "--model_path", str(model_path), "--train", str(files["train"]), "--test", str(files["test"]),
                 "--entity_to_id", str(files["entity_to_id"]), "--relation_to_id", str(files["relation_to_id"]),
                 "--output", str(out), "--device", "cpu", "--quiet", *extra])


def test_kge_cli_end_to_end_single_equals_batch(trained):
    root, files, _ = trained
    assert _cli(files, root / "ck", root / "batch", "--test_indices", "0", "3", "--top_k", "4", "--self_influence") == 0
    assert _cli(files, root / "ck", root / "single", "--test_indices", "0", "3", "--top_k", "4", "--mode", "single") == 0
    for name in ("top_k_influences_indices.npy", "top_k_opponents_indices.npy"):
        assert np.array_equal(np.load(root / "batch" / name), np.load(root / "single" / name))
    assert close(np.load(root / "batch" / "top_k_influences_values.npy"), np.load(root / "single" / "top_k_influences_values.npy"))
    explained = json.loads((root / "batch" / "kge_influence.json").read_text())
    assert len(explained) == 2
    entry = next(iter(explained.values()))
    assert entry["test_index"] == 0 and len(entry["proponents"]) == 4 and len(entry["triple"]) == 3
    first = entry["proponents"][0]
    assert set(first) == {"train_index", "triple", "score"} and first["triple"][1].startswith("r")
    manifest = json.loads((root / "batch" / "manifest.json").read_text())
    assert manifest["command"] == "kge" and len(manifest["checkpoints"]) == 2
    assert "self_influence.json" in manifest["outputs"]


def test_pickled_model_needs_trust(trained, capsys):
    root, files, model = trained
    torch.save(model, root / "whole.pkl")
    assert _cli(files, root / "whole.pkl", root / "p1", "--test_indices", "0") == 2
    assert "--trust_checkpoint" in capsys.readouterr().err
    assert not (root / "p1" / "manifest.json").exists()
    with pytest.warns(UserWarning, match="pickle"):
        assert _cli(files, root / "whole.pkl", root / "p2", "--test_indices", "0", "--trust_checkpoint") == 0


def test_kge_cli_bad_input(trained, capsys):
    root, files, _ = trained
    files["bad_test"] = root / "bad_test.tsv"
    files["bad_test"].write_text("e1\tr0\n")
    bad = {**files, "test": files["bad_test"]}
    assert _cli(bad, root / "ck", root / "b1") == 2
    assert "bad_test.tsv line 1 has 2 fields" in capsys.readouterr().err
    assert _cli(files, root / "ck", root / "b2", "--test_indices", "9") == 2
    assert "--test_indices 9" in capsys.readouterr().err
    assert _cli(files, root / "missing", root / "b3") == 2
    assert "missing" in capsys.readouterr().err


@pytest.mark.slow
def test_nations_example_runs(tmp_path):
    """examples/kge_nations.py, as the README runs it: ConvE on PyKEEN's Nations, one triple explained."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "kge_nations.py"
    done = subprocess.run([sys.executable, str(example), "--workdir", str(tmp_path), "--epochs", "10"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    explained = json.loads((tmp_path / "influence" / "kge_influence.json").read_text())
    (entry,) = explained.values()
    assert len(entry["proponents"]) == 5 and entry["proponents"][0]["score"] >= entry["proponents"][-1]["score"]
    assert "Test triple:" in done.stdout


@pytest.mark.parametrize("name,kwargs", [("DistMult", {"embedding_dim": 6}), ("TransE", {"embedding_dim": 6}),
                                         ("ComplEx", {"embedding_dim": 4}), ("RotatE", {"embedding_dim": 4})])
def test_other_pykeen_models_match_reference(name, kwargs):
    torch.manual_seed(0)
    model = build_pykeen_model(name, 7, 4, kwargs)
    triples = random_triples(20, seed=4)
    train, test = TripleData(triples[:15]), TripleData(triples[15:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.03], scale=0.3)
    task = KGETask(7)
    got = TracIn(model, ckpts, layers="all", task=task, batch_size=6, progress=False).influence_matrix(train, test)
    names = [n for n, _, _ in parameterised_modules(model)]
    want = task_reference_matrix(model, raw, names, task, [(train[i],) for i in range(15)], [(test[i],) for i in range(5)])
    assert rel_err(got, want) <= 1e-4


def test_pykeen_model_without_kernels_is_scored_exactly():
    model = build_pykeen_model("TuckER", 7, 4, {"embedding_dim": 4, "relation_dim": 3})
    triples = random_triples(12)
    train, test = TripleData(triples[:9]), TripleData(triples[9:])
    ckpts, raw = perturbed_checkpoints(model, [0.1], scale=0.3)
    task = KGETask(7)
    tr = TracIn(model, ckpts, task=task, batch_size=4, progress=False)
    assert any("TuckER" in str(row) or row["kernel"] == "exact" for row in tr.scope())
    want = task_reference_matrix(model, raw, None, task, [(train[i],) for i in range(9)], [(test[i],) for i in range(3)])
    assert rel_err(tr.influence_matrix(train, test), want) <= 1e-4


def test_kge_cli_sampling_and_projection(trained):
    root, files, _ = trained
    out = root / "approx"
    assert _cli(files, root / "ck", out, "--test_indices", "1", "--top_k", "3", "--sample_rate", "0.5",
                "--stratify_by", "relation", "--use_projection", "--projection_dim", "16", "--self_influence") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["projection_dim"] == 16 and manifest["parameters"]["stratify_by"] == "relation"
    scores = np.load(out / "self_influence.npy")
    assert scores.shape == (60,) and 25 <= int(np.isfinite(scores).sum()) <= 35  # half of each relation scored
    picked = np.load(out / "top_k_influences_indices.npy")
    assert picked.shape == (1, 3) and np.isfinite(scores[picked[0]]).all()  # indices into the full training set

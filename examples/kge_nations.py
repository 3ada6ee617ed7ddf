"""Train PyKEEN's ConvE on the Nations graph (shipped inside PyKEEN, nothing is downloaded) with
checkpoints, then ask tracin which training triples made it believe one test triple.

    pip install -e '.[kge]'
    python examples/kge_nations.py --workdir kge_out

Writes the triples and mappings in PyKEEN's file format to WORKDIR, checkpoints to WORKDIR/checkpoints,
and the explanation (kge_influence.json, CSV, npy, self-influence) to WORKDIR/influence.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def write_files(workdir: Path):
    """Nations' train/test triples and id mappings as PyKEEN-style TSV files."""
    from pykeen.datasets import Nations

    ds = Nations()
    workdir.mkdir(parents=True, exist_ok=True)
    for name, mapping in (("entity_to_id", ds.training.entity_to_id), ("relation_to_id", ds.training.relation_to_id)):
        rows = sorted(mapping.items(), key=lambda kv: kv[1])
        (workdir / f"{name}.tsv").write_text("id\tlabel\n" + "".join(f"{i}\t{label}\n" for label, i in rows))
    from tracin.tasks.kge import triple_labels

    for name, factory in (("train", ds.training), ("test", ds.testing)):
        labels = triple_labels(factory.mapped_triples, ds.training.entity_to_id, ds.training.relation_to_id)
        (workdir / f"{name}.tsv").write_text("".join("\t".join(t) + "\n" for t in labels))
    return ds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("kge_out"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--test_index", type=int, default=0)
    p.add_argument("--top_k", type=int, default=5)
    args = p.parse_args()
    start = time.perf_counter()

    from tracin.workflows.cli import main as tracin
    from tracin.tasks.kge import KGETraining, build_pykeen_model, train_kge

    ds = write_files(args.workdir)
    kwargs = {"embedding_dim": 32, "output_channels": 8, "embedding_height": 4, "embedding_width": 8}
    torch.manual_seed(0)
    model = build_pykeen_model("ConvE", ds.num_entities, ds.num_relations, kwargs)
    paths = train_kge(model, ds.training.mapped_triples, args.workdir / "checkpoints", "ConvE", kwargs,
                      KGETraining(epochs=args.epochs, learning_rate=0.005, save_every=10))
    print(f"Trained ConvE on {ds.training.num_triples} Nations triples; {len(paths)} checkpoints in {time.perf_counter() - start:.0f}s.")

    out = args.workdir / "influence"
    code = tracin(["kge", "--model_path", str(args.workdir / "checkpoints"), "--train", str(args.workdir / "train.tsv"),
                   "--test", str(args.workdir / "test.tsv"), "--entity_to_id", str(args.workdir / "entity_to_id.tsv"),
                   "--relation_to_id", str(args.workdir / "relation_to_id.tsv"), "--output", str(out),
                   "--test_indices", str(args.test_index), "--top_k", str(args.top_k), "--self_influence", "--quiet"])
    if code:
        raise SystemExit(code)
    explained = json.loads((out / "kge_influence.json").read_text())
    for entry in explained.values():
        print("\nTest triple:", " ".join(entry["triple"]))
        for kind in ("proponents", "opponents"):
            print(f"  {kind}:")
            for item in entry[kind]:
                print(f"    {item['score']:+.4f}  {' '.join(item['triple'])}")
    ranked = json.loads((out / "self_influence.json").read_text())
    top = sorted(ranked, key=lambda k: -ranked[k]["tracin_self_influence"])[:3]
    print("\nMost surprising training triples (self-influence):", "; ".join(t.replace("|", " ") for t in top))
    print(f"\nDone in {time.perf_counter() - start:.0f}s.")


if __name__ == "__main__":
    main()

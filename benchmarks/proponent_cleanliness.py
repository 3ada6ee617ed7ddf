"""Share of the top-k proponent (and opponent) slots filled by flipped training labels in a ``tracin demo`` folder.

    tracin demo --output_dir D
    python benchmarks/proponent_cleanliness.py D          # reads D/data/injected_noise.csv and D/results/top_k_influences.csv

A proponent list should hold training examples that support the prediction; a flipped label there is a wrong
explanation. Opponents are expected to hold flipped examples (they hurt the prediction).
"""
import argparse
import csv
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", type=Path)
    a = parser.parse_args()
    flipped = {Path(r["file"]).name for r in csv.DictReader(open(a.demo_dir / "data" / "injected_noise.csv"))}
    rows = list(csv.DictReader(open(a.demo_dir / "results" / "top_k_influences.csv")))
    for kind in ("proponent", "opponent"):
        slots = [r for r in rows if r["kind"].startswith(kind)]
        bad = sum(Path(r["train_file"]).name in flipped for r in slots)
        same = sum(r["train_label"] == r["test_label"] for r in slots)
        distinct = len({r["train_index"] for r in slots})
        print(f"{kind}s: {len(slots)} slots, flipped {bad / len(slots):.3f}, sharing the test label {same / len(slots):.3f}, "
              f"{distinct} distinct training images")


if __name__ == "__main__":
    main()

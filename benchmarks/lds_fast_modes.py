"""Fast modes under the default: what ``projection_dim`` keeps of the exact default's answer.

Under K-FAC (the default) ``projection_dim`` keeps each factor's leading eigen-directions of its damped whitener;
under ``precondition="none"`` it is a random projection. Two measurements, in the same process:

  agreement: a trained digits MLP (64-1024-512-10, 1,500 train x 32 test, 3 checkpoints); every configuration's
             matrix against the exact matrix of the same preconditioner: top-10 overlap, Spearman, Pearson, seconds.
  lds:       the linear datamodeling score (TRAK protocol, 100 halves x 3 seeds) of the default and plain TracIn
             with and without projection, on the digits and mnist1d MLP settings of benchmarks/lds_settings.py.

    python benchmarks/lds_fast_modes.py --output_dir O [--part agreement lds]   # about 10 minutes on 2 CPU cores
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from tracin import Checkpoint, TracIn, save_checkpoint
from tracin.workflows.audit import compare
from tracin.workflows.evaluation.lds import LDSSetting, evaluate, format_row

DIMS = (64, 256, 1024)


def trained_mlp(folder: Path):
    """The digits MLP, trained 3 epochs with SGD, a checkpoint after each; (model, train, test)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):
        for start in range(0, 1500, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 32]), y[start:start + 32]).backward()
            opt.step()
        save_checkpoint(folder / f"epoch{epoch}.pt", model.state_dict(), 0.05, epoch=epoch)
    return model, TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:1532], y[1500:1532])


def agreement() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, train, test = trained_mlp(Path(tmp))
        ckpts = Checkpoint.discover(tmp)
        for precondition in ("auto", "none"):
            name = "defaults (K-FAC)" if precondition == "auto" else "precondition none"
            print(f"\n### {name}\n| projection_dim | top-10 overlap | Spearman | Pearson | seconds |\n|---|---|---|---|---|")
            exact = None
            for dim in (None,) + DIMS:
                tr = TracIn(model, ckpts, precondition=precondition, projection_dim=dim, layers="all", progress=False)
                begin = time.perf_counter()
                matrix = tr.influence_matrix(train, test)
                seconds = time.perf_counter() - begin
                exact = matrix if exact is None else exact
                m = compare(exact, matrix)
                print(f"| {dim or 'exact'} | {m['top_overlap']:.3f} | {m['spearman']:.3f} | {m['pearson']:.3f} | {seconds:.2f} |")


def lds(output_dir: Path) -> None:
    methods = {"default": {}, **{f"default, projection {d}": {"projection_dim": d} for d in (32, 64, 128)},
               "plain": {"precondition": "none"}, "plain, projection 64": {"precondition": "none", "projection_dim": 64}}
    for data in ("digits", "mnist1d"):
        setting = LDSSetting(data=data, model="mlp")
        print(f"\n### LDS, {data} MLP\n| method | LDS | 95% interval | seconds |\n|---|---|---|---|")
        rows = evaluate(setting, methods, output_dir / data, log=lambda line: None)
        for row in rows:
            print(format_row(row))
        exact = rows[0].lds
        print("kept of the default's LDS: " + ", ".join(f"{r.method} {r.lds / exact:.0%}" for r in rows[1:4]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="retrainings are cached here")
    parser.add_argument("--part", nargs="+", default=["agreement", "lds"], choices=["agreement", "lds"])
    a = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "agreement" in a.part:
        agreement()
    if "lds" in a.part:
        lds(a.output_dir)


if __name__ == "__main__":
    main()

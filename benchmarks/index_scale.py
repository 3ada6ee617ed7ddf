"""The gradient index against re-running influence, and its query latency at scale.

  cli:      the demo's digits image folder (1,438 train x 359 test images, smallcnn, 12 checkpoints, every layer,
            the defaults with --projection_dim 256, i.e. K-FAC keeping 256 directions per layer; without projection
            a row is the whole gradient at every checkpoint, 7 MB per image here): `tracin influence
            --test_subset 20` against `tracin index build` once and then
            `tracin index query --test_subset 20` (same process, same settings); the top-k must be identical. Prints the
            build rate against the influence pass, bytes per training image, and the query's share of influence's time.
  latency:  search() over synthetic rows (10^5 and 10^6 rows of 512 numbers, float16) for 1, 100 and 1,000 queries,
            exact top-100, best of 3 (rows per second beside).
  ann:      FAISS inverted-file search (the ``ann`` extra) against the exact search: recall@10 and speed-up.
  lds:      the default's LDS through an index (built, then queried for every row) against the in-memory path.

    python benchmarks/index_scale.py --workdir /tmp/index_bench [--part cli latency]   # about 5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def cli(workdir: Path) -> None:
    from tracin.workflows.cli import main
    from tracin.workflows.demo import DEMO_TRAINING
    from tracin.workflows.image.digits import write_digits_folder
    from tracin.workflows.image.train import ImageTraining, train_image_classifier

    data, ckpt = workdir / "data", workdir / "ckpts"
    if not (ckpt / "best_model.pt").is_file():
        write_digits_folder(data, noise_rate=0.1, seed=0)
        train_image_classifier(data, ckpt, ImageTraining(seed=0, **DEMO_TRAINING), torch.device("cpu"), False)
    common = ["--data_dir", str(data), "--checkpoint_dir", str(ckpt), "--layers", "all", "--use_projection",
              "--projection_dim", "256", "--quiet"]

    def timed(argv):
        begin = time.perf_counter()
        assert main(argv) == 0, argv
        return time.perf_counter() - begin

    t_influence = timed(["influence", *common, "--output_dir", str(workdir / "influence"), "--test_subset", "20",
                         "--top_k", "10", "--overwrite"])
    rows = []
    for dtype in ("float32", "float16"):
        index = workdir / f"index_{dtype}"
        if index.exists():
            import shutil
            shutil.rmtree(index)
        t_build = timed(["index", "build", *common, "--index_dir", str(index), "--dtype", dtype])
        t_query = timed(["index", "query", "--index_dir", str(index), "--data_dir", str(data), "--checkpoint_dir",
                         str(ckpt), "--output_dir", str(workdir / f"query_{dtype}"), "--test_subset", "20", "--top_k",
                         "10", "--overwrite", "--quiet"])
        same = np.array_equal(np.load(workdir / f"query_{dtype}" / "top_k_influences_indices.npy"),
                              np.load(workdir / "influence" / "top_k_influences_indices.npy"))
        n = len(list((data / "train").rglob("*.png")))
        size = sum(f.stat().st_size for f in index.glob("shard-*[0-9].npy"))
        rows.append(f"| {dtype} | {t_build:.1f} | {t_query:.1f} | {t_query / t_influence:.2f} | {size / n:,.0f} | {same} |")
    print(f"\n`tracin influence --test_subset 20`: {t_influence:.1f} s\n")
    print("| index dtype | build s | query s (20 test) | query / influence | bytes per image | same top-10 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def latency(workdir: Path, width: int = 512) -> None:
    from tracin.engine.index import GradientIndex, IndexMeta, plan_part, search

    print("\n| rows | queries | seconds (best of 3) | rows x queries per second |\n|---|---|---|---|")
    for n_rows in (10**5, 10**6):
        directory = workdir / f"synthetic_{n_rows}"
        meta = IndexMeta({}, "float16", 65536)
        index = GradientIndex(directory, meta)
        if not (directory / "index.json").is_file():
            directory.mkdir(parents=True, exist_ok=True)
            plan_part(meta, n_rows, "synthetic")
            g = np.random.default_rng(0)
            for shard in meta.shards:
                index.write_shard(shard, g.standard_normal((shard["rows"], width), dtype=np.float32),
                                  np.zeros(shard["rows"], np.float32))
            index.write_meta()
        else:
            index = GradientIndex.load(directory)
        for m in (1, 100, 1000):
            queries = torch.randn(m, width)
            best = min(_seconds(lambda: search(index, queries, 100, 1 << 28)) for _ in range(3))
            print(f"| {n_rows:,} | {m} | {best:.2f} | {n_rows * m / best:,.0f} |")


def ann(workdir: Path, width: int = 512) -> None:
    """Recall@10 of the FAISS inverted-file search against the exact one, and its speed-up, on 10^5 synthetic rows
    drawn around 1,000 centres (gradients cluster by class and by what the model finds hard; i.i.d. Gaussian rows,
    the worst case for any partition, are the second table)."""
    from tracin.engine.ann import ANN_FILE, ann_index, approximate_search
    from tracin.engine.index import GradientIndex, IndexMeta, plan_part, search

    g = np.random.default_rng(1)
    for kind in ("clustered", "gaussian"):
        directory = workdir / f"ann_{kind}"
        meta = IndexMeta({}, "float16", 65536)
        index = GradientIndex(directory, meta)
        directory.mkdir(parents=True, exist_ok=True)
        plan_part(meta, 10**5, kind)
        centres = g.standard_normal((1000, width), dtype=np.float32)
        for shard in meta.shards:
            rows = g.standard_normal((shard["rows"], width), dtype=np.float32)
            if kind == "clustered":
                rows = centres[g.integers(0, 1000, shard["rows"])] + 0.5 * rows
            index.write_shard(shard, rows, np.zeros(shard["rows"], np.float32))
        index.write_meta()
        (directory / ANN_FILE).unlink(missing_ok=True)
        t_build = _seconds(lambda: ann_index(index))
        queries = torch.from_numpy(centres[g.integers(0, 1000, 100)] + g.standard_normal((100, width), dtype=np.float32))
        t_exact = min(_seconds(lambda: search(index, queries, 10, 1 << 28)) for _ in range(3))
        exact = search(index, queries, 10, 1 << 28).result()[1]
        print(f"\n{kind} rows: FAISS IVF build {t_build:.1f} s (once), exact search {t_exact:.2f} s for 100 queries\n"
              "| probes | seconds | speed-up | recall@10 |\n|---|---|---|---|")
        for probes in (4, 16, 64):
            t = min(_seconds(lambda: approximate_search(index, queries, 10, probes)) for _ in range(3))
            found = approximate_search(index, queries, 10, probes)[1]
            recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(found, exact)])
            print(f"| {probes} | {t:.3f} | {t_exact / t:.0f}x | {recall:.3f} |")


def lds(workdir: Path) -> None:
    """The LDS of the default scored through an index (built, then queried for every training row) against the
    in-memory default, on the digits and mnist1d MLP settings of benchmarks/lds_settings.py."""
    from torch.utils.data import TensorDataset

    from tracin import TracIn
    from tracin.workflows.evaluation.lds import LDSSetting, format_row, prepare

    print("\n| setting | path | LDS | 95% interval | seconds |\n|---|---|---|---|---|")
    for data in ("digits", "mnist1d"):
        run = prepare(LDSSetting(data=data, model="mlp"), workdir / f"lds_{data}", lambda line: None)
        run.warm_up()
        train, test = TensorDataset(*run.train), TensorDataset(*run.test)
        n = len(train)
        begin = time.perf_counter()
        memory = TracIn(run.model, run.checkpoints, progress=False, batch_size=500).influence_matrix(train, test)
        rows = [run.row("in memory", memory, time.perf_counter() - begin)]
        begin = time.perf_counter()
        tr = TracIn(run.model, run.checkpoints, progress=False, batch_size=500)
        tr.build_index(train, workdir / f"lds_index_{data}")
        found = tr.query(workdir / f"lds_index_{data}", test, top_k=n)
        scores = torch.zeros(len(test), n).scatter_(1, found.proponents.indices, found.proponents.values)
        rows.append(run.row("index (build + query)", scores, time.perf_counter() - begin))
        for row in rows:
            print(f"| {data} MLP " + format_row(row))
        print(f"largest score difference, relative: {float((scores - memory).abs().max() / memory.abs().max()):.1e}")


def _seconds(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--part", nargs="+", default=["cli", "latency", "ann", "lds"], choices=["cli", "latency", "ann", "lds"])
    a = parser.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "cli" in a.part:
        cli(a.workdir)
    if "latency" in a.part:
        latency(a.workdir)
    if "ann" in a.part:
        ann(a.workdir)
    if "lds" in a.part:
        lds(a.workdir)


if __name__ == "__main__":
    main()

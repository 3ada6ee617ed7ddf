"""Time and memory of exact and projected influence against sequence length, for a small transformer.

A BERT-style classifier (built from a config, nothing downloaded; hidden 64, 2 layers) on random token
sequences of length T in 32..1024: 32 training and 4 test sequences, two checkpoints, every layer but the
position embeddings (left out as when these figures were first recorded; they now keep the embedding kernel,
docs/tasks.md, and benchmarks/sequence_floor.py measures whole models against their floor).
Each configuration runs in a fresh process so its peak resident memory is its own:

* tracin exact: the per-layer choice between ghost (cost T^2 (d_in + d_out) per pair) and materialised
  (d_in d_out per pair) kernels;
* tracin projected: ``projection_dim=256`` per layer;
* peer: per-example gradients by a plain autograd loop (one backward per example), materialised and
  multiplied, the way a user without tracin would compute the same exact scores.

Printed: seconds, the peak resident memory scoring added (MiB above the process with its model and data), the
time ratio of the peer to tracin exact, their largest difference, and the top-10 overlap of projected with exact.

    python benchmarks/sequence_scale.py            # about 3 minutes on 2 CPU cores
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIG = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3)
EXCLUDE = ["*position_embeddings*"]


def setup(T):
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification

    from tracin import Checkpoint

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(max_position_embeddings=max(T, 32), **CONFIG)).eval()
    g = torch.Generator().manual_seed(1)

    def data(n):
        ids = torch.randint(1, 100, (n, T), generator=g)
        return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones(n, T, dtype=torch.long).tolist(),
                                  "labels": torch.randint(0, 3, (n,), generator=g).tolist()}).with_format("torch")

    ckpts = []
    for lr in (0.1, 0.05):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        ckpts.append(Checkpoint(state, learning_rate=lr))
    return model, ckpts, data(32), data(4)


def peer(model, ckpts, train, test):
    """Exact scores [4, 32] from per-example gradients computed one example at a time and materialised."""
    from fnmatch import fnmatchcase

    from tracin.tasks import HFTask

    task = HFTask()
    names = [n for n, p in model.named_parameters() if not any(fnmatchcase(n, e) for e in EXCLUDE)]
    params = [dict(model.named_parameters())[n] for n in names]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    total = torch.zeros(len(test), len(train))
    for ck in ckpts:
        model.load_state_dict(ck.state_dict())

        def grads(ds):
            rows = []
            for i in range(len(ds)):
                batch = {k: v[None] for k, v in ds[i].items()}
                g = torch.autograd.grad(task.loss(model, batch).sum(), params, allow_unused=True)
                rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params)]))
            return torch.stack(rows)

        total += ck.learning_rate * grads(test) @ grads(train).T
    model.load_state_dict(original)
    return total


def one(T, mode):
    """Run one configuration; print a JSON line with seconds, peak RSS (MiB) and the score matrix."""
    from tracin import TracIn

    model, ckpts, train, test = setup(T)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process with its data, before scoring
    start = time.perf_counter()
    if mode == "peer":
        scores = peer(model, ckpts, train, test)
    else:
        extra = {"projection_dim": 256} if mode == "projected" else {}
        tr = TracIn(model, ckpts, layers="all", exclude=EXCLUDE, batch_size=8, progress=False, **extra, precondition="none")
        scores = tr.influence_matrix(train, test)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps({"T": T, "mode": mode, "seconds": seconds, "peak_mib": peak, "scores": scores.tolist()}))


def overlap(a, b, k=10):
    a, b = torch.tensor(a), torch.tensor(b)
    top_a, top_b = a.argsort(1, descending=True)[:, :k], b.argsort(1, descending=True)[:, :k]
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b)) / (k * len(a))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512, 1024])
    parser.add_argument("--one", nargs=2, metavar=("T", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(int(args.one[0]), args.one[1])
        return
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; 32 train x 4 test sequences, 2 checkpoints")
    print(f"{'T':>5} {'exact s':>8} {'exact MiB':>10} {'proj s':>7} {'proj MiB':>9} {'peer s':>7} {'peer MiB':>9} "
          f"{'peer/exact':>10} {'max rel err':>11} {'top-10 proj':>11}")
    for T in args.lengths:
        runs = {}
        for mode in ("exact", "projected", "peer"):
            out = subprocess.run([sys.executable, __file__, "--one", str(T), mode], capture_output=True, text=True, check=True)
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        e, p, q = runs["exact"], runs["projected"], runs["peer"]
        exact, ref = torch.tensor(e["scores"]), torch.tensor(q["scores"])
        err = float((exact - ref).abs().max() / ref.abs().max())
        print(f"{T:>5} {e['seconds']:>8.2f} {e['peak_mib']:>10.0f} {p['seconds']:>7.2f} {p['peak_mib']:>9.0f} "
              f"{q['seconds']:>7.2f} {q['peak_mib']:>9.0f} {q['seconds'] / e['seconds']:>9.1f}x {err:>11.1e} "
              f"{overlap(e['scores'], p['scores']):>11.2f}")


if __name__ == "__main__":
    main()

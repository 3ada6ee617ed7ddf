"""Transformers and recurrent models scored with the defaults over every parameter, against their own forward+backward
floor and against a per-example autograd loop, in one process.

Each model is built from a small config (nothing downloaded): Hugging Face BERT and GPT-2 (2 layers, hidden 64), a
torchvision ViT (2 layers, hidden 64, 32 px images in 4 px patches: 65 tokens), ``nn.TransformerEncoder`` (2 layers,
hidden 64), and a GRU and an LSTM (32 inputs, 64 hidden). Per model and sequence length T: 256 train x 16 test
examples, 2 checkpoints, ``TracIn(model, checkpoints, layers="all")`` with everything else left at its default,
``influence(top_k=10)``. Printed:

* floor: the same batches forward and backward at every checkpoint, no attribution (best of 2);
* tracin: the defaults, and its ratio to the floor;
* loop: exact scores from per-example gradients by one backward pass per example (the way a user without tracin
  computes them), timed on 32 training and the 16 test examples and scaled to the whole workload; the largest
  difference between its scores and tracin's on those examples (tracin's defaults are plain TracIn on every model here:
  K-FAC would leave out the embeddings, norms and recurrent layers, more than 5% of the parameters);
* which kernels ran (``exact`` would mean per-example passes).

    python benchmarks/sequence_floor.py                          # every model at T = 64, about 1 minute on 2 cores
    python benchmarks/sequence_floor.py --models bert gru --lengths 64 256
"""
import argparse
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from tracin import Checkpoint, TracIn

N_TRAIN, N_TEST, BATCH, LOOP = 256, 16, 32, 32


class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def token_loss(model, batch):
    """A causal LM's per-example loss: mean next-token cross-entropy."""
    ids, _ = batch
    logits = model(input_ids=ids).logits[:, :-1]
    return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def hf_label_loss(model, batch):
    ids, y = batch
    return nn.functional.cross_entropy(model(input_ids=ids).logits, y, reduction="none")


def label_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


class Pooled(nn.Module):
    """A sequence model's last step (recurrent) or mean (encoder) into a linear head."""

    def __init__(self, body, width, mean=False):
        super().__init__()
        self.body, self.head, self.mean = body, nn.Linear(width, 10), mean

    def forward(self, x):
        out = self.body(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out.mean(1) if self.mean else out[:, -1])


def build(name, T, g):
    """(model, per-example loss, inputs [N, ...], labels [N])."""
    import transformers
    from torchvision.models import VisionTransformer

    n = N_TRAIN + N_TEST
    ids = torch.randint(1, 100, (n, T), generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_labels=10, max_position_embeddings=max(T, 512), **small)
        return transformers.BertForSequenceClassification(cfg), hf_label_loss, ids, labels
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=max(T, 512))
        return transformers.GPT2LMHeadModel(cfg), token_loss, ids, labels
    if name == "vit":
        model = VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
        return model, label_loss, torch.randn(n, 3, 32, 32, generator=g), labels
    if name == "encoder":
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
        model = nn.Sequential(nn.Embedding(100, 64), Pooled(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), 64, mean=True))
        return model, label_loss, ids, labels
    cell = {"gru": nn.GRU, "lstm": nn.LSTM}[name]
    return Pooled(cell(32, 64, batch_first=True), 64), label_loss, torch.randn(n, T, 32, generator=g), labels


def checkpoints(model, g):
    base = model.state_dict()
    return [Checkpoint({k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                        for k, v in base.items()}, learning_rate=0.01) for _ in range(2)]


def floor(model, loss, ckpts, x, y):
    """Seconds of forward+backward over every batch at every checkpoint."""
    start = time.perf_counter()
    for ck in ckpts:
        model.load_state_dict(ck.state_dict())
        for s in range(0, len(y), BATCH):
            loss(model, (x[s:s + BATCH], y[s:s + BATCH])).sum().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def loop(model, loss, ckpts, x, y):
    """Scores [N_TEST, LOOP] from per-example gradients, one backward pass each, and the seconds they took."""
    params = [p for p in model.parameters() if p.requires_grad]
    test = list(range(N_TRAIN, N_TRAIN + N_TEST))
    start = time.perf_counter()
    total = torch.zeros(N_TEST, LOOP)
    for ck in ckpts:
        model.load_state_dict(ck.state_dict())
        rows = []
        for i in list(range(LOOP)) + test:
            grads = torch.autograd.grad(loss(model, (x[i:i + 1], y[i:i + 1])).sum(), params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
        G = torch.stack(rows)
        total += ck.learning_rate * G[LOOP:] @ G[:LOOP].T
    return total, time.perf_counter() - start


def measure(name, T):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, loss, x, y = build(name, T, g)
    model.eval()
    ckpts = checkpoints(model, g)
    floor(model, loss, ckpts, x, y)
    base = min(floor(model, loss, ckpts, x, y) for _ in range(2))
    tr = TracIn(model, ckpts, layers="all", task=loss, batch_size=BATCH, progress=False)
    train, test = Pairs(x[:N_TRAIN], y[:N_TRAIN]), Pairs(x[N_TRAIN:], y[N_TRAIN:])
    start = time.perf_counter()
    tr.influence(train, test, top_k=10)
    ours = time.perf_counter() - start
    matrix = tr.influence_matrix(Pairs(x[:LOOP], y[:LOOP]), test)
    reference, seconds = loop(model, loss, ckpts, x, y)
    err = float((matrix - reference).abs().max() / reference.abs().max())
    kernels = sorted({row["kernel"] for row in tr.scope()})
    whole = seconds * (N_TRAIN + N_TEST) / (LOOP + N_TEST)
    print(f"{name:>8} {T:>5} {base:>8.2f} {ours:>8.2f} {ours / base:>6.1f}x {whole:>8.1f} {whole / ours:>6.1f}x {err:>8.1e}  "
          f"{'/'.join(kernels)}{'' if tr.preconditioner is None else ' (K-FAC)'}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert", "gpt2", "vit", "encoder", "gru", "lstm"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64], help="sequence lengths (ViT: always 65 tokens)")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {N_TRAIN} train x {N_TEST} test, 2 checkpoints, "
          "defaults over every parameter")
    print(f"{'model':>8} {'T':>5} {'floor s':>8} {'tracin s':>8} {'/floor':>7} {'loop s':>8} {'/tracin':>7} {'max err':>8}  kernels")
    for name in args.models:
        for T in ([65] if name == "vit" else args.lengths):
            measure(name, T)


if __name__ == "__main__":
    main()

"""A Hugging Face BERT (2 layers, hidden 64, built from a config) scored with the defaults over every parameter,
against its own forward+backward floor (the same batches at every checkpoint, no attribution), in this process.

256 train x 16 test sequences of 64 tokens, 2 checkpoints, top-10. Prints both times, their ratio, and the kernel
the position embeddings got (looked up once per batch for [1, T]: expanded to the batch during capture since
2026-12-03; before, per-example passes).

    python benchmarks/transformer_floor.py
"""
import time, torch, transformers
from torch.utils.data import Dataset
from tracin import TracIn, Checkpoint
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3)
model = transformers.BertForSequenceClassification(cfg).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(1, 100, (272, 64), generator=g); labels = torch.randint(0, 3, (272,), generator=g)
class D(Dataset):
    def __init__(s, a, b): s.a, s.b = a, b
    def __len__(s): return len(s.b)
    def __getitem__(s, i): return {"input_ids": s.a[i], "attention_mask": torch.ones_like(s.a[i]), "labels": s.b[i]}
train, test = D(ids[:256], labels[:256]), D(ids[256:], labels[256:])
base = model.state_dict()
ck = [Checkpoint({k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}, learning_rate=0.01) for _ in range(2)]
def floor():
    t = time.perf_counter()
    for c in ck:
        model.load_state_dict(c.state_dict())
        for s in range(0, 272, 32):
            out = model(input_ids=ids[s:s+32], labels=labels[s:s+32]); out.loss.backward()
    model.zero_grad(); return time.perf_counter() - t
floor()
f = min(floor() for _ in range(2))
tr = TracIn(model, ck, layers="all", progress=False, batch_size=32)
t = time.perf_counter(); tr.influence(train, test, top_k=10); s = time.perf_counter() - t
k = {r["name"]: r["kernel"] for r in tr.scope()}
print(f"defaults {s:.2f}s floor {f:.2f}s ratio {s/f:.1f}x; position kernel {k['bert.embeddings.position_embeddings']}; precondition {tr.preconditioner is not None}")

"""A parameter shared by several modules: each use's kernel, the uses' per-example gradients summed, against float64
per-example references; a use the engine cannot see sends the parameter back to exact passes."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import DEVICE, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.tasks import Task


class NextToken(Task):
    """A causal LM's per-example loss: mean next-token cross-entropy over ids [B, T] (labels unused)."""

    def loss(self, model, batch):
        ids = batch[0]
        logits = model(ids)
        logits = getattr(logits, "logits", logits)[:, :-1]
        return nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


class TinyLM(nn.Module):
    """A token table tied to the output head; ``functional``: the table is also read outside both modules."""

    def __init__(self, functional=False):
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=True)
        self.head.weight = self.tok.weight
        self.functional = functional

    def forward(self, ids):
        h = torch.tanh(self.mix(self.tok(ids)))
        if self.functional:
            h = h + self.tok.weight[:1]
        return self.head(h)


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def run(model, layers="all"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (13, 5), generator=g)
    train, test = TensorDataset(ids[:9]), TensorDataset(ids[9:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers=layers, task=NextToken(), device=DEVICE, batch_size=4, progress=False)
    got = tr.influence_matrix(train, test)
    want = task_reference_matrix(model, raw, None, NextToken(), [train[i] for i in range(9)],
                                 [test[i] for i in range(4)])
    return tr, got, want


@pytest.mark.parametrize("build", [TinyLM, gpt2], ids=["tiny", "gpt2"])
def test_tied_uses_are_summed_without_exact_passes(build):
    torch.manual_seed(0)
    tr, got, want = run(build())
    assert rel_err(got, want) <= 1e-4
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    tied = [name for name in kernels if "tied to" in name]
    assert len(tied) == 1 and kernels[tied[0]] == "materialize" and "exact" not in kernels.values()


def test_the_last_layer_alone_still_counts_every_use_of_its_tied_weight():
    torch.manual_seed(0)
    model = TinyLM()
    model.mix.requires_grad_(False)  # so that every trainable parameter is the head's: the tied weight and the bias
    tr, got, want = run(model, layers=["head"])
    assert rel_err(got, want) <= 1e-4
    assert sorted(row["name"] for row in tr.scope()) == ["head", "tok.weight (tied to head.weight)"]


def test_a_use_outside_the_modules_falls_back_to_exact_passes():
    torch.manual_seed(0)
    tr, got, want = run(TinyLM(functional=True))
    assert rel_err(got, want) <= 1e-4
    assert {row["name"]: row["kernel"] for row in tr.scope()}["tok.weight (tied to head.weight)"] == "exact"

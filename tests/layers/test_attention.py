"""nn.MultiheadAttention's packed projection (forward recomputed during capture) and raw parameters broadcast over the
batch, against float64 per-example references, with no per-example backward passes."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import DEVICE, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.tasks import ClassificationTask

T, E = 5, 6


class Attending(nn.Module):
    """One attention layer in a given form: self or cross, batch-first or not, with masks, returning weights or not."""

    def __init__(self, batch_first=True, bias=True, cross=False, masks=False, need_weights=False, average=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, bias=bias, batch_first=batch_first)
        self.memory = nn.Linear(E, E) if cross else None
        self.head = nn.Linear(E, 3)
        self.batch_first, self.need_weights, self.average = batch_first, need_weights, average
        self.masks = masks

    def forward(self, x):
        n = x.shape[0]
        kv = self.memory(x.flip(1)) if self.memory is not None else x
        q, kv = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        kwargs = {}
        if self.masks:  # a causal boolean mask and every example's last key padded
            kwargs["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
            kwargs["key_padding_mask"] = torch.zeros(n, T, dtype=torch.bool)
            kwargs["key_padding_mask"][:, -1] = True
        out, weights = self.attn(q, kv, kv if self.memory is not None else q, need_weights=self.need_weights,
                                 average_attn_weights=self.average, **kwargs)
        out = out if self.batch_first else out.transpose(0, 1)
        pooled = out.mean(1)
        if weights is not None:
            pooled = pooled + weights.reshape(n, -1).sum(1, keepdim=True) * 0.1
        return self.head(pooled)


class Tokens(nn.Module):
    """A class token concatenated onto every example and a position table added: raw [1, ...] parameters."""

    def __init__(self, misuse=False):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, E))
        self.pos = nn.Parameter(torch.randn(1, T + 1, E) * 0.5)
        self.proj = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)
        self.misuse = misuse

    def forward(self, x):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1) + self.pos
        if self.misuse:  # reduces the table over its leading dimension: one row per example would change the output
            h = h * self.pos.sum()
        return self.head(torch.tanh(h).mean(1))


def run(model, kernel="auto", layers="all", precondition="none", n_train=9, n_test=4):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n_train + n_test, T, E, generator=g), torch.randint(0, 3, (n_train + n_test,), generator=g)
    train, test = TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=4, progress=False, kernel=kernel,
                precondition=precondition)
    got = tr.influence_matrix(train, test)
    want = task_reference_matrix(model, raw, None if layers == "all" else layers, ClassificationTask(),
                                 list(zip(x[:n_train], y[:n_train])), list(zip(x[n_train:], y[n_train:])))
    return tr, got, want


FORMS = {
    "self": {}, "sequence_first": {"batch_first": False}, "no_bias": {"bias": False}, "cross": {"cross": True},
    "masks": {"masks": True}, "weights": {"need_weights": True}, "weights_per_head": {"need_weights": True, "average": False},
    "cross_sequence_first_masks": {"cross": True, "batch_first": False, "masks": True},
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("kernel", ["auto", "ghost", "materialize"])
def test_attention_forms_match_the_reference_without_exact_passes(form, kernel):
    torch.manual_seed(0)
    tr, got, want = run(Attending(**FORMS[form]), kernel)
    assert rel_err(got, want) <= 1e-4
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    assert "exact" not in kernels.values() and kernels["attn"] in ("ghost", "materialize")


def test_transformer_encoder_layers_need_no_exact_passes():
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=8, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    tr, got, want = run(Encoder())
    assert rel_err(got, want) <= 1e-4
    assert "exact" not in {row["kernel"] for row in tr.scope()}


def test_kfac_preconditions_the_packed_projection():
    torch.manual_seed(0)
    tr, got, plain = run(Attending(cross=True), precondition="kfac", layers=["attn", "attn.out_proj", "head"])
    assert tr.preconditioner is not None and {row["kernel"] for row in tr.scope()} <= {"ghost", "materialize"}
    assert got.shape == plain.shape and rel_err(got, plain) > 1e-2  # preconditioned: not the plain inner products


def test_broadcast_parameters_are_per_example():
    torch.manual_seed(0)
    tr, got, want = run(Tokens())
    assert rel_err(got, want) <= 1e-4
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    assert kernels[""] == "materialize" and "exact" not in kernels.values()


def test_a_parameter_that_is_not_broadcast_falls_back_to_exact_passes():
    torch.manual_seed(0)
    tr, got, want = run(Tokens(misuse=True))
    assert rel_err(got, want) <= 1e-4
    assert {row["name"]: row["kernel"] for row in tr.scope()}[""] == "exact"


def test_a_later_call_form_without_a_kernel_is_an_error_not_a_dropped_layer():
    """The first batch calls attention batched; the last (one example) unbatched, which has no kernel: one clear error,
    never a layer silently left out."""
    from tracin.errors import TracInError

    class Switching(Attending):
        def forward(self, x):
            if x.shape[0] > 1:
                return super().forward(x)
            return self.head(self.attn(x[0], x[0], x[0], need_weights=False)[0].mean(0, keepdim=True))

    torch.manual_seed(0)
    with pytest.raises(TracInError, match="called in a form its kernel does not cover"):
        run(Switching())

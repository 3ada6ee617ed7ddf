"""Any module, exactly: the per-example fallback for modules without a kernel, raw, tied and broadcast parameters,
parameters used outside their module's forward pass, and exclude=, each against the float64 reference."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import DEVICE, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import Checkpoint, TracIn, TracInError
from tracin.tasks import ClassificationTask

TOL = 1e-4


class Recurrent(nn.Module):
    """An LSTM over batch-first data and a GRU that works sequence-first (the model transposes)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.gru = nn.GRU(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lstm(x)[0]
        return self.head(self.gru(h.transpose(0, 1))[0][-1])


class RawAndBroadcast(nn.Module):
    """A class token and a scale used directly, position embeddings looked up once per batch and broadcast."""

    def __init__(self, d=6, T=5):
        super().__init__()
        self.tok = nn.Embedding(11, d)
        self.pos = nn.Embedding(T + 1, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.scale = nn.Parameter(torch.ones(d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        x = torch.cat([self.cls.expand(ids.shape[0], -1, -1), self.tok(ids)], 1)
        x = x + self.pos(torch.arange(x.shape[1], device=ids.device))[None]  # [1, T+1, d]: one lookup for the batch
        return self.head(torch.tanh(x * self.scale).mean(1))


class Tied(nn.Module):
    """Output weights tied to the input embedding: every use of the shared matrix counts."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 9, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.emb(ids)))).mean(1)


class Attention(nn.Module):
    """nn.MultiheadAttention: packed in_proj (no handler) and an out_proj Linear it calls functionally."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.attn(x, x, x, need_weights=False)[0]).mean(1))


class Volumes(nn.Module):
    """ConvTranspose2d and Conv3d side by side (once the exact fallback's; now each has a kernel of its own)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2)
        self.vol = nn.Conv3d(1, 2, 2)
        self.head = nn.Linear(3 + 2, 3)

    def forward(self, x):
        planes = self.up(x).mean(dim=(2, 3))
        volume = self.vol(x.unsqueeze(1)).mean(dim=(2, 3, 4))
        return self.head(torch.cat([planes, volume], 1))


def vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=12, num_classes=3)


CASES = {
    "recurrent": (Recurrent, lambda g, n: torch.randn(n, 6, 4, generator=g), 2),
    "raw_and_broadcast": (RawAndBroadcast, lambda g, n: torch.randint(0, 11, (n, 5), generator=g), 3),
    "tied": (Tied, lambda g, n: torch.randint(0, 9, (n, 4), generator=g), 9),
    "attention": (Attention, lambda g, n: torch.randn(n, 4, 6, generator=g), 3),
    "vit": (vit, lambda g, n: torch.randn(n, 3, 8, 8, generator=g), 3),
    "volumes": (Volumes, lambda g, n: torch.randn(n, 2, 4, 4, generator=g), 3),
}


# once the exact fallback's, now kernels of their own: Conv3d and ConvTranspose2d, attention's packed projection (its
# forward recomputed during capture), a ViT's class token and position table (broadcast parameters), GRU and LSTM,
# a tied embedding and output head (the uses' gradients summed)
KERNELS_ONLY = {"volumes", "attention", "vit", "recurrent", "tied"}


def case(kind, n_train=9, n_test=4):
    build, inputs, classes = CASES[kind]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    x, y = inputs(g, n_train + n_test), torch.randint(0, classes, (n_train + n_test,), generator=g)
    return model, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def reference(model, raw, train, test, normalize="none"):
    return task_reference_matrix(model, raw, None, ClassificationTask(), [train[i] for i in range(len(train))],
                                 [test[i] for i in range(len(test))], normalize=normalize)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("kernel", ["auto", "ghost", "materialize"])
def test_any_model_matches_the_reference(kind, kernel):
    model, train, test = case(kind)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=4, progress=False, kernel=kernel)
    got = tr.influence_matrix(train, test)
    assert rel_err(got, reference(model, raw, train, test)) <= TOL
    if kernel != "auto":
        return
    exact = [row["name"] for row in tr.scope() if row["kernel"] == "exact"]
    assert (not exact) if kind in KERNELS_ONLY else exact
    assert sum(row["params"] for row in tr.scope()) == sum(p.numel() for p in model.parameters())
    top = tr.influence(train, test, top_k=3)
    assert torch.equal(top.proponents.indices, got.argsort(dim=1, descending=True)[:, :3])
    assert torch.allclose(tr.self_influence(train), reference(model, raw, train, train).diagonal().float(), rtol=1e-4, atol=1e-7)


def test_what_runs_exactly_and_why():
    model, train, test = case("attention")
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    tr = TracIn(model, ckpts, layers=["attn.out_proj", "norm", "head"], device=DEVICE, batch_size=4, progress=False)
    tr.self_influence(train)
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    # called functionally by its parent, whose forward is recomputed only when the packed projection is in scope
    assert kernels["attn.out_proj"] == "exact"
    assert kernels["head"] in ("ghost", "materialize") and kernels["norm"] == "materialize"
    model, train, _ = case("raw_and_broadcast")
    tr = TracIn(model, perturbed_checkpoints(model, [0.1])[0], layers="all", device=DEVICE, batch_size=4, progress=False)
    tr.self_influence(train)
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    assert kernels["pos"] == "exact" and kernels["tok"] in ("ghost", "materialize")  # one lookup for the whole batch


def test_exclude_leaves_parameters_out():
    model, train, test = case("recurrent")
    ckpts, raw = perturbed_checkpoints(model, [0.1])
    tr = TracIn(model, ckpts, layers="all", exclude=["lstm", "gru.bias_*"], device=DEVICE, batch_size=4, progress=False)
    names = [n for row in tr.scope() for n in ([f"{row['name']}.{p}" for p in row["parameters"]] if row["type"] != "parameters"
                                                else row["parameters"])]
    assert sorted(names) == ["gru.weight_hh_l0", "gru.weight_ih_l0", "head.bias", "head.weight"]
    want = task_reference_matrix(model, raw, None, ClassificationTask(), [train[i] for i in range(9)],
                                 [test[i] for i in range(4)])  # all parameters: must differ from the excluded score
    got = tr.influence_matrix(train, test)
    assert rel_err(got, want) > 1e-3
    with pytest.raises(TracInError, match="leaves no parameter in scope"):
        TracIn(model, ckpts, exclude=["*"], progress=False)


@pytest.mark.parametrize("kind", ["tied", "attention"])
@pytest.mark.parametrize("normalize", ["cosine", "train"])
def test_normalisation_reaches_the_recomputed_and_tied_kernels(kind, normalize):
    model, train, test = case(kind)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=4, progress=False, normalize=normalize)
    assert rel_err(tr.influence_matrix(train, test), reference(model, raw, train, test, normalize)) <= TOL


def test_projection_of_exact_parameters_is_unbiased():
    model, train, test = case("recurrent")
    ckpts, raw = perturbed_checkpoints(model, [0.1], scale=0.1)
    exact = reference(model, raw, train, test)
    runs = [TracIn(model, ckpts, layers=["lstm"], device=DEVICE, batch_size=4, progress=False, projection_dim=64,
                   seed=s).influence_matrix(train, test) for s in range(24)]
    lstm_only = task_reference_matrix(model, raw, ["lstm"], ClassificationTask(), [train[i] for i in range(9)],
                                      [test[i] for i in range(4)])
    mean = torch.stack(runs).double().mean(0)
    assert runs[0].shape == (4, 9) and not torch.allclose(runs[0].double(), lstm_only, rtol=1e-3)  # projected: approximate
    assert rel_err(mean, lstm_only) < 0.25 and not torch.allclose(lstm_only, exact)  # unbiased: the mean approaches it


def test_hf_style_conv1d_is_a_transposed_linear_under_every_kernel_and_kfac():
    """A Hugging Face Conv1D (weight [in, out]) scores exactly as the nn.Linear holding the transposed weight, under
    the ghost and materialised kernels and with K-FAC."""

    class Conv1D(nn.Module):  # the layout of transformers.pytorch_utils.Conv1D, without importing transformers
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)

    torch.manual_seed(0)
    hf = nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(3, 7))
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with torch.no_grad():
        for a, b in ((hf[0], plain[0]), (hf[2], plain[2])):
            b.weight.copy_(a.weight.T)
            b.bias.copy_(a.bias)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    train, test = TensorDataset(x[:7], y[:7]), TensorDataset(x[7:], y[7:])
    for kwargs in ({"kernel": "ghost"}, {"kernel": "materialize"}, {"precondition": "kfac"}):
        got, want = (TracIn(m, [Checkpoint(m.state_dict(), learning_rate=0.1)], layers="all", device=DEVICE, progress=False,
                            **kwargs).influence_matrix(train, test) for m in (hf, plain))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), kwargs


class LookedUpOnce(nn.Module):
    """Positions looked up once for the batch as [1, T] (as Hugging Face models do) and broadcast when added; with
    ``pooled``, the lookup is also summed over its first dimension, which expanding it to the batch would change."""

    def __init__(self, pooled=False, d=6, T=5):
        super().__init__()
        self.pooled = pooled
        self.tok, self.pos, self.head = nn.Embedding(11, d), nn.Embedding(T, d), nn.Linear(d, 3)

    def forward(self, ids):
        positions = self.pos(torch.arange(ids.shape[1], device=ids.device)[None])  # [1, T, d]
        x = torch.tanh(self.tok(ids) + positions).mean(1)
        return self.head(x + positions.sum(0).mean(0) if self.pooled else x)


@pytest.mark.parametrize("pooled, kernels", [(False, ("ghost", "materialize")), (True, ("exact",))])
def test_a_table_looked_up_once_for_the_batch_keeps_its_kernel_when_the_losses_allow(pooled, kernels):
    """Expanded to the batch's rows during capture, the positions' output gradient is per example (ghost kernel); where
    the expansion would change a loss (a sum over the lookup's first dimension) the first batch finds it out and the
    table takes exact per-example passes. (The ghost or materialised form is the embedding handler's own choice.) Both equal the float64 reference."""
    torch.manual_seed(0)
    model = LookedUpOnce(pooled)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (13, 5), generator=g), torch.randint(0, 3, (13,), generator=g)
    train, test = TensorDataset(x[:9], y[:9]), TensorDataset(x[9:], y[9:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=4, progress=False)
    assert rel_err(tr.influence_matrix(train, test), reference(model, raw, train, test)) <= TOL
    assert {row["name"]: row["kernel"] for row in tr.scope()}["pos"] in kernels
    assert torch.allclose(tr.self_influence(train), reference(model, raw, train, train).diagonal().float(), rtol=1e-4, atol=1e-7)

"""nn.RNN / nn.GRU / nn.LSTM: per-example gradients from the recomputed forward (sums over time of outer products),
against float64 per-example references, with no per-example backward passes; the forms without a kernel fall back."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import TensorDataset

from helpers import DEVICE, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.tasks import ClassificationTask

T, D, H = 6, 4, 5


class Sequence(nn.Module):
    """One recurrent layer stack in a given form; the head reads the last output and the final hidden states."""

    def __init__(self, cell, packed=False, initial=False, **options):
        super().__init__()
        self.rnn = cell(D, H, **options)
        self.batch_first = options.get("batch_first", False)
        dirs = 2 if options.get("bidirectional") else 1
        self.head = nn.Linear(H * dirs + H, 3)
        self.packed, self.initial, self.lstm = packed, initial, cell is nn.LSTM
        self.layers = options.get("num_layers", 1) * dirs

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        args = (seq,)
        if self.initial:  # a learned-free initial state that depends on the example
            h0 = torch.tanh(x[:, 0, :1]).expand(-1, H).unsqueeze(0).repeat(self.layers, 1, 1).contiguous()
            args = (seq, (h0, h0 * 0.5) if self.lstm else h0)
        if self.packed:
            lengths = torch.where(x[:, 0, 0] > 0, T - 2, T)  # each example's own length
            out, state = self.rnn(pack_padded_sequence(seq, lengths, batch_first=self.batch_first, enforce_sorted=False), *args[1:])
            out = pad_packed_sequence(out, batch_first=self.batch_first, total_length=T)[0]
        else:
            out, state = self.rnn(*args)
        h_n = state[0] if self.lstm else state
        last = (out if self.batch_first else out.transpose(0, 1))[:, -1]
        return self.head(torch.cat([last, h_n[-1]], dim=1))


def run(model, layers="all", **options):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, T, D, generator=g), torch.randint(0, 3, (13,), generator=g)
    train, test = TensorDataset(x[:9], y[:9]), TensorDataset(x[9:], y[9:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers=layers, device=DEVICE, batch_size=4, progress=False, **options)
    got = tr.influence_matrix(train, test)
    want = task_reference_matrix(model, raw, None if layers == "all" else layers, ClassificationTask(),
                                 list(zip(x[:9], y[:9])), list(zip(x[9:], y[9:])))
    return tr, got, want


FORMS = {
    "rnn_tanh": (nn.RNN, {}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}), "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {}),
    "gru_two_layers_bidirectional": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    "lstm_batch_first_no_bias": (nn.LSTM, {"batch_first": True, "bias": False}),
    "lstm_two_layers_bidirectional_batch_first": (nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_recurrent_forms_match_the_reference_without_exact_passes(form):
    torch.manual_seed(0)
    cell, options = FORMS[form]
    tr, got, want = run(Sequence(cell, **options))
    assert rel_err(got, want) <= 1e-4
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    assert kernels["rnn"] == "materialize" and "exact" not in kernels.values()


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_a_given_initial_state_and_projection(cell):
    torch.manual_seed(0)
    model = Sequence(cell, initial=True, num_layers=2)
    tr, got, want = run(model)
    assert rel_err(got, want) <= 1e-4 and {row["name"]: row["kernel"] for row in tr.scope()}["rnn"] == "materialize"
    projected = torch.stack([run(model, layers=["rnn"], projection_dim=64, seed=s)[1] for s in range(16)]).double()
    exact = run(model, layers=["rnn"])[2]
    single = max(rel_err(p, exact) for p in projected)
    assert single > 0.05 and rel_err(projected.mean(0), exact) < single / 2  # projected, and unbiased: the mean approaches


def per_example_loop(model, raw, train, test):
    """float64 TracIn from per-example gradients by one plain backward pass each (packed sequences defeat torch.func)."""
    import copy
    ref = copy.deepcopy(model).double().eval()
    total = 0
    for state, lr in raw:
        ref.load_state_dict({k: v.double() for k, v in state.items()})
        grads = []
        for data in (test, train):
            rows = []
            for x, y in data:
                loss = nn.functional.cross_entropy(ref(x.double()[None]), y[None])
                rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(ref.parameters()))]))
            grads.append(torch.stack(rows))
        total = total + lr * grads[0] @ grads[1].T
    return total


@pytest.mark.parametrize("form", ["packed", "lstm_projection"])
def test_forms_without_a_kernel_fall_back_to_exact_passes(form):
    torch.manual_seed(0)
    model = Sequence(nn.GRU, packed=True) if form == "packed" else Sequence(nn.LSTM, proj_size=H - 2)
    if form == "lstm_projection":
        model.head = nn.Linear((H - 2) * 2, 3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(13, T, D, generator=g), torch.randint(0, 3, (13,), generator=g)
    train, test = TensorDataset(x[:9], y[:9]), TensorDataset(x[9:], y[9:])
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=4, progress=False)
    assert rel_err(tr.influence_matrix(train, test), per_example_loop(model, raw, train, test)) <= 1e-4
    exact = [row for row in tr.scope() if row["kernel"] == "exact"]
    # packed: the handler turned to exact passes on the first batch; a projection: no handler, the exact fallback's
    assert [row["name"] for row in exact] == ["rnn"] if form == "packed" else exact[0]["parameters"][0].startswith("rnn.")


class Twice(nn.Module):
    """The same LSTM over the sequence and over it reversed, its initial state given by keyword: both calls count."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(D, H, batch_first=True)
        self.head = nn.Linear(2 * H, 3)

    def forward(self, x):
        h0 = torch.tanh(x[:, 0].sum(-1, keepdim=True)).expand(-1, H).unsqueeze(0).contiguous()
        first, _ = self.rnn(x, hx=(h0, torch.zeros_like(h0)))
        second, (h_n, _) = self.rnn(x.flip(1))
        return self.head(torch.cat([first[:, -1], second[:, -1] + h_n[0]], dim=1))


def test_every_call_counts_with_a_keyword_state():
    torch.manual_seed(0)
    tr, got, want = run(Twice())
    assert rel_err(got, want) <= 1e-4
    assert {row["name"]: row["kernel"] for row in tr.scope()}["rnn"] == "materialize"

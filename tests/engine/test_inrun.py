"""In-run TracIn against a float64 replay of the same optimisation steps with per-example autograd: self-influence
and influence sums over every step an example was in, for SGD with momentum and a scheduler, AdamW, gradient
accumulation, per-group learning rates, a gradient scaler and conv layers; resume and merge; bad input."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils.data import DataLoader, TensorDataset

from helpers import CNN, MLP, rel_err
from tracin import InRun, Indexed, TracInError
from tracin.errors import DataError

N, NQ = 36, 5


def data(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 8, 10) if kind == "cnn" else (12,)
    X, Xq = torch.randn(N, *shape, generator=g), torch.randn(NQ, *shape, generator=g)
    return X, torch.randint(0, 4, (N,), generator=g), Xq, torch.randint(0, 4, (NQ,), generator=g)


def model_of(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        m = CNN(classes=4)
        m.bn1 = nn.Identity()  # BatchNorm couples a training batch's examples
        return m
    return MLP(12, 16, 4)


def train(kind, make_opt, accumulate=1, scaler=None, epochs=2, layers="all", query_every=1):
    """Train with the recorder; returns (recorder, the steps' (weights, ids, per-parameter lrs))."""
    X, Y, Xq, Yq = data(kind)
    model = model_of(kind)
    opt, sched = make_opt(model)
    rec = InRun(model, opt, N, queries=TensorDataset(Xq, Yq), layers=layers, top_k=4, query_every=query_every)
    loader = DataLoader(Indexed(TensorDataset(X, Y)), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(1))
    log = []
    for _ in range(epochs):
        for step, (ids, x, y) in enumerate(loader):
            lrs = {n: g["lr"] for g in opt.param_groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
            log.append((copy.deepcopy(model.state_dict()), ids.clone(), lrs))
            rec.backward(F.cross_entropy(model(x), y, reduction="none"), ids, weight=1 / accumulate, scaler=scaler)
            if (step + 1) % accumulate == 0:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()
    return rec, log, model


def replay(kind, model, log, names=None):
    """float64 sums of eta * <g, g'> over the logged steps, per-example gradients by autograd at each step's weights."""
    X, Y, Xq, Yq = data(kind)
    ref = copy.deepcopy(model).double()
    names = names or [n for n, _ in ref.named_parameters()]

    def grads(state, x, y):
        params = {k: v.double() for k, v in state.items()}
        loss = lambda p: F.cross_entropy(functional_call(ref, {**params, **p}, (x.double()[None],)), y[None])  # noqa: E731
        g = grad(loss)({n: params[n] for n in names})
        return {n: g[n].reshape(-1) for n in names}

    S, M = torch.zeros(N, dtype=torch.float64), torch.zeros(NQ, N, dtype=torch.float64)
    for state, ids, lrs in log:
        gq = [grads(state, Xq[i], Yq[i]) for i in range(NQ)]
        for i in ids.tolist():
            gi = grads(state, X[i], Y[i])
            S[i] += sum(lrs[n] * gi[n] @ gi[n] for n in names)
            M[:, i] += torch.stack([sum(lrs[n] * q[n] @ gi[n] for n in names) for q in gq])
    return S, M


def sgd(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01), None


def groups(model):
    head = list(model.head.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in head)]
    return torch.optim.SGD([{"params": rest, "lr": 0.05}, {"params": head, "lr": 0.2}]), None


@pytest.mark.parametrize("kind, make_opt, accumulate", [("mlp", sgd, 1), ("mlp", adamw, 2), ("mlp", groups, 1),
                                                        ("cnn", sgd, 1)])
def test_in_run_sums_match_the_float64_replay(kind, make_opt, accumulate):
    rec, log, model = train(kind, make_opt, accumulate)
    S, M = replay(kind, model, log)
    result = rec.result()
    assert rel_err(result.self_influence.double(), S) <= 1e-4
    assert rel_err(rec.influence_matrix(), M) <= 1e-4
    assert torch.equal(result.proponents.indices, rec.influence_matrix().float().topk(4, dim=1).indices)
    assert rec.describe()["steps"] == len(log)


def test_a_gradient_scaler_changes_nothing_recorded():
    plain, log, model = train("mlp", adamw)
    scaled, _, _ = train("mlp", adamw, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    assert rel_err(scaled.result().self_influence, plain.result().self_influence) <= 1e-5
    assert rel_err(scaled.influence_matrix(), plain.influence_matrix()) <= 1e-5


def test_stale_queries_reuse_the_gradients_of_their_step():
    rec, log, model = train("mlp", sgd, query_every=1000)  # the query gradients of the first step, for every step
    X, Y, Xq, Yq = data("mlp")
    first = [(log[0][0], ids, lrs) for _, ids, lrs in log]  # every step's examples, all at the first step's weights
    _, M_first = replay("mlp", model, first)
    S, _ = replay("mlp", model, log)
    assert rel_err(rec.result().self_influence.double(), S) <= 1e-4  # self-influence is never stale
    assert rel_err(rec.influence_matrix(), M_first) > 1e-3  # and the influence is: it is not the first step's alone


def test_resume_and_merge_are_exact(tmp_path):
    full, log, model = train("mlp", sgd)
    X, Y, Xq, Yq = data("mlp")
    halves = []
    for keep in (lambda i: i % 2 == 0, lambda i: i % 2 == 1):  # two ranks' examples
        m = model_of("mlp")
        rec = InRun(m, torch.optim.SGD(m.parameters(), lr=0.1), N)
        for state, ids, lrs in log:
            m.load_state_dict(state)
            mine = torch.tensor([i for i in ids.tolist() if keep(i)])
            rec.optimizer.param_groups[0]["lr"] = lrs["head.weight"]
            rec.backward(F.cross_entropy(m(X[mine]), Y[mine], reduction="none"), mine)
        halves.append(rec)
    torch.save(halves[0].state_dict(), tmp_path / "state.pt")
    m = model_of("mlp")
    resumed = InRun(m, torch.optim.SGD(m.parameters(), lr=0.1), N)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    resumed.merge(halves[1].state_dict())
    assert rel_err(resumed.result().self_influence, full.result().self_influence) <= 1e-6


def test_bad_input_is_refused():
    model = CNN(classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TracInError, match="BatchNorm 'bn1' normalises over the batch"):
        InRun(model, opt, 10)
    rec = InRun(model, opt, 10, exclude=["bn1"])
    x, y = torch.randn(3, 3, 8, 10), torch.randint(0, 4, (3,))
    with pytest.raises(DataError, match="per-example losses"):
        rec.backward(F.cross_entropy(model(x), y), [0])
    with pytest.raises(DataError, match="2 example ids for a batch of 3"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), [0, 1])
    with pytest.raises(DataError, match="positions 0..9"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), [0, 1, 10])
    other = torch.optim.SGD(list(model.fc.parameters()), lr=0.1)
    rec = InRun(model, other, 10, layers="conv1")
    with pytest.raises(TracInError, match="none of its parameters is in the optimizer"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), [0, 1, 2])


class Shared(nn.Module):
    """A head whose weight the parent also uses functionally, and a position table looked up once per batch."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x [B, 4, 6]
        h = x + self.pos(torch.arange(4)).unsqueeze(0)
        return self.head(h.mean(1)) + F.linear(h.mean(1), self.head.weight)


def test_shared_and_broadcast_layers_are_refused_at_the_first_step():
    model = Shared()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = InRun(model, opt, 5, layers="head")
    with pytest.raises(TracInError, match="'head' are also used outside its own forward calls"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), torch.arange(5))
    rec.remove()
    opt.zero_grad()
    rec = InRun(model, opt, 5, layers="pos")
    with pytest.raises(TracInError, match="'pos' ran on 4 rows for a batch of 5 examples"):
        rec.backward(F.cross_entropy(model(x), y, reduction="none"), torch.arange(5))


def test_in_run_kfac_matches_a_float64_replay_of_its_moving_average_fisher():
    """precondition="kfac": at every step the batch's factor covariances join moving averages (forgetting over one
    pass of the data), their damped inverses P_in, P_out are taken (every step here: 36 examples in batches of 6), and
    each query's layer gradient P_out G_q P_in meets the batch's plain gradients."""
    X, Y, Xq, Yq = data("mlp")
    torch.manual_seed(0)
    model = MLP(12, 16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = InRun(model, opt, N, queries=TensorDataset(Xq, Yq), precondition="kfac", damping=0.1)
    loader = DataLoader(Indexed(TensorDataset(X, Y)), batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(1))
    log = []
    for _ in range(2):
        for ids, x, y in loader:
            opt.zero_grad()
            log.append((copy.deepcopy(model.state_dict()), ids.clone()))
            rec.backward(F.cross_entropy(model(x), y, reduction="none"), ids)
            opt.step()
    layers = ["fc1", "fc2", "head"]
    ref = copy.deepcopy(model).double()
    stats = {name: [0.0, 0.0] for name in layers}
    count, M = 0.0, torch.zeros(NQ, N, dtype=torch.float64)

    def factors(x, y):  # per-example layer inputs (with the bias's 1) and output gradients, float64
        seen = {}
        hooks = [getattr(ref, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o))) for n in layers]
        losses = F.cross_entropy(ref(x.double()), y, reduction="none")
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(losses.sum(), [seen[n][1] for n in layers])
        return {n: (torch.cat([seen[n][0].detach(), torch.ones(len(x), 1, dtype=torch.float64)], 1), g) for n, g in zip(layers, grads)}

    def inverse(S):
        return torch.linalg.inv(S + 0.1 * torch.trace(S) / S.shape[0] * torch.eye(S.shape[0], dtype=S.dtype))

    for state, ids in log:
        ref.load_state_dict({k: v.double() for k, v in state.items()})
        train, query = factors(X[ids], Y[ids]), factors(Xq, Yq)
        keep = 1 - len(ids) / N
        count = count * keep + len(ids)
        for n in layers:
            a, d = train[n]
            stats[n] = [stats[n][0] * keep + a.T @ a, stats[n][1] * keep + d.T @ d]
            P_in, P_out = inverse(stats[n][0] / count), inverse(stats[n][1] / count)
            aq, dq = query[n]
            Gq = torch.einsum("qo,qi->qoi", dq @ P_out, aq @ P_in)
            M[:, ids] += 0.1 * torch.einsum("qoi,boi->qb", Gq, torch.einsum("bo,bi->boi", d, a))
    assert rel_err(rec.influence_matrix(), M) <= 1e-4


def test_settings_are_checked():
    model = MLP(12, 16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TracInError, match="query_every, top_k and query_batch_size must be at least 1"):
        InRun(model, opt, 10, query_every=0)
    with pytest.raises(TracInError, match="precondition must be none or kfac"):
        InRun(model, opt, 10, precondition="ekfac")
    with pytest.raises(TracInError, match="fields of tracin.engine.inrun.InRunConfig"):
        InRun(model, opt, 10, layer="all")
    shared = Shared()
    with pytest.raises(TracInError, match="precondition='kfac' covers Linear and Conv layers only, and 'pos'"):
        InRun(shared, torch.optim.SGD(shared.parameters(), lr=0.1), 10, precondition="kfac")

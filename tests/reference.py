"""A naive, float64 per-example-gradient reference for TracIn (torch.func vmap of grad)."""
from __future__ import annotations

import copy
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

LossOnOutput = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y, reduction="none")


def scope_names(model: nn.Module, modules: Sequence[str]) -> List[str]:
    """Full names of the trainable parameters directly owned by ``modules``."""
    names = []
    for mname in modules:
        mod = model.get_submodule(mname)
        for pname, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                names.append(f"{mname}.{pname}" if mname else pname)
    return names


def per_example_grads(model: nn.Module, names: Sequence[str], x: torch.Tensor, y: torch.Tensor,
                      loss: LossOnOutput = cross_entropy) -> torch.Tensor:
    """[B, P] flattened per-example gradients of ``loss(model(x_i), y_i)`` w.r.t. ``names``."""
    state = {k: v for k, v in model.named_parameters()}
    state.update(dict(model.named_buffers()))
    scoped = {n: state[n].detach() for n in names}

    def f(p, xi, yi):
        out = functional_call(model, {**state, **p}, (xi.unsqueeze(0),))
        return loss(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(f), in_dims=(None, 0, 0))(scoped, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in names], dim=1)


def reference_matrix(model: nn.Module, checkpoints: Sequence[Tuple[dict, float]], modules: Sequence[str],
                     train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                     loss: LossOnOutput = cross_entropy, normalize: str = "none") -> torch.Tensor:
    """TracInCP [n_test, n_train] in float64: sum_c lr_c <g_test, g_train>. ``normalize``: "train"
    scales training gradients to unit length per checkpoint, "cosine" test gradients too."""
    ref = copy.deepcopy(model).double().eval()
    names = scope_names(ref, modules)
    total = None
    for state, lr in checkpoints:
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        to64 = (lambda t: t.double() if t.is_floating_point() else t)
        g_train = per_example_grads(ref, names, to64(train[0]), train[1], loss)
        g_test = per_example_grads(ref, names, to64(test[0]), test[1], loss)
        if normalize != "none":
            g_train = g_train / g_train.norm(dim=1, keepdim=True)
        if normalize == "cosine":
            g_test = g_test / g_test.norm(dim=1, keepdim=True)
        m = lr * g_test @ g_train.T
        total = m if total is None else total + m
    return total.detach()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))



def task_per_example_grads(model: nn.Module, names: Sequence[str], task, items: Sequence) -> torch.Tensor:
    """[n, P] per-example gradients of ``task.loss`` on one-example batches (a naive loop of
    torch.func.grad over functional_call; works for any task, e.g. ranking pairs or triples)."""
    from torch.utils.data import default_collate

    class Bound(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return task.loss(self.model, batch).sum()

    bound = Bound()
    state = {f"model.{k}": v for k, v in model.named_parameters()}
    state.update({f"model.{k}": v for k, v in model.named_buffers()})
    scoped = {f"model.{n}": state[f"model.{n}"].detach() for n in names}
    rows = []
    for item in items:
        batch = default_collate([item])
        g = grad(lambda p: functional_call(bound, {**state, **p}, (batch,)))(scoped)
        rows.append(torch.cat([g[f"model.{n}"].reshape(-1) for n in names]))
    return torch.stack(rows)


def task_reference_matrix(model: nn.Module, checkpoints: Sequence[Tuple[dict, float]], modules: Sequence[str], task,
                          train: Sequence, test: Sequence) -> torch.Tensor:
    """TracInCP [n_test, n_train] in float64 for any task (items: what the datasets yield, float
    tensors cast to float64). Calls ``task.on_checkpoint`` after loading each checkpoint."""
    ref = copy.deepcopy(model).double().eval()
    names = scope_names(ref, modules)
    to64 = (lambda item: tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in item))
    train64, test64 = [to64(i) for i in train], [to64(i) for i in test]
    total = None
    for index, (state, lr) in enumerate(checkpoints):
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        if hasattr(task, "on_checkpoint"):
            with torch.no_grad():
                task.on_checkpoint(ref, index)
        m = lr * task_per_example_grads(ref, names, task, test64) @ task_per_example_grads(ref, names, task, train64).T
        total = m if total is None else total + m
    return total.detach()

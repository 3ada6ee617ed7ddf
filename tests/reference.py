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


def _layer_positions(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-position inputs a [B, g, T, da] and output gradients d [B, g, T, dd] of a Linear or Conv2d call."""
    B = x.shape[0]
    if isinstance(module, nn.Linear):
        return x.reshape(B, 1, -1, x.shape[-1]), dy.reshape(B, 1, -1, dy.shape[-1])
    assert isinstance(module, nn.Conv2d)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = torch.nn.functional.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    cols = torch.nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    g = module.groups
    L = cols.shape[-1]
    return (cols.view(B, g, -1, L).transpose(2, 3),
            dy.reshape(B, g, module.out_channels // g, L).transpose(2, 3))


def kfac_reference_matrix(model: nn.Module, checkpoints: Sequence[Tuple[dict, float]], modules: Sequence[str],
                          train: Tuple[torch.Tensor, torch.Tensor], test: Tuple[torch.Tensor, torch.Tensor],
                          damping: float = 0.1, self_only: bool = False) -> torch.Tensor:
    """K-FAC-preconditioned TracInCP in float64, written out naively: per checkpoint and layer, the
    factors S_in = mean_i sum_t [a;1][a;1]^T and S_out = mean_i sum_t d d^T over ``train`` (d: gradient
    of example i's loss at the layer's output), damped by ``damping`` times their mean eigenvalue and
    inverted; the per-example gradient matrices M_i [g, dd, da(+1)] from torch.func; score
    sum_c lr_c sum_layers <S_out^-1 M_test S_in^-1, M_train>. Returns [n_test, n_train], or the
    self-influence [n_train] with ``self_only``."""
    ref = copy.deepcopy(model).double().eval()
    total = None
    for state, lr in checkpoints:
        ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        x, y = train[0].double(), train[1]
        seen: dict = {}
        hooks = [ref.get_submodule(m).register_forward_hook(_keep(seen, m)) for m in modules]
        cross_entropy(ref(x), y).sum().backward()
        for h in hooks:
            h.remove()
        ref.zero_grad()
        for m in modules:
            module = ref.get_submodule(m)
            inputs, out = seen[m]
            a, d = _layer_positions(module, inputs, out.grad)
            has_bias = module.bias is not None and module.bias.requires_grad
            if has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            n = x.shape[0]
            inv = []
            for f in (a, d):
                S = torch.einsum("bgti,bgtj->gij", f, f) / n
                lam = damping * torch.diagonal(S, dim1=1, dim2=2).mean(1)
                inv.append(torch.linalg.inv(S + lam[:, None, None] * torch.eye(S.shape[-1], dtype=S.dtype)))
            names = scope_names(ref, [m])

            def matrices(data):
                flat = per_example_grads(ref, names, data[0].double(), data[1])
                g, dd = a.shape[1], d.shape[-1]
                weight = flat[:, :module.weight.numel()].reshape(flat.shape[0], g, dd, -1)
                if not has_bias:
                    return weight
                return torch.cat([weight, flat[:, module.weight.numel():].reshape(flat.shape[0], g, dd, 1)], dim=-1)

            M_train = matrices(train)
            M_test = M_train if self_only else matrices(test)
            pre = torch.einsum("gij,bgjk,gkl->bgil", inv[1], M_test, inv[0])
            s = lr * ((pre * M_train).sum(dim=(1, 2, 3)) if self_only else torch.einsum("mgij,ngij->mn", pre, M_train))
            total = s if total is None else total + s
    return total.detach()


def _keep(seen: dict, name: str):
    def hook(module, inputs, output):
        output.retain_grad()
        seen[name] = (inputs[0].detach(), output)
    return hook

"""Preconditioners considered for the default and not adopted, on the LDS harness of
:mod:`tracin.workflows.evaluation.lds`: EK-FAC, Adam-aware TracIn (the step the optimizer took), an unrolled
(SOURCE-style) form of K-FAC TracIn and checkpoint weightings, each against the shipped default (K-FAC TracIn).

    python benchmarks/lds_preconditioners.py --output_dir O     # about 5 minutes on 2 CPU cores

The alternatives are computed here in float64 from per-example quantities (the per-layer inputs a and
output-gradients d of every Linear layer for the MLPs, per-example gradients by torch.func for Adam-aware), at every
checkpoint of the attributed run; the default and plain rows come from the library.

- EK-FAC (George et al. 2018, kronfluence's default): K-FAC's eigenbases Q_in, Q_out, eigenvalues replaced by the
  per-example second moments of the rotated gradients, damping 0.1 x their mean.
- Adam-aware: g_test^T diag(1 / (sqrt(v_hat) + eps)) g_train with v_hat Adam's bias-corrected second moment read
  from each checkpoint's optimizer state (exact diagonal), and its Adafactor factorisation v ~ r c^T / sum(v), a
  Kronecker product of diagonals that the ghost kernels could apply exactly.
- Unrolled: each epoch a segment of T steps at effective rate eta (lr / (1 - momentum)) with curvature K-FAC's
  A (x) S; a training example's effect is (1 - exp(-eta T H)) H^-1 g carried to the end of training through the
  later segments' exp(-eta T H) and measured with the final test gradient (Bae et al. 2024's SOURCE with K-FAC);
  ``x10`` multiplies eta T by 10.
- Checkpoint weights: the default with checkpoint c's learning rate scaled by 1/sqrt(c + 1) (early checkpoints
  count more) or by (c + 1).
"""
import argparse
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from tracin import Checkpoint, TracIn
from tracin.workflows.evaluation.lds import LDSRow, LDSRun, LDSSetting, format_row, prepare

SETTINGS = [LDSSetting(data="digits", model="mlp"), LDSSetting(data="mnist1d", model="mlp"),
            LDSSetting(data="digits", model="mlp", optimizer="adamw"), LDSSetting(data="digits", model="cnn", optimizer="adamw")]
Factors = List[Tuple[torch.Tensor, torch.Tensor]]  # per Linear layer: a [N, in + 1], d [N, out]


def linear_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Factors:
    """Per Linear layer of a float64 Sequential: inputs with a trailing 1 and per-example loss output-gradients."""
    inputs, outputs = [], []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0]) or outputs.append(o))
             for m in model if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), outputs)
    for h in hooks:
        h.remove()
    return [(torch.cat([a, a.new_ones(len(a), 1)], 1).detach(), d.detach()) for a, d in zip(inputs, grads)]


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{name: [N, *shape]} per-example loss gradients."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


class Run:
    """The shared LDS run (:class:`LDSRun`) and its float64 per-example quantities."""

    def __init__(self, lds: LDSRun):
        self.lds, self.setting, self.train, self.test = lds, lds.setting, lds.train, lds.test
        self.model, self.checkpoints = lds.model, lds.checkpoints

    def at(self, c: int) -> nn.Module:
        return self.lds.model_at(c).double()

    def factors(self, c: int) -> Tuple[Factors, Factors]:
        model, (x, y), (xt, yt) = self.at(c), self.train, self.test
        return linear_factors(model, x.double(), y), linear_factors(model, xt.double(), yt)

    def row(self, name: str, compute: Callable[[], torch.Tensor]) -> LDSRow:
        begin = time.perf_counter()
        scores = compute()
        return self.lds.row(name, scores.float(), time.perf_counter() - begin)


def library(run: Run, weights: Callable[[int], float] = lambda c: 1.0, **keywords) -> torch.Tensor:
    checkpoints = [Checkpoint(c.source, learning_rate=c.learning_rate * weights(i)) for i, c in enumerate(run.checkpoints)]
    return TracIn(run.model, checkpoints, progress=False, batch_size=500, **keywords).influence_matrix(
        TensorDataset(*run.train), TensorDataset(*run.test))


def eigenbasis(a: torch.Tensor, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q_in, Q_out, K-FAC eigenvalues [out, in], EK-FAC eigenvalues [out, in]) of one layer's training factors."""
    e_in, q_in = torch.linalg.eigh(a.T @ a / len(a))
    e_out, q_out = torch.linalg.eigh(d.T @ d / len(d))
    corrected = ((d @ q_out) ** 2).T @ ((a @ q_in) ** 2) / len(a)
    return q_in, q_out, torch.outer(e_out.clamp_min(0), e_in.clamp_min(0)), corrected


def ekfac(run: Run) -> torch.Tensor:
    total = 0
    for c in range(len(run.checkpoints)):
        train, test = run.factors(c)
        for (a, d), (at, dt) in zip(train, test):
            q_in, q_out, _, lam = eigenbasis(a, d)
            scaled = torch.einsum("to,ti->toi", dt @ q_out, at @ q_in) / (lam + 0.1 * lam.mean())
            total = total + torch.einsum("toi,no,ni->tn", scaled, d @ q_out, a @ q_in)
    return total


def unrolled(run: Run, stretch: float = 1.0) -> torch.Tensor:
    """SOURCE-style: segments carried to the end by exp(-eta T H), measured with the final test gradient."""
    s = run.setting
    eta_t = stretch * (s.lr / 0.1 if s.optimizer == "sgd" else s.lr) * math.ceil(len(run.train[0]) / s.batch_size)
    per = [run.factors(c) for c in range(len(run.checkpoints))]
    total = 0
    for layer in range(len(per[0][0])):
        at, dt = per[-1][1][layer]
        v = torch.einsum("to,ti->toi", dt, at)  # the final test gradients [n_test, out, in]
        for c in reversed(range(len(per))):
            a, d = per[c][0][layer]
            q_in, q_out, lam, _ = eigenbasis(a, d)
            rotated = q_out.T @ v @ q_in
            gain = torch.where(lam > 1e-12, -torch.expm1(-eta_t * lam) / lam.clamp_min(1e-12), torch.full_like(lam, eta_t))
            total = total + torch.einsum("toi,no,ni->tn", rotated * gain, d @ q_out, a @ q_in)
            v = q_out @ (rotated * torch.exp(-eta_t * lam)) @ q_in.T
    return total


def adam_aware(run: Run, factorised: bool) -> torch.Tensor:
    """g_test^T diag(1 / (sqrt(v_hat) + eps)) g_train summed over checkpoints (lr-weighted as TracIn)."""
    total = 0
    for c, checkpoint in enumerate(run.checkpoints):
        model = run.at(c)
        state = checkpoint.source["optimizer_state_dict"]["state"]
        train = per_example_grads(model, run.train[0].double(), run.train[1])
        test = per_example_grads(model, run.test[0].double(), run.test[1])
        for i, name in enumerate(train):
            v = state[i]["exp_avg_sq"].double() / (1 - 0.999 ** float(state[i]["step"]))
            if factorised and v.dim() > 1:
                v2 = v.flatten(1)
                v = ((v2.sum(1, keepdim=True) @ v2.sum(0, keepdim=True)) / v2.sum()).view_as(v)
            scale = 1 / (v.sqrt() + 1e-8)
            total = total + checkpoint.learning_rate * (test[name] * scale).flatten(1) @ train[name].flatten(1).T
    return total


def methods(run: Run) -> Dict[str, Callable[[], torch.Tensor]]:
    out = {"default (K-FAC TracIn)": lambda: library(run), "plain TracIn": lambda: library(run, precondition="none"),
           "K-FAC, checkpoint weights 1/sqrt(c+1)": lambda: library(run, lambda c: (c + 1) ** -0.5),
           "K-FAC, checkpoint weights c+1": lambda: library(run, lambda c: c + 1.0)}
    if run.setting.model == "mlp":
        out.update({"EK-FAC TracIn": lambda: ekfac(run), "unrolled K-FAC (SOURCE-style)": lambda: unrolled(run),
                    "unrolled K-FAC, eta T x10": lambda: unrolled(run, 10.0)})
    if run.setting.optimizer == "adamw":
        out.update({"Adam-aware, exact diagonal": lambda: adam_aware(run, False),
                    "Adam-aware, Adafactor factorised": lambda: adam_aware(run, True)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for setting in SETTINGS:
        print(f"\n## {setting.data}, {setting.model}, {setting.optimizer}\n| method | LDS | 95% interval | seconds |\n|---|---|---|---|")
        run = Run(prepare(setting, args.output_dir / "cache", log=lambda line: None))
        run.lds.warm_up()
        for name, compute in methods(run).items():
            print(format_row(run.row(name, compute)), flush=True)


if __name__ == "__main__":
    main()

"""The exact fallback: parameters that no per-module kernel covers are scored from per-example gradients
computed one example at a time (materialised, [B, P]).

It covers what the module handlers cannot: modules without a handler (custom modules, an LSTM with projections),
parameters used directly in a forward pass that are not broadcast over the batch (scale vectors), parameters tied
between modules when a use has no kernel (every use summed, cross terms included) and, chosen by the engine at run
time, a handler's parameters when they turn out to be broadcast across the batch, used outside the module's forward
pass, or called in a form their kernel does not cover (packed sequences). It costs one forward and backward
pass per example for the whole model: exact for any model, slower than the kernels, so it is used only for
the parameters that need it (``TracIn.scope()`` shows the kernel ``exact``; ``exclude=`` leaves parameters out).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .base import LayerHandler


class ExactHandler(LayerHandler):
    """The parameters of ``model`` named in ``names`` (full dotted names), scored by per-example backward passes.
    Its factors are made by the engine (:func:`tracin.engine.capture.per_example_gradients`), not from hooks."""

    modes = ("exact",)
    hooked = False  # no forward hook: the engine differentiates each example's loss with respect to the parameters

    def __init__(self, model: nn.Module, names: List[str]):
        self.owners = {n: n.rsplit(".", 1)[0] if "." in n else "" for n in names}
        super().__init__(exact_name(names), model, list(names))

    def parameters(self) -> List[torch.Tensor]:
        return [self.module.get_parameter(n) for n in self.param_names]

    def full_names(self) -> List[str]:
        return list(self.param_names)


def exact_name(names: List[str]) -> str:
    """The scope name of an exact handler: its parameters, shortened."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"exact per-example gradients ({shown})"

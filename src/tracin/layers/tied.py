"""A parameter shared by several modules (a language model's token table tied to its output head): every use keeps its
own module's kernel, and the example's gradient is the sum of the uses' gradients.

Each use is recorded as its module's calls (an Embedding's lookups, a Linear's inputs and output gradients), and its
handler materialises the per-example gradient of the shared parameter in the parameter's own layout ([V, d] for both
an Embedding table and a Linear weight); the uses' gradients are summed, so every cross term (embedding x head) is in
the inner products. No per-example passes: one forward and backward per batch, as for any other layer. The engine
checks on the first batch that the sum equals autograd's gradient (a use it does not see, such as the weight called
functionally, sends the parameter back to the exact per-example path).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .base import Call, LayerHandler, LayerRun
from .factors import GradFactors, Materialised


class TiedHandler(Materialised, LayerHandler):
    """The parameter shared by its uses' ``handlers``, one per module using it, each scoring only that parameter of its
    module (the first names it). ``Call.part`` is the use's index."""

    def __init__(self, handlers: List[LayerHandler]):
        self.handlers = handlers
        names = [h.full_names()[0] for h in handlers]
        super().__init__(f"{names[0]} (tied to {', '.join(names[1:])})", handlers[0].module, list(handlers[0].param_names))

    def uses(self) -> List[nn.Module]:
        return [h.module for h in self.handlers]

    def full_names(self) -> List[str]:
        return self.handlers[0].full_names()

    def per_example(self, calls: List[Call]) -> List[torch.Tensor]:
        total = None
        for part, handler in enumerate(self.handlers):
            mine = [c for c in calls if c.part == part]
            if not mine:
                continue
            dense = handler.factors(mine, LayerRun(mode="materialize"))
            assert isinstance(dense, GradFactors), f"{handler.name}: a tied use materialises its gradients"
            total = dense.G if total is None else total + dense.G
        assert total is not None, f"{self.name}: no use of the tied parameter ran"
        return [total]

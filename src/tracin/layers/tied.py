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

from typing import List, Tuple

import torch
from torch import nn

from .base import Call, LayerHandler, LayerRun
from .factors import GradFactors, Materialised

Use = Tuple[str, nn.Module, str]  # (module name, module, the shared parameter's name in it)


class TiedHandler(Materialised, LayerHandler):
    """The shared parameter of ``uses`` (its first use names it); ``handlers``: one per use, each scoring only the
    shared parameter of its module. ``Call.part`` is the use's index."""

    def __init__(self, uses: List[Use], handlers: List[LayerHandler]):
        self.use_modules = [module for _, module, _ in uses]
        self.handlers = handlers
        names = [f"{n}.{p}" if n else p for n, _, p in uses]
        _, first, param = uses[0]
        super().__init__(f"{names[0]} (tied to {', '.join(names[1:])})", first, [param])
        self.first_name = names[0]

    def uses(self) -> List[nn.Module]:
        return list(self.use_modules)

    def full_names(self) -> List[str]:
        return [self.first_name]

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

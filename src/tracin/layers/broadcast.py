"""Raw parameters broadcast over the batch: a ViT's class token and position table, any [1, ...] parameter that a
module's forward adds to or concatenates onto every example.

Such a parameter p [1, ...] enters example b's computation through the broadcast, so its per-example gradient is
the gradient at p's broadcast copy for row b. While a batch is captured, each read of p returns
``p.expand(B, ...)`` (through a parametrization that is removed afterwards, leaving the module as it was): the module
computes the same outputs, and the gradient at that expanded tensor is [B, ...], every example's own. The engine
checks on the first batch that the losses are unchanged and that the per-example gradients sum to autograd's, and
otherwise scores the parameter by exact per-example passes. The gradients are materialised (they are as large as p).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import Call, LayerHandler, Record, Recorded, zero_delta_like
from .factors import Materialised


def broadcastable(param: torch.Tensor) -> bool:
    """Whether a raw parameter looks broadcast over the batch: a leading dimension of 1 ahead of at least one more."""
    return param.dim() >= 2 and param.shape[0] == 1


class _Rows(nn.Module):
    """The parametrization in force during capture: p [1, ...] read as its expansion [rows, ...], each read recorded."""

    def __init__(self, rows: int, part: int, record: Record):
        super().__init__()
        self.rows, self.part, self.record = rows, part, record

    def forward(self, param: torch.Tensor) -> torch.Tensor:
        expanded = param.expand(self.rows, *param.shape[1:])
        self.record(Recorded((), expanded, self.part))
        return expanded


class BroadcastParameterHandler(Materialised, LayerHandler):
    """Raw [1, ...] parameters owned directly by a module that no other handler covers."""

    capture = "parameter"
    broadcast_rows = True

    @contextmanager
    def expanded(self, rows: int, record: Record) -> Iterator[None]:
        for part, name in enumerate(self.param_names):
            parametrize.register_parametrization(self.module, name, _Rows(rows, part, record), unsafe=True)
        try:
            yield
        finally:
            for name in self.param_names:
                parametrize.remove_parametrizations(self.module, name, leave_parametrized=False)

    def per_example(self, calls: List[Call]) -> List[torch.Tensor]:
        """Every read of a parameter summed: its gradient at the expanded copy, [B, numel]."""
        params = self.parameters()
        rows = max(c.rows or 0 for c in calls)
        sums: List[Optional[torch.Tensor]] = [None] * len(params)
        for call in calls:
            delta = call.delta if call.delta is not None else zero_delta_like(call, params[call.part])
            flat = delta.reshape(rows, -1)
            sums[call.part] = flat if sums[call.part] is None else sums[call.part] + flat
        return [s if s is not None else p.new_zeros(rows, p.numel()) for s, p in zip(sums, params)]

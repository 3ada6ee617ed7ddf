"""nn.Embedding: the gradient lives on the looked-up rows; ghost products match indices.

When an example looks up at least as many rows as the table has (a knowledge-graph model scoring
every entity as a candidate tail), the per-example gradient [V, d] is no larger than the index
factors and far cheaper to multiply: the handler then materialises it by a scatter-add.
"""
from __future__ import annotations

from typing import List, Union

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .base import Call, LayerHandler, LayerRun, zero_delta_like
from .factors import GradFactors, IndexFactors


class EmbeddingHandler(LayerHandler):
    """Index factors: idx [B, T] and output gradients D [B, T, d]; padding_idx rows get no gradient."""

    module_types = (nn.Embedding,)
    modes = ("ghost", "materialize")
    shares_layout = True
    broadcast_rows = True  # a table looked up once per batch (positions [1, T]) and broadcast: its rows repeat

    def check(self) -> None:
        if self.module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"Embedding {self.name!r} uses scale_grad_by_freq, which couples the examples of a batch, so per-example "
                "gradients are not defined; build it with scale_grad_by_freq=False or exclude it from layers."
            )

    def _index_factors(self, calls: List[Call]) -> IndexFactors:
        """Looked-up rows [B, T] and their output gradients [B, T, d] over every call (padding rows zeroed)."""
        idx_parts, d_parts = [], []
        for call in calls:
            idx = call.args[0]
            delta = call.delta if call.delta is not None else zero_delta_like(call, self.module.weight)
            B = delta.shape[0]
            if idx.dim() and idx.shape[0] == 1 and B > 1:  # looked up once, its output expanded to the batch's rows
                idx = idx.expand(B, *idx.shape[1:])
            idx = idx.reshape(B, -1)
            d = delta.reshape(B, idx.shape[1], -1)
            if self.module.padding_idx is not None:
                d = d * (idx != self.module.padding_idx).unsqueeze(-1).to(d.dtype)
            idx_parts.append(idx)
            d_parts.append(d)
        return IndexFactors(torch.cat(idx_parts, 1), torch.cat(d_parts, 1))

    def batch_gradients(self, calls: List[Call]) -> List[torch.Tensor]:
        f = self._index_factors(calls)
        d = f.D.shape[-1]
        return [f.D.new_zeros(self.module.weight.shape).index_add_(0, f.idx.reshape(-1), f.D.reshape(-1, d))]

    def factors(self, calls: List[Call], run: LayerRun, whitening: object = None) -> Union[IndexFactors, GradFactors]:
        factors = self._index_factors(calls)
        idx, D = factors.idx, factors.D
        if run.mode is None:  # dense only where it is no larger than the index factors
            run.mode = "materialize" if self.module.num_embeddings <= idx.shape[1] else "ghost"
        if run.mode == "materialize":
            B, V, d = idx.shape[0], self.module.num_embeddings, D.shape[-1]
            G = D.new_zeros(B, V, d).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), D)
            dense = GradFactors(G.reshape(B, V * d))
            return run.projector.grads(self.name, dense) if run.projector is not None else dense
        return run.projector.index(self.name, factors) if run.projector is not None else factors

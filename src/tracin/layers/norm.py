"""Normalisation layers (and PReLU): few parameters, so per-example gradients are materialised
exactly with torch.func (vmap of the vector-Jacobian product at the captured output gradient)."""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import UnsupportedModuleError
from .base import Call, LayerHandler, LayerRun, zero_delta_like
from .factors import GradFactors

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OTHERS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU)
_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()


class NormHandler(LayerHandler):
    """LayerNorm, GroupNorm, RMSNorm, InstanceNorm, PReLU, and BatchNorm with running statistics
    (used in eval mode). Gradients: GradFactors [B, P] with P the affine parameter count."""

    module_types = BATCH_NORMS + _OTHERS + _RMS

    def check(self) -> None:
        if isinstance(self.module, BATCH_NORMS) and not self.module.track_running_stats:
            raise UnsupportedModuleError(
                f"BatchNorm {self.name!r} keeps no running statistics (track_running_stats=False), so even in eval mode it "
                "normalises over the batch and per-example gradients are not defined; train it with running statistics "
                "or exclude it from layers."
            )

    def batch_gradients(self, calls: List[Call]) -> List[torch.Tensor]:
        summed = self._per_example(calls).sum(0)
        params = self.parameters()
        return [part.reshape(p.shape) for part, p in zip(summed.split([p.numel() for p in params]), params)]

    def factors(self, calls: List[Call], run: LayerRun, whitening: object = None) -> GradFactors:
        run.mode = "materialize"
        factors = GradFactors(self._per_example(calls))
        return run.projector.grads(self.name, factors) if run.projector is not None else factors

    def _per_example(self, calls: List[Call]) -> torch.Tensor:
        """Per-example gradients [B, P] of the parameters in scope, summed over the calls."""
        module = self.module
        names = self.param_names
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if n in names}

        def one_example(p, x, d):
            out = functional_call(module, p, (x.unsqueeze(0),))
            return (out * d.unsqueeze(0)).sum()

        per_example = vmap(grad(one_example), in_dims=(None, 0, 0))
        total = None
        dtype = next(iter(params.values())).dtype
        for call in calls:
            x = call.args[0].detach().to(dtype)
            delta = (call.delta if call.delta is not None else zero_delta_like(call, x)).to(dtype)
            grads = per_example(params, x, delta)
            flat = torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1)
            total = flat if total is None else total + flat
        return total

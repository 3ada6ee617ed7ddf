"""ConvTranspose1d / ConvTranspose2d: materialised per-example gradients from one unfolding, no per-example passes.

A transposed convolution adds ``x[:, p] w[:, :, k]`` to output position ``p * stride + k * dilation - padding``, so
the weight gradient of one example is ``sum_p x[:, p] (x) delta_patch_p`` where ``delta_patch_p`` gathers the output
gradient at those positions: the output gradient, zero-padded by ``padding`` and unfolded with the layer's own
kernel, dilation and stride, has exactly one patch per input position (``output_padding`` only adds positions past
the last patch). Per group, weight gradients are then the Linear layer's sum over positions of outer products. The bias
gradient is the output gradient summed over every position, which has no such factor form, so the per-example
gradients are always materialised (and K-FAC, which needs the factor form, does not cover these layers).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from .base import Call, LayerHandler, LayerRun, zero_delta_like
from .factors import GradFactors, weight_gradients


class ConvTransposeHandler(LayerHandler):
    """nn.ConvTranspose1d / nn.ConvTranspose2d with any stride, padding, output padding, dilation and groups:
    GradFactors [B, P] (see the module docstring)."""

    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d)

    def factors(self, calls: List[Call], run: LayerRun, whitening: object = None) -> GradFactors:
        run.mode = "materialize"
        factors = GradFactors(self._per_example(calls))
        return run.projector.grads(self.name, factors) if run.projector is not None else factors

    def batch_gradients(self, calls: List[Call]) -> List[torch.Tensor]:
        summed = self._per_example(calls).sum(0)
        params = self.parameters()
        return [part.reshape(p.shape) for part, p in zip(summed.split([p.numel() for p in params]), params)]

    def _per_example(self, calls: List[Call]) -> torch.Tensor:
        """[B, P]: each example's gradient of the parameters in scope, summed over the calls."""
        total = None
        for call in calls:
            x = call.args[0]
            if x.dim() == len(self.module.kernel_size) + 1:
                raise UnsupportedModuleError(f"Module {self.name!r} was called on an unbatched input; give it a batch "
                                             "dimension.")
            delta = call.delta if call.delta is not None else zero_delta_like(call, x)
            pieces = []
            if self.in_scope("weight"):
                pieces.append(self._weight_grad(x, delta).reshape(x.shape[0], -1))
            if self.in_scope("bias"):
                pieces.append(delta.reshape(delta.shape[0], delta.shape[1], -1).sum(-1))
            G = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
            total = G if total is None else total + G
        assert total is not None, "the engine hands a handler at least one call"
        return total

    def _weight_grad(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """[B, Cin, Cout/g * k] in the weight's layout [Cin, Cout/g, *kernel]."""
        conv = self.module
        if isinstance(conv, nn.ConvTranspose1d):
            x, delta = x.unsqueeze(2), delta.unsqueeze(2)
            kernel, dilation, stride, padding = ((1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0]),
                                                 (0, conv.padding[0]))
        else:
            kernel, dilation, stride, padding = conv.kernel_size, conv.dilation, conv.stride, conv.padding
        padded = F.pad(delta, [padding[1], padding[1], padding[0], padding[0]])
        patches = F.unfold(padded, kernel_size=kernel, dilation=dilation, stride=stride)  # [B, Cout * k, L]
        B, L, g = x.shape[0], x[0, 0].numel(), conv.groups
        if patches.shape[-1] != L:
            raise UnsupportedModuleError(f"Module {self.name!r} produced an output whose size does not follow from its "
                                         "input (an output_size argument beyond output_padding); leave it out (exclude=).")
        a = x.reshape(B, g, conv.in_channels // g, L).transpose(2, 3)  # [B, g, L, Cin/g]
        d = patches.reshape(B, g, -1, L).transpose(2, 3)  # [B, g, L, Cout/g * k]
        return weight_gradients(a, d).transpose(2, 3).reshape(B, conv.in_channels, -1)

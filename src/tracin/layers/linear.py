"""Linear and Conv1d/Conv2d: ghost dot-products over (inputs, output-gradients), or
materialised per-example gradients when the shapes make that cheaper."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from .base import Call, LayerHandler, zero_delta_like
from .factors import Factors, GhostFactors, GradFactors


def choose_mode(T: int, da: int, dd: int) -> str:
    """Ghost costs T^2 (da + dd) per pair of examples; materialising costs da * dd."""
    return "ghost" if T * T * (da + dd) <= da * dd else "materialize"


class _FactorLayer(LayerHandler):
    """Shared tail of Linear and Conv: inputs A [B, g, T, din] and deltas D [B, g, T, dout]
    become ghost factors or materialised gradients."""

    modes = ("ghost", "materialize")

    def _split(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def factors(self, calls: List[Call]) -> Factors:
        parts = [self._split(call) for call in calls]
        A = torch.cat([a for a, _ in parts], dim=2) if len(parts) > 1 else parts[0][0]
        D = torch.cat([d for _, d in parts], dim=2) if len(parts) > 1 else parts[0][1]
        columns = []
        if self.in_scope("weight"):
            columns.append(A)
        if self.in_scope("bias"):
            columns.append(A.new_ones(A.shape[:-1] + (1,)))
        A = torch.cat(columns, dim=-1) if len(columns) > 1 else columns[0]
        if self.mode is None:
            self.mode = choose_mode(A.shape[2], A.shape[3], D.shape[3])
        if self.mode == "ghost":
            return GhostFactors(A, D)
        G = torch.einsum("bgti,bgto->bgoi", A, D)
        return GradFactors(G.reshape(G.shape[0], -1))


class LinearHandler(_FactorLayer):
    """nn.Linear over [B, d] or [B, ..., d] inputs (positions flattened into T)."""

    module_types = (nn.Linear,)

    def _split(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        x = call.args[0]
        B = x.shape[0]
        a = x.reshape(B, 1, -1, x.shape[-1])
        delta = call.delta if call.delta is not None else zero_delta_like(call, x)
        d = delta.reshape(a.shape[0], 1, -1, delta.shape[-1])
        return a, d


class ConvHandler(_FactorLayer):
    """nn.Conv1d / nn.Conv2d with any stride, padding (including 'same' and non-zero padding
    modes), dilation and groups: the input is unfolded into patches, one position per output pixel."""

    module_types = (nn.Conv1d, nn.Conv2d)

    def _split(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        conv: nn.modules.conv._ConvNd = self.module  # type: ignore[assignment]
        x = call.args[0]
        one_d = isinstance(conv, nn.Conv1d)
        if x.dim() == (2 if one_d else 3):
            raise UnsupportedModuleError(f"Module {self.name!r} was called on an unbatched input; give it a batch dimension.")
        pad = conv._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, pad, mode=mode)
        if one_d:
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
        else:
            kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
        patches = F.unfold(x, kernel_size=kernel, dilation=dilation, padding=0, stride=stride)  # [B, C*k, L]
        B, _, L = patches.shape
        g = conv.groups
        a = patches.view(B, g, -1, L).transpose(2, 3)  # [B, g, L, C/g * k]
        delta = call.delta if call.delta is not None else zero_delta_like(call, x)
        d = delta.reshape(B, g, conv.out_channels // g, L).transpose(2, 3)  # [B, g, L, Cout/g]
        return a, d

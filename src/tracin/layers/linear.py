"""Linear and Conv1d/Conv2d: ghost dot-products over (inputs, output-gradients), or
materialised per-example gradients when the shapes make that cheaper.

Both share one shape: per call, inputs A [B, g, T, da] and output gradients D [B, g, T, dd] in
``g`` groups over ``T`` positions; the weight gradient of group j is ``sum_t D[:, j, t]^T A[:, j, t]``
and the bias gradient ``sum_t D[:, j, t]``. The bias is the implicit ones column of
:class:`GhostFactors`, never concatenated onto the inputs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..device import cudnn_conv_uses_tf32
from ..errors import UnsupportedModuleError
from . import attention
from .base import Call, LayerHandler, LayerRun, Rerun, zero_delta_like
from .factors import Factors, GhostFactors, GradFactors, weight_gradients

if TYPE_CHECKING:  # annotations only
    from .precondition import Whitening


RawFactors = Tuple[torch.Tensor, torch.Tensor, bool, bool]  # A [B, g, T, da], D [B, g, T, dd], bias in scope, ghost form
UNFOLD_BYTES = 256 * 2**20  # unfolded patches per chunk of examples, materialised conv gradients off the CPU


def choose_mode(T: int, da: int, dd: int) -> str:
    """Ghost costs T^2 (da + dd) per pair of examples; materialising costs da * dd."""
    return "ghost" if T * T * (da + dd) <= da * dd else "materialize"


class _FactorLayer(LayerHandler):
    """Shared logic of Linear and Conv; subclasses say how a call becomes (A, D) and the weight gradient."""

    modes = ("ghost", "materialize")
    kronecker = True
    shares_layout = True
    weight_name, bias_name = "weight", "bias"  # the module's own names for the weight and the bias

    def _delta(self, call: Call, like: torch.Tensor) -> torch.Tensor:
        return call.delta if call.delta is not None else zero_delta_like(call, like)

    def _shapes(self, call: Call) -> Tuple[int, int, int]:
        """(positions T, input width da incl. bias, output width dd) of one call."""
        raise NotImplementedError

    def _ghost(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        """A [B, g, T, da] (no bias column), D [B, g, T, dd]."""
        raise NotImplementedError

    def _weight_grad(self, call: Call) -> torch.Tensor:
        """Per-example weight gradients [B, g, dd, da]."""
        raise NotImplementedError

    def _bias_grad(self, call: Call) -> torch.Tensor:
        """Per-example bias gradients [B, g, dd]."""
        raise NotImplementedError

    def _ghost_all(self, calls: List[Call]) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """All calls' factors concatenated along positions; A without the bias column, ones = bias in scope."""
        parts = [self._ghost(call) for call in calls]
        A = torch.cat([a for a, _ in parts], dim=2) if len(parts) > 1 else parts[0][0]
        D = torch.cat([d for _, d in parts], dim=2) if len(parts) > 1 else parts[0][1]
        if not self.in_scope(self.weight_name):
            A = A[..., :0]
        return A, D, self.in_scope(self.bias_name)

    def batch_gradients(self, calls: List[Call]) -> List[torch.Tensor]:
        """Summed gradients from the raw factors: the weight's sum_b,t D^T A, the bias's sum_b,t D."""
        A, D, _ = self._ghost_all(calls)
        out = []
        for param, name in zip(self.parameters(), self.param_names):
            if name == self.weight_name:
                out.append(self._weight_layout(torch.einsum("bgtd,bgta->gda", D, A), param))
            else:
                out.append(D.sum(dim=(0, 2)).reshape(param.shape))
        return out

    def _weight_layout(self, W: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A weight gradient [g, dd, da] in the parameter's own layout."""
        return W.reshape(weight.shape)

    def ghost_factors(self, calls: List[Call]) -> RawFactors:
        """The raw factors (A, D, bias in scope) the K-FAC preconditioner is fitted on, and whether the raw shapes
        call for the ghost kernel (what :meth:`transform` sizes projections for)."""
        return (*self._ghost_all(calls), choose_mode(*self._shapes(calls[0])) == "ghost")

    def factors(self, calls: List[Call], run: LayerRun, whitening: Optional[Whitening] = None) -> Factors:
        if run.projector is not None or run.preconditioner is not None:
            return self.transform(self.ghost_factors(calls), run, whitening)
        weight, bias = self.in_scope(self.weight_name), self.in_scope(self.bias_name)
        if run.mode is None:
            run.mode = choose_mode(*self._shapes(calls[0]))
        if run.mode == "ghost":
            A, D, ones = self._ghost_all(calls)
            return GhostFactors(A, D, ones=ones)
        total = None
        for call in calls:
            pieces = []
            if weight:
                pieces.append(self._weight_grad(call))
            if bias:
                pieces.append(self._bias_grad(call).unsqueeze(-1))
            G = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
            G = G.reshape(G.shape[0], -1)
            total = G if total is None else total + G
        return GradFactors(total)

    def transform(self, raw: RawFactors, run: LayerRun, whitening: Optional[Whitening] = None) -> Factors:
        """Precondition (with this batch's ``whitening`` when the run preconditions the layer) and/or project raw factors
        (:meth:`ghost_factors`; projections sized for the kernel the raw shapes call for), then pick ghost or
        materialised on the resulting shapes."""
        A, D, ones, ghost_form = raw
        if run.preconditioner is not None:
            assert whitening is not None, f"{self.name}: a preconditioned layer's batch comes with its whiteners"
            A, D, ones = whitening.apply(self.name, A, D, ones)
        if run.projector is not None:
            A, D, ones = run.projector.ghost(self.name, A, D, ones, ghost_form=ghost_form)
        if run.mode is None:
            run.mode = choose_mode(A.shape[2], A.shape[3] + int(ones), D.shape[3])
        factors = GhostFactors(A, D, ones=ones)
        return factors if run.mode == "ghost" else GradFactors(factors.to_vector())


def unfold_volume(x: torch.Tensor, kernel: Tuple[int, ...], dilation: Tuple[int, ...], stride: Tuple[int, ...]) -> torch.Tensor:
    """F.unfold for volumes: padded x [B, C, D, H, W] -> patches [B, C * kD * kH * kW, L] (channel-major, then the
    kernel's positions, as a Conv3d weight is laid out; L output voxels in order)."""
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride), start=2):
        x = x.unfold(dim, d * (k - 1) + 1, s)[..., ::d]  # a trailing axis of the k taps along this dimension
    B, C = x.shape[:2]
    return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(B, C * int(torch.Size(kernel).numel()), -1)


def conv_padding(conv: nn.Module) -> List[int]:
    """``F.pad``'s argument for a convolution's padding (last dimension first, left then right): its int or tuple
    padding on both sides, none for ``"valid"``, and for ``"same"`` dilation * (kernel - 1) split with the extra unit
    on the right, as PyTorch pads it."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [0] * 2 * dims
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        sides = [(t // 2, t - t // 2) for t in totals]
    else:
        sides = [(p, p) for p in conv.padding]
    return [side for pair in reversed(sides) for side in pair]


class LinearHandler(_FactorLayer):
    """nn.Linear over [B, d] or [B, ..., d] inputs (positions flattened into T)."""

    module_types = (nn.Linear,)

    def _shapes(self, call: Call) -> Tuple[int, int, int]:
        x = call.args[0]
        T = x[0].numel() // x.shape[-1]
        return T, x.shape[-1] + int(self.in_scope("bias")), self.module.out_features

    def _ghost(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        x = call.args[0]
        a = x.reshape(x.shape[0], 1, -1, x.shape[-1])
        delta = self._delta(call, x)
        return a, delta.reshape(x.shape[0], 1, -1, delta.shape[-1])

    def _weight_grad(self, call: Call) -> torch.Tensor:
        return weight_gradients(*self._ghost(call))

    def _bias_grad(self, call: Call) -> torch.Tensor:
        delta = self._delta(call, call.args[0])
        return delta.reshape(delta.shape[0], 1, -1, delta.shape[-1]).sum(2)


class HFConv1DHandler(LinearHandler):
    """Hugging Face's ``Conv1D`` (GPT-2 and relatives): a Linear layer whose weight is stored transposed,
    [in, out]. Inner products of gradients do not depend on the layout, so the ghost and materialised kernels
    are the Linear ones."""

    module_types = ()
    shares_layout = False  # [out, in] gradients for an [in, out] weight

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2

    def _shapes(self, call: Call) -> Tuple[int, int, int]:
        x = call.args[0]
        T = x[0].numel() // x.shape[-1]
        return T, x.shape[-1] + int(self.in_scope("bias")), int(self.module.nf)

    def _weight_layout(self, W: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return W[0].T.reshape(weight.shape)


class MultiheadAttentionHandler(LinearHandler):
    """``in_proj_weight`` / ``in_proj_bias`` of ``nn.MultiheadAttention`` as a Linear layer (``out_proj`` is a Linear of
    its own). The module applies them functionally, so its forward is recomputed during capture
    (:func:`tracin.layers.attention.recompute`); a call is the packed projection of self-attention, or one of the three
    blocks of cross-attention, whose output gradient then sits in its third of the 3E rows (docs in that module)."""

    module_types = (nn.MultiheadAttention,)
    capture = "rerun"
    shares_layout = False
    weight_name, bias_name = "in_proj_weight", "in_proj_bias"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return (isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None
                and module.bias_k is None and module.bias_v is None and not module.add_zero_attn)

    def rerun(self, args: Tuple, kwargs: Dict[str, Any], output: Any) -> Optional[Rerun]:
        return attention.recompute(self.module, args, kwargs)

    def _shapes(self, call: Call) -> Tuple[int, int, int]:
        x = call.args[0]
        return x.shape[1], x.shape[-1] + int(self.in_scope(self.bias_name)), 3 * self.module.embed_dim

    def _ghost(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        """A [B, 1, T, E] and D [B, 1, T, 3E]."""
        x = call.args[0]
        delta = self._delta(call, x)
        if call.part != attention.PACKED:
            E = self.module.embed_dim
            delta = F.pad(delta, ((call.part - 1) * E, (attention.VALUE - call.part) * E))
        return x.unsqueeze(1), delta.unsqueeze(1)

    def _bias_grad(self, call: Call) -> torch.Tensor:
        return self._ghost(call)[1].sum(2)


class ConvHandler(_FactorLayer):
    """nn.Conv1d / nn.Conv2d / nn.Conv3d with any stride, padding (including 'same' and non-zero padding
    modes), dilation and groups. Ghost factors unfold the input into patches (one position per
    output pixel or voxel); materialised gradients use a grouped weight-gradient convolution."""

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    grouped_devices: Tuple[str, ...] = ("cpu",)  # device types whose materialised gradients use the grouped convolution

    def _padded(self, call: Call) -> torch.Tensor:
        conv = self.module
        x = call.args[0]
        if x.dim() == len(conv.kernel_size) + 1:
            raise UnsupportedModuleError(f"Module {self.name!r} was called on an unbatched input; give it a batch dimension.")
        pad = conv_padding(conv)
        if any(pad):
            x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        return x

    def _shapes(self, call: Call) -> Tuple[int, int, int]:
        conv = self.module
        out_shape = call.output_shape
        assert out_shape is not None
        T = int(torch.Size(out_shape[2:]).numel())
        k = int(torch.Size(conv.kernel_size).numel())
        return T, conv.in_channels // conv.groups * k + int(self.in_scope("bias")), conv.out_channels // conv.groups

    def _ghost(self, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self._padded(call)
        return self._unfolded(x, self._delta(call, x))

    def _unfolded(self, x: torch.Tensor, delta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded input and output-gradient of some examples -> A [B, g, L, Cin/g * k], D [B, g, L, Cout/g]."""
        conv = self.module
        if isinstance(conv, nn.Conv3d):
            patches = unfold_volume(x, conv.kernel_size, conv.dilation, conv.stride)  # [B, C*k, L]
        else:
            if isinstance(conv, nn.Conv1d):
                x = x.unsqueeze(2)
                kernel, dilation, stride = (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
            else:
                kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
            patches = F.unfold(x, kernel_size=kernel, dilation=dilation, padding=0, stride=stride)  # [B, C*k, L]
        B, _, L = patches.shape
        g = conv.groups
        a = patches.view(B, g, -1, L).transpose(2, 3)  # [B, g, L, C/g * k]
        d = delta.reshape(B, g, conv.out_channels // g, L).transpose(2, 3)  # [B, g, L, Cout/g]
        return a, d

    def _weight_grad(self, call: Call) -> torch.Tensor:
        """[B, g, Cout/g, Cin/g * k]. On a CPU, and on CUDA while cuDNN may use TF32: one grouped
        weight-gradient convolution (examples become groups). In full float32 cuDNN runs that as one
        small kernel per group (measured 1.0 s against 0.69 s on an H100, docs/benchmarks.md), so
        there, and on other devices, patches are unfolded and multiplied in batched matmuls, in chunks
        of examples whose patches stay under UNFOLD_BYTES."""
        conv = self.module
        x = self._padded(call)
        delta = self._delta(call, x)
        B, g = x.shape[0], conv.groups
        grouped = x.device.type in self.grouped_devices or (x.device.type == "cuda" and cudnn_conv_uses_tf32())
        if not grouped:
            T, da, _ = self._shapes(call)
            step = max(1, UNFOLD_BYTES // max(1, T * da * g * x.element_size()))
            return torch.cat([weight_gradients(*self._unfolded(x[i:i + step], delta[i:i + step])) for i in range(0, B, step)])
        # Examples become groups of one convolution: input [1, B*Cin, ...], grad [1, B*Cout, ...].
        weight_grad = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                       3: torch.nn.grad.conv3d_weight}[len(conv.kernel_size)]
        w = weight_grad(
            x.reshape(1, B * x.shape[1], *x.shape[2:]),
            (B * conv.out_channels, conv.in_channels // g, *conv.kernel_size),
            delta.reshape(1, B * conv.out_channels, *delta.shape[2:]),
            stride=conv.stride, padding=0, dilation=conv.dilation, groups=B * g,
        )
        return w.reshape(B, g, conv.out_channels // g, -1)

    def _bias_grad(self, call: Call) -> torch.Tensor:
        conv = self.module
        delta = self._delta(call, call.args[0])
        return delta.reshape(delta.shape[0], conv.groups, conv.out_channels // conv.groups, -1).sum(-1)

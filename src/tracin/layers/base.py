"""What a layer handler is: one module in scope, its captured calls, and its factors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from .factors import Factors


@dataclass
class Call:
    """One forward call of a module in scope: its positional inputs and, after backward,
    the gradient of the summed loss at its output ([B, ...], the output's shape)."""

    args: Tuple
    input_version: int
    delta: Optional[torch.Tensor] = None
    output_shape: Optional[torch.Size] = None


class LayerHandler:
    """Per-module capture and factor extraction. Subclasses set ``module_types``.

    Attributes:
        name: the module's qualified name in the model.
        module: the module.
        param_names: its directly owned parameters in scope (those that require grad).
        mode: ``"ghost"`` or ``"materialize"``; chosen from shapes on the first batch unless forced.
    """

    module_types: Tuple[type, ...] = ()
    modes: Tuple[str, ...] = ("materialize",)

    def __init__(self, name: str, module: nn.Module, param_names: List[str]):
        self.name = name
        self.module = module
        self.param_names = param_names
        self.mode: Optional[str] = None
        self.projector = None  # a tracin.projection.Projector when projecting, set per run
        self.preconditioner = None  # a tracin.precondition.KFAC when preconditioning, set per run
        self.check()

    def check(self) -> None:
        """Raise :class:`UnsupportedModuleError` for configurations without an exact kernel."""

    @property
    def num_params(self) -> int:
        params = dict(self.module.named_parameters(recurse=False))
        return sum(params[n].numel() for n in self.param_names)

    def in_scope(self, param: str) -> bool:
        return param in self.param_names

    def factors(self, calls: List[Call]) -> Factors:
        """Factors for the batch from this module's captured calls (at least one)."""
        raise NotImplementedError


def zero_delta_like(call: Call, reference: torch.Tensor) -> torch.Tensor:
    """The output gradient of a call whose output did not reach the loss: zeros."""
    assert call.output_shape is not None
    return reference.new_zeros(call.output_shape)

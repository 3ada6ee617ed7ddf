"""Per-layer capture and kernels, and the registry that maps module types to handlers."""
from __future__ import annotations

from typing import List, Type

from torch import nn

from ..errors import UnsupportedModuleError
from .base import Call, LayerHandler, LayerRun
from .embedding import EmbeddingHandler
from .factors import Factors, GhostFactors, GradFactors, IndexFactors
from .linear import ConvHandler, LinearHandler
from .norm import NormHandler

HANDLERS: List[Type[LayerHandler]] = [LinearHandler, ConvHandler, EmbeddingHandler, NormHandler]


def handler_for(name: str, module: nn.Module, param_names: List[str]) -> LayerHandler:
    """The handler for ``module``, or an error naming the module when none is exact for it."""
    for cls in HANDLERS:
        if isinstance(module, cls.module_types):
            return cls(name, module, param_names)
    raise UnsupportedModuleError(
        f"Module {name!r} ({type(module).__name__}) has trainable parameters {param_names} but tracin has no exact "
        "per-example kernel for it; choose layers that exclude it (layers=[...] / --layers) or freeze it "
        "(requires_grad=False). Supported: Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm, RMSNorm, "
        "InstanceNorm, BatchNorm (eval), PReLU."
    )


__all__ = [
    "Call", "LayerHandler", "LayerRun", "handler_for", "HANDLERS", "Factors", "GhostFactors", "GradFactors",
    "IndexFactors",
]

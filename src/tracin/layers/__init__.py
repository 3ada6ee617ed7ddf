"""Per-layer capture and kernels, and the registry that maps module types to handlers."""
from __future__ import annotations

from typing import List, Optional, Type

from torch import nn

from .base import Call, LayerHandler, LayerRun
from .embedding import EmbeddingHandler
from .factors import Factors, GhostFactors, GradFactors, IndexFactors
from .linear import ConvHandler, HFConv1DHandler, LinearHandler, MultiheadAttentionHandler
from .norm import NormHandler
from .recurrent import RecurrentHandler
from .transposed import ConvTransposeHandler

HANDLERS: List[Type[LayerHandler]] = [LinearHandler, HFConv1DHandler, ConvHandler, ConvTransposeHandler, EmbeddingHandler,
                                      NormHandler, MultiheadAttentionHandler, RecurrentHandler]


def handler_for(name: str, module: nn.Module, param_names: List[str]) -> Optional[LayerHandler]:
    """The handler for ``module``, or None when no per-module kernel covers it (its parameters then go to the
    exact per-example fallback, :class:`tracin.layers.exact.ExactHandler`)."""
    for cls in HANDLERS:
        if cls.matches(module):
            return cls(name, module, param_names)
    return None


__all__ = [
    "Call", "LayerHandler", "LayerRun", "handler_for", "HANDLERS", "Factors", "GhostFactors", "GradFactors",
    "IndexFactors",
]

"""Result types returned by the API."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class TopK:
    """Top-k training examples per test example.

    values: [n_test, k] TracIn scores; indices: [n_test, k] positions in the training set.
    Proponents are sorted largest first, opponents most negative first.
    """

    values: torch.Tensor
    indices: torch.Tensor


@dataclass
class InfluenceResult:
    """What :meth:`tracin.TracIn.influence` returns.

    proponents, opponents: :class:`TopK` with [n_test, k] tensors.
    self_influence: [n_train] TracIn(z, z) when it was asked for, else None.
    stats: bookkeeping of the run (checkpoint loads, tiles, test chunks, per-layer kernel, seconds).
    """

    proponents: TopK
    opponents: TopK
    self_influence: Optional[torch.Tensor] = None
    stats: Dict[str, Any] = field(default_factory=dict)

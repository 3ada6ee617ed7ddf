"""Per-layer factors of a batch (``FactorDict``: layer name -> factors, or None where the layer
took no part), their sizes, and their merging into blocks of consecutive batches so that pair
scores are a few large matmuls."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..layers.factors import Factors

STAGING_BYTES = 1 << 30  # raw batches held in host memory at once: staged test batches, a group of training batches

FactorDict = Dict[str, Optional[Factors]]


def batch_bytes(obj) -> int:
    """Bytes held by the tensors inside a (nested) batch."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(batch_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(batch_bytes(v) for v in obj)
    return 0


def factor_rows(factors: FactorDict) -> int:
    """Number of examples the per-layer factors describe."""
    return next(f.batch_size for f in factors.values() if f is not None)


def factor_bytes(factors: FactorDict) -> int:
    """Bytes held by the per-layer factors."""
    return sum(f.nbytes for f in factors.values() if f is not None)


def merge_blocks(per_batch: List[FactorDict]) -> List[Tuple[int, FactorDict]]:
    """Concatenate consecutive batches layer by layer when every layer's shapes agree."""
    blocks: List[Tuple[int, FactorDict]] = []
    run: List[FactorDict] = []
    offset = run_start = 0

    def flush() -> None:
        if run:
            merged = {}
            for name, first in run[0].items():
                parts = [b[name] for b in run]
                merged[name] = first if first is None or len(parts) == 1 else type(first).cat(parts)  # type: ignore[arg-type]
            blocks.append((run_start, merged))

    def compatible(a: Optional[Factors], b: Optional[Factors]) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return a.compatible(b)  # type: ignore[arg-type]

    for factors in per_batch:
        size = factor_rows(factors)
        if not (run and all(compatible(run[0][n], factors[n]) for n in factors)):
            flush()
            run, run_start = [], offset
        run.append(factors)
        offset += size
    flush()
    return blocks

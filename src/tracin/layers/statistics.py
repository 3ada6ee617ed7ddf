"""The statistics a K-FAC fit sums: per layer the two Kronecker factors' second moments, X^T X over the rows X of its
inputs (a) and of its output gradients (d) at every position of every example.

Two forms per factor:

* rows: while a factor has seen fewer rows than half its width (a ResNet's last stage at 32 px: 240 images x 1
  position for 4,608 columns), the rows themselves are kept. X^T X then has rank r < d, and its damped inverse has
  an exact low-rank form (:func:`tracin.layers.inverses.low_rank_inverses`) that costs 2 r^2 d + r^3 instead of a
  Cholesky factorisation's d^3 / 3 and its solves (measured faster up to r = d / 2 on a ResNet's factors).
* sums: beyond that, X^T X is summed. A wide factor's batch products (256 columns or more) are added in the factors'
  precision (float32 at least) into a per-factor buffer, folded into the sums (``dtype``, float64 off MPS) every
  :attr:`CovarianceSums.FOLD` batches and whenever the sums are read: the float32 rounding of a few batches stays far
  below the damping, and wide factors are not converted and added in float64 at every batch. Narrower ones are
  added in float64 at every batch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

Key = Tuple[str, int]  # (layer, side): 0 the input factor, 1 the output-gradient factor


def with_ones(A: torch.Tensor, ones: bool) -> torch.Tensor:
    """A [B, g, T, da] with the implicit bias column made explicit: [B, g, T, da + ones]."""
    return torch.cat([A, A.new_ones(*A.shape[:-1], 1)], dim=-1) if ones else A


def _gram(X: torch.Tensor) -> torch.Tensor:
    """X^T X [g, d, d] for rows X [g, n, d]. A wide one is computed in two column halves, of which the product is
    symmetric: three blocks of the four (measured 35 -> 28 ms for 4,096 x 785 and 14 -> 12 ms for 4,096 x 513 on 2 CPU
    cores, best of 5)."""
    d = X.shape[-1]
    if d < CovarianceSums.WIDE:
        return X.transpose(1, 2) @ X
    half = d // 2
    left, right = X[..., :half], X[..., half:]
    out = X.new_empty(X.shape[0], d, d)
    out[:, :half, :half] = left.transpose(1, 2) @ left
    cross = left.transpose(1, 2) @ right
    out[:, :half, half:] = cross
    out[:, half:, :half] = cross.transpose(1, 2)
    out[:, half:, half:] = right.transpose(1, 2) @ right
    return out


def _product(X: torch.Tensor, ones: bool) -> torch.Tensor:
    """X^T X [g, d, d] for rows X [g, n, d]; with ``ones``, of X with a trailing column of ones, [g, d + 1, d + 1],
    assembled from X^T X, the column sums and n, so that the rows are never copied to append the column."""
    inner = _gram(X)
    if not ones:
        return inner
    g, d = X.shape[0], X.shape[-1]
    sums = X.sum(dim=1)  # [g, d]
    out = X.new_empty(g, d + 1, d + 1)
    out[:, :d, :d] = inner
    out[:, :d, d] = sums
    out[:, d, :d] = sums
    out[:, d, d] = X.shape[1]
    return out


class CovarianceSums:
    """Running statistics of the two Kronecker factors per layer over the examples of a fit pass (module docstring);
    ``rows``: keep a factor's rows while they are fewer than half its width (off for moving averages)."""

    FOLD = 16
    # narrower factors are folded at every batch: the buffer saves nothing there, and their float64 sums then round the
    # same however the batches are grouped (torchrun's shards against one process; the output-bias detector included)
    WIDE = 256

    def __init__(self, dtype: torch.dtype, device: torch.device, rows: bool = True):
        self.dtype = dtype
        self.device = device
        self.keep_rows = rows
        self._sums: Dict[Key, torch.Tensor] = {}  # [g, d, d] in dtype
        self._pending: Dict[Key, Tuple[torch.Tensor, int]] = {}  # float32 buffer, batches in it
        self._rows: Dict[Key, List[torch.Tensor]] = {}  # [g, b, d] chunks, while few
        self._layers: Dict[str, None] = {}  # in the order first met
        self.ghost: Dict[str, bool] = {}  # layer -> whether its kernel pairs the factors themselves (few positions)
        self.count = 0

    def layers(self) -> List[str]:
        return list(self._layers)

    def add(self, name: str, A: torch.Tensor, D: torch.Tensor, ones: bool, ghost: bool = True) -> None:
        """One batch of one layer: A [B, g, T, da] (bias implicit when ``ones``), D [B, g, T, dd]; ``ghost``: the
        raw shapes call for the ghost kernel (how a truncation to ``rank`` is split, :func:`fit_whiteners`)."""
        self.ghost[name] = ghost
        self._layers[name] = None
        work = torch.promote_types(A.dtype, torch.float32)  # half-precision factors are summed in float32 at least
        for side, (factor, bias) in enumerate(((A, ones), (D, False))):
            self._add((name, side), factor.to(work).transpose(0, 1).flatten(1, 2), bias)  # [g, B*T, d]

    def _add(self, key: Key, X: torch.Tensor, ones: bool) -> None:
        """One batch's rows X [g, n, d] of a factor (with ``ones``, an implicit trailing column of ones)."""
        fresh = key not in self._sums and key not in self._pending
        width = X.shape[-1] + int(ones)
        if self.keep_rows and (key in self._rows or fresh):
            chunks = self._rows.setdefault(key, [])
            chunks.append(with_ones(X, ones))
            if 2 * sum(c.shape[1] for c in chunks) <= width:
                return
            X, ones = torch.cat(self._rows.pop(key), dim=1), False  # too many rows now: their products from here on
        product = _product(X, ones)
        if key in self._pending:
            buffer, batches = self._pending[key]
            self._pending[key] = (buffer.add_(product), batches + 1)
        else:
            self._pending[key] = (product, 1)
        if self._pending[key][1] >= self.FOLD or self.dtype == X.dtype or width < self.WIDE:
            self._fold(key)

    def _fold(self, key: Key) -> None:
        if key in self._rows:
            self._pending[key] = (_product(torch.cat(self._rows.pop(key), dim=1), False), 1)
        buffer, _ = self._pending.pop(key)
        if key in self._sums:
            self._sums[key] += buffer
        else:
            self._sums[key] = buffer.to(self.dtype)

    def rows(self, name: str, side: int) -> Optional[torch.Tensor]:
        """The factor's rows [g, r, d] when it still keeps them (fewer than half its width), else None."""
        chunks = self._rows.get((name, side))
        return torch.cat(chunks, dim=1) if chunks else None

    def total(self, name: str, side: int) -> torch.Tensor:
        """The factor's sum X^T X [g, d, d] in ``dtype``, every batch added (kept rows multiplied out)."""
        if (name, side) in self._rows or (name, side) in self._pending:
            self._fold((name, side))
        return self._sums[(name, side)]

    @property
    def sums(self) -> Dict[str, List[torch.Tensor]]:
        """{layer: [input factor sum [g, da, da], output factor sum [g, dd, dd]]} (:meth:`total`; the tensors are the
        running sums themselves, so scaling them in place scales the statistics)."""
        return {name: [self.total(name, 0), self.total(name, 1)] for name in self._layers}

    def scale(self, factor: float, name: str) -> None:
        """Multiply a layer's statistics by ``factor`` (moving averages), folding what is pending first."""
        if name in self._layers:
            for side in (0, 1):
                self.total(name, side).mul_(factor)

    def clear(self) -> None:
        self._sums.clear()
        self._pending.clear()
        self._rows.clear()

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of an initialised process group (each saw its shard).
        The ranks first agree on the layers: one whose shard never reached a layer (a data-dependent
        branch) adds zeros for it, so every rank reduces the same tensors in the same order."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        sums = self.sums  # rows multiplied out: the ranks' rows differ, their sums add up
        shapes: List[Dict[str, List[Tuple[int, ...]]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(shapes, {name: [tuple(t.shape) for t in pair] for name, pair in sums.items()})
        union = {name: pair for rank_shapes in shapes for name, pair in rank_shapes.items()}
        for name in sorted(union):
            if name not in sums:
                self._layers[name] = None
                self.ghost.setdefault(name, True)
                for side, shape in enumerate(union[name]):
                    self._sums[(name, side)] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            for side in (0, 1):
                dist.all_reduce(self._sums[(name, side)])
        count = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        dist.all_reduce(count)
        self.count = int(count.item())

    def nbytes(self) -> int:
        held = list(self._sums.values()) + [b for b, _ in self._pending.values()] + \
            [c for chunks in self._rows.values() for c in chunks]
        return sum(t.numel() * t.element_size() for t in held)

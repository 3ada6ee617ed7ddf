"""The statistics a K-FAC fit sums: per layer the two Kronecker factors' second moments, X^T X over the rows X of its
inputs (a) and of its output gradients (d) at every position of every example.

Two forms per factor, and one saving across checkpoints:

* rows: while a factor has seen fewer rows than half its width (a ResNet's last stage at 32 px: 240 images x 1
  position for 4,608 columns), the rows themselves are kept. X^T X then has rank r < d, and its damped inverse has
  an exact low-rank form (:func:`tracin.layers.inverses.low_rank_inverses`) that costs r^2 d + r^3 / 3 instead of a
  Cholesky factorisation's d^3 / 3 and its solves.
* sums: beyond that, X^T X is summed (``dtype``, float64 off MPS). A wide factor's rows (256 columns or more) are
  gathered until there are :attr:`CovarianceSums.ROWS` of them, or until the sums are read, and multiplied out in
  one product in the factors' precision (float32 at least), then added in ``dtype``: fewer, larger products than one
  per batch (2 CPU cores, 4,096 x 785 rows: 33-37 ms in 256-row products, 27 ms in 1,024-row ones, 22-26 ms at once;
  the float32 rounding grows with the rows per product, 1.1e-7, 1.5e-7 and 2.4e-7 of the largest entry, far below
  the damping). Narrower factors are multiplied and added in ``dtype`` at every batch.
* input factors the same at every checkpoint (a first layer's inputs are the data) are summed once
  (:class:`InvariantInputs`).
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

    ROWS = 1024
    # narrower factors are added at every batch: gathering saves nothing there, and their float64 sums then round the
    # same however the batches are grouped (torchrun's shards against one process; the output-bias detector included)
    WIDE = 256

    def __init__(self, dtype: torch.dtype, device: torch.device, rows: bool = True):
        self.dtype = dtype
        self.device = device
        self.keep_rows = rows
        self._sums: Dict[Key, torch.Tensor] = {}  # [g, d, d] in dtype
        self._rows: Dict[Key, List[Tuple[torch.Tensor, bool]]] = {}  # rows [g, b, d] not multiplied out yet, with ones
        self._layers: Dict[str, None] = {}  # in the order first met
        self.ghost: Dict[str, bool] = {}  # layer -> whether its kernel pairs the factors themselves (few positions)
        self.count = 0

    def layers(self) -> List[str]:
        return list(self._layers)

    def add(self, name: str, A: torch.Tensor, D: torch.Tensor, ones: bool, ghost: bool = True,
            inputs: bool = True) -> None:
        """One batch of one layer: A [B, g, T, da] (bias implicit when ``ones``), D [B, g, T, dd]; ``ghost``: the
        raw shapes call for the ghost kernel (how a truncation to ``rank`` is split, :func:`fit_whiteners`);
        ``inputs=False``: A is accounted for elsewhere (:class:`InvariantInputs`), only D is added."""
        self.ghost[name] = ghost
        self._layers[name] = None
        if inputs:
            self.add_factor(name, 0, A, ones)
        self.add_factor(name, 1, D, False)

    def add_factor(self, name: str, side: int, X: torch.Tensor, ones: bool) -> None:
        """One batch of one factor of a layer :meth:`add` has met: X [B, g, T, d] (``ones``: an implicit bias column)."""
        work = torch.promote_types(X.dtype, torch.float32)  # half-precision factors are summed in float32 at least
        self._add((name, side), X.to(work).transpose(0, 1).flatten(1, 2), ones)  # [g, B*T, d]

    def adopt(self, other: "CovarianceSums", name: str, side: int) -> None:
        """Take ``other``'s statistics of one factor as this one's (a copy: each is reduced over ranks on its own)."""
        key = (name, side)
        rows, total = other.held(name, side)
        self._rows.pop(key, None)
        self._sums.pop(key, None)
        if rows:
            self._rows[key] = rows  # rows are never changed in place
        if total is not None:
            self._sums[key] = total.clone()

    def held(self, name: str, side: int) -> Tuple[List[Tuple[torch.Tensor, bool]], Optional[torch.Tensor]]:
        """What one factor holds now: its rows not multiplied out yet (each [g, b, d] with its implicit-bias flag) and
        its sums [g, d, d] (None before any)."""
        return list(self._rows.get((name, side), [])), self._sums.get((name, side))

    def _add(self, key: Key, X: torch.Tensor, ones: bool) -> None:
        """One batch's rows X [g, n, d] of a factor (with ``ones``, an implicit trailing column of ones)."""
        width = X.shape[-1] + int(ones)
        self._rows.setdefault(key, []).append((X, ones))
        if self._few(key):
            return  # kept for the exact low-rank inverse
        if self._gathered(key) >= self.ROWS or self.dtype == X.dtype or width < self.WIDE:
            self._fold(key)

    def _gathered(self, key: Key) -> int:
        return sum(chunk.shape[1] for chunk, _ in self._rows.get(key, []))

    def _few(self, key: Key) -> bool:
        """Whether every row of a factor is still kept and they are at most half its width."""
        pending = self._rows.get(key)
        if not self.keep_rows or not pending or key in self._sums:
            return False
        return 2 * self._gathered(key) <= pending[0][0].shape[-1] + int(pending[0][1])

    def _fold(self, key: Key) -> None:
        """Multiply out a factor's gathered rows into its sums."""
        pending = self._rows.pop(key, [])
        if not pending:
            return
        ones = pending[0][1]
        product = _product(pending[0][0] if len(pending) == 1 else torch.cat([c for c, _ in pending], dim=1), ones)
        if key in self._sums:
            self._sums[key] += product
        else:
            self._sums[key] = product.to(self.dtype)

    def rows(self, name: str, side: int) -> Optional[torch.Tensor]:
        """The factor's rows [g, r, d] when it still keeps them all (fewer than half its width), else None."""
        if not self._few((name, side)):
            return None
        return torch.cat([with_ones(c, ones) for c, ones in self._rows[(name, side)]], dim=1)

    def total(self, name: str, side: int) -> torch.Tensor:
        """The factor's sum X^T X [g, d, d] in ``dtype``, every batch added (kept rows multiplied out)."""
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
        held = list(self._sums.values()) + [c for chunks in self._rows.values() for c, _ in chunks]
        return sum(t.numel() * t.element_size() for t in held)


class InvariantInputs:
    """Input factors that are the same at every checkpoint (a first layer reads the data itself), summed once.

    A fit that reads each group of batches at checkpoint 0 and then at each later checkpoint (the order of
    ``FitData.at_checkpoints``) asks :meth:`matches` for each layer of each batch. At checkpoint 0 a layer's input
    rows are held for the group (up to ``limit`` bytes in all; a layer past it stops taking part); at a later
    checkpoint c they are compared, exactly, with checkpoint 0's of the same batch. While every batch so far matched,
    checkpoint c does not sum them, and :meth:`finish` gives it checkpoint 0's statistics. The first batch that
    differs (or lacks the layer), or a layer that stops taking part, makes checkpoint c sum its own from then on,
    after taking checkpoint 0's statistics of what it skipped: the earlier groups (copied as each group starts) and
    this group's batches before that one."""

    def __init__(self, sums: List[CovarianceSums], limit: int):
        self.sums, self.limit = sums, limit
        self.held: Dict[str, Dict[int, Tuple[torch.Tensor, bool]]] = {}  # layer -> first example -> rows, this group
        self.matching: Dict[str, set] = {}  # layer -> the later checkpoints that matched checkpoint 0 so far
        self.before: Dict[str, CovarianceSums] = {}  # layer -> checkpoint 0's statistics of the earlier groups
        self.groups = 0  # groups begun
        self.at = -1  # the checkpoint of the last batch asked about
        self.bytes = 0

    def matches(self, c: int, first: int, name: str, A: torch.Tensor, ones: bool) -> bool:
        """Whether checkpoint ``c``'s input factor A [B, g, T, da] of layer ``name`` for the batch at ``first`` is
        accounted for by checkpoint 0's (and so is not to be summed)."""
        if c == 0:
            if self.at != 0:
                self._next_group()
            self.at = 0
            self._hold(first, name, A, ones)
            return False
        self.at = c
        if c not in self.matching.get(name, ()):
            return False
        held = self.held.get(name, {}).get(first)
        if held is not None and held[1] == ones and held[0].shape == A.shape and torch.equal(held[0], A):
            return True
        self._diverge(c, name, first)
        return False

    def absent(self, c: int, first: int, present: Dict[str, object]) -> None:
        """After a batch at checkpoint ``c`` > 0: a layer that checkpoint 0 ran on it and ``present`` lacks diverges."""
        for name, batches in self.held.items():
            if first in batches and present.get(name) is None and c in self.matching.get(name, ()):
                self._diverge(c, name, first)

    def finish(self) -> None:
        """Give every checkpoint that matched throughout checkpoint 0's statistics."""
        for name, later in self.matching.items():
            for c in later:
                self.sums[c].adopt(self.sums[0], name, 0)
        self.held.clear()

    def _next_group(self) -> None:
        self.groups += 1
        self.held.clear()
        self.bytes = 0
        for name, later in self.matching.items():
            if later:
                copy = CovarianceSums(self.sums[0].dtype, self.sums[0].device)
                copy.adopt(self.sums[0], name, 0)
                self.before[name] = copy

    def _hold(self, first: int, name: str, A: torch.Tensor, ones: bool) -> None:
        if name not in self.matching:
            if self.groups > 1:  # first met after the first group: the later checkpoints summed their own
                return
            self.matching[name] = set(range(1, len(self.sums)))
        if not self.matching[name]:
            return
        size = A.numel() * A.element_size()
        if self.bytes + size <= self.limit:
            self.bytes += size
            self.held.setdefault(name, {})[first] = (A, ones)
            return
        for c in list(self.matching[name]):  # the later checkpoints have not reached this group yet
            self._diverge(c, name, None)
        self.held.pop(name, None)

    def _diverge(self, c: int, name: str, first: Optional[int]) -> None:
        """Checkpoint ``c`` sums its own input statistics of ``name`` from the batch at ``first`` on (None: from the
        next group), after checkpoint 0's of the earlier groups and of this group's batches before that one."""
        target = self.sums[c]
        if name in self.before:
            target.adopt(self.before[name], name, 0)
        if first is not None:
            for f, (A, ones) in self.held.get(name, {}).items():
                if f == first:
                    break
                target.add_factor(name, 0, A, ones)
        self.matching[name].discard(c)

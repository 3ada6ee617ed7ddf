"""Per-example gradient factors of one layer for one batch, and the kernels on them.

Three representations, each with the same small interface:

* :class:`GhostFactors` — Linear/Conv layers. ``A`` [B, g, T, da] are the layer inputs (unfolded
  patches for conv; ``ones=True`` appends an implicit column of ones for the bias) and ``D`` [B, g, T, dd]
  the gradients of the summed loss at the layer outputs, split into ``g`` groups. The per-example
  weight gradient of group j is ``sum_t D[:, j, t]^T A[:, j, t]``, never formed:
  ``<G_i, G'_k> = sum_j sum_{t,s} (A_ijt . A'_kjs)(D_ijt . D'_kjs)``.
* :class:`IndexFactors` — Embedding layers. ``idx`` [B, T] looked-up rows and ``D`` [B, T, d]
  output gradients: ``<G_i, G'_k> = sum_{t,s} [idx_it == idx'_ks] (D_it . D'_ks)``.
* :class:`GradFactors` — materialised per-example gradients ``G`` [B, P].

``pair_scores(test, train)`` returns the [m, n] matrix of gradient inner products;
``self_scores()`` returns the [B] squared gradient norms. Work is chunked so that no intermediate
exceeds ``max_elements`` elements.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Sequence, Union

import torch

from ..errors import UnsupportedModuleError

DEFAULT_MAX_ELEMENTS = 2**25  # 32M elements: 128 MiB in float32 per intermediate


class _TensorFields:
    """Batch plumbing shared by the factor types, over their tensor fields (batch dimension first)."""

    def _tensors(self) -> List[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]  # type: ignore[arg-type]

    @property
    def batch_size(self) -> int:
        return self._tensors()[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def compatible(self, other: "_TensorFields") -> bool:
        """Whether ``other`` can be concatenated after this along the batch dimension."""
        if type(other) is not type(self):
            return False
        for f in fields(self):  # type: ignore[arg-type]
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            same = mine.shape[1:] == theirs.shape[1:] if isinstance(mine, torch.Tensor) else mine == theirs
            if not same:
                return False
        return True

    @classmethod
    def cat(cls, items: Sequence["_TensorFields"]):
        """Concatenate compatible factors along the batch dimension."""
        first = items[0]
        return cls(**{f.name: torch.cat([getattr(i, f.name) for i in items]) if isinstance(getattr(first, f.name), torch.Tensor)
                      else getattr(first, f.name) for f in fields(first)})  # type: ignore[arg-type]


def weight_gradients(A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients ``sum_t D[b, j, t]^T A[b, j, t]``, [B, g, dd, da], from A [B, g, T, da]
    and D [B, g, T, dd] (one outer product per example when T == 1)."""
    if A.shape[2] == 1:
        return D.transpose(2, 3) * A
    return D.transpose(2, 3) @ A


def _row_chunk(rows: int, per_row: int, max_elements: int) -> int:
    """How many rows fit in one chunk when each row costs ``per_row`` elements."""
    return max(1, min(rows, max_elements // max(per_row, 1)))


@dataclass
class GhostFactors(_TensorFields):
    """Layer inputs and output-gradients; A: [B, g, T, da], D: [B, g, T, dd].

    ``ones``: A carries an implicit trailing column of ones (the bias), so every input dot
    product gains 1 without the column being stored.
    """

    A: torch.Tensor
    D: torch.Tensor
    ones: bool = False

    def pair_scores(self, other: "GhostFactors", max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """[m, n] gradient inner products between these (m) and ``other``'s (n) examples. One side may carry the bias
        column explicitly (da + 1 wide, e.g. preconditioned) and the other implicitly (``ones``)."""
        A1, D1, A2, D2 = self.A, self.D, other.A, other.D
        m, g, T, _ = A1.shape
        n, _, S, _ = A2.shape
        if g == 1 and T == 1 and S == 1:
            return _inputs(A1[:, 0, 0], A2[:, 0, 0].T, self.ones, other.ones) * (D1[:, 0, 0] @ D2[:, 0, 0].T)
        # Groups become a batch dimension of the matmuls: [g, rows*T, d].
        A2g = A2.permute(1, 0, 2, 3).reshape(g, n * S, -1)
        D2g = D2.permute(1, 0, 2, 3).reshape(g, n * S, -1)
        out = A1.new_empty(m, n)
        step = _row_chunk(m, 2 * g * T * n * S, max_elements)
        for start in range(0, m, step):
            a = A1[start:start + step].permute(1, 0, 2, 3).reshape(g, -1, A1.shape[-1])
            d = D1[start:start + step].permute(1, 0, 2, 3).reshape(g, -1, D1.shape[-1])
            prod = _inputs(a, A2g.transpose(1, 2), self.ones, other.ones).mul_(torch.bmm(d, D2g.transpose(1, 2)))
            rows = a.shape[1] // T
            out[start:start + rows] = prod.view(g, rows, T, n, S).sum(dim=(0, 2, 4))
        return out

    def to_vector(self) -> torch.Tensor:
        """The per-example gradients themselves, [B, g * dd * (da + ones)] (materialised)."""
        G = weight_gradients(self.A, self.D)
        if self.ones:
            G = torch.cat([G, self.D.sum(2).unsqueeze(-1)], dim=-1)
        return G.reshape(G.shape[0], -1)

    def self_scores(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """[B] squared norms of the per-example gradients."""
        A, D = self.A, self.D
        B, g, T, _ = A.shape
        bias = 1.0 if self.ones else 0.0
        if T == 1:
            return ((A.pow(2).sum(-1) + bias) * D.pow(2).sum(-1)).sum(dim=(1, 2))
        out = A.new_empty(B)
        step = _row_chunk(B, 2 * g * T * T, max_elements)
        for start in range(0, B, step):
            a = A[start:start + step].flatten(0, 1)
            d = D[start:start + step].flatten(0, 1)
            prod = torch.bmm(a, a.transpose(1, 2)).add_(bias).mul_(torch.bmm(d, d.transpose(1, 2)))
            rows = a.shape[0] // g
            out[start:start + rows] = prod.view(rows, g * T * T).sum(1)
        return out


def _inputs(a: torch.Tensor, bT: torch.Tensor, a_ones: bool, b_ones: bool) -> torch.Tensor:
    """a @ bT for input rows a [..., r, da'] and transposed rows bT [..., db', s], with the bias column implicit on a side
    whose flag is set and explicit (the last column) on a side one wider than the other."""
    if a_ones == b_ones:
        return (a @ bT).add_(1.0) if a_ones else a @ bT
    if b_ones:  # a carries the column: its last entry meets b's implicit 1
        return (a[..., :-1] @ bT).add_(a[..., -1:])
    return (a @ bT[..., :-1, :]).add_(bT[..., -1:, :])


def _dense_rows(D: torch.Tensor, slots: torch.Tensor, width: int) -> torch.Tensor:
    """Per-example rows D [B, T, d] summed into ``width`` slots by ``slots`` [B, T]: [B, width * d]."""
    B, _, d = D.shape
    dense = D.new_zeros(B, width, d).scatter_add_(1, slots.unsqueeze(-1).expand(-1, -1, d), D)
    return dense.reshape(B, width * d)


@dataclass
class IndexFactors(_TensorFields):
    """Embedding lookups and their output-gradients; idx: [B, T] (long), D: [B, T, d]."""

    idx: torch.Tensor
    D: torch.Tensor

    def to_vector(self) -> torch.Tensor:
        raise UnsupportedModuleError(
            "A gradient index cannot hold Embedding layers' per-example gradients (they span the whole vocabulary); "
            "exclude embeddings from layers (exclude=) when building an index."
        )

    def pair_scores(self, other: "IndexFactors", max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        """Both sides' gradients made dense over the rows this side looks up (U of them, at most its lookups): each
        example's gradient rows [U, d] summed per index, the other side's lookups outside U dropped (they meet zeros
        here), then one matrix product per block. Costs m n U d instead of comparing every pair of positions."""
        m, T = self.idx.shape
        n, d = other.idx.shape[0], self.D.shape[-1]
        out = self.D.new_empty(m, n)
        step = max(1, min(m, int((max_elements / max(T * d, 1)) ** 0.5)))  # this side's block: rows * U * d, U <= rows * T
        for start in range(0, m, step):
            used, inverse = torch.unique(self.idx[start:start + step], return_inverse=True)
            mine = _dense_rows(self.D[start:start + step], inverse, used.numel())  # [rows, U * d]
            slot = torch.searchsorted(used, other.idx).clamp_(max=used.numel() - 1)
            slot = torch.where(used[slot] == other.idx, slot, used.numel())  # lookups outside U: a slot dropped below
            chunk = _row_chunk(n, (used.numel() + 1) * d, max_elements)
            for first in range(0, n, chunk):
                theirs = _dense_rows(other.D[first:first + chunk], slot[first:first + chunk], used.numel() + 1)
                out[start:start + mine.shape[0], first:first + chunk] = mine @ theirs[:, :mine.shape[1]].T
        return out

    def self_scores(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        B, T = self.idx.shape
        if T == 1:
            return self.D[:, 0].pow(2).sum(-1)
        out = self.D.new_empty(B)
        step = _row_chunk(B, 2 * T * T, max_elements)
        for start in range(0, B, step):
            d = self.D[start:start + step]
            i = self.idx[start:start + step]
            same = i.unsqueeze(2) == i.unsqueeze(1)
            out[start:start + d.shape[0]] = (torch.bmm(d, d.transpose(1, 2)) * same).sum(dim=(1, 2))
        return out


@dataclass
class GradFactors(_TensorFields):
    """Materialised per-example gradients; G: [B, P]."""

    G: torch.Tensor

    def to_vector(self) -> torch.Tensor:
        return self.G

    def pair_scores(self, other: "GradFactors", max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        return self.G @ other.G.T

    def self_scores(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
        return self.G.pow(2).sum(-1)


Factors = Union[GhostFactors, IndexFactors, GradFactors]


class Materialised:
    """The kernel of layer handlers that build every parameter's per-example gradients directly (broadcast parameters,
    recurrent layers): their sum for the engine's check and, as :class:`GradFactors` (projected when the run projects),
    their factors. A mixin before :class:`tracin.layers.base.LayerHandler`; subclasses give :meth:`per_example`."""

    name: str

    def per_example(self, calls: List[Any]) -> List[torch.Tensor]:
        """Each parameter in scope's per-example gradients [B, numel], in ``param_names`` order."""
        raise NotImplementedError

    def batch_gradients(self, calls: List[Any]) -> List[torch.Tensor]:
        return [g.sum(0).reshape(p.shape) for g, p in zip(self.per_example(calls), self.parameters())]  # type: ignore[attr-defined]

    def factors(self, calls: List[Any], run: Any, whitening: object = None) -> GradFactors:
        run.mode = "materialize"
        dense = GradFactors(torch.cat(self.per_example(calls), dim=1))
        return run.projector.grads(self.name, dense) if run.projector is not None else dense

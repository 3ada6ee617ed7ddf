"""Random projection of per-example gradients: an explicit, seeded approximation.

Every projection matrix R [k, d] has entries with E[R^T R] = I, so projected inner products are
unbiased estimates of the exact ones: E[<R g, R g'>] = <g, g'>.

* Linear/Conv layers (ghost factors): the two factors are projected separately (LoGra-style),
  A -> A P_in^T and D -> D P_out^T, so the projected gradient is P_out G P_in^T [k_out, k_in] and the
  full gradient is never formed. The bias is the last column of P_in applied to the implicit ones.
  ``dim`` is the size of the per-example representation the kernel then works with: for a layer
  scored with the ghost product (few positions) that is the two factors, k_in + k_out = dim; for a
  materialised layer (many positions) and for saved gradients it is P_out G P_in^T, k_in * k_out = dim.
  A side that already fits is left exact.
* Embedding layers: the output gradients are projected, the index matching stays exact.
* Materialised gradients (norm layers) [B, P] with P > k: projected in column blocks, each block's
  matrix generated from its own seed on the device, so no [k, P] matrix is ever held whole.

Kinds: ``gaussian`` N(0, 1/k); ``rademacher`` +-1/sqrt(k); ``sparse`` +-sqrt(3/k) with probability
1/6 each, else 0 (Achlioptas).
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Tuple

import torch

from .factors import GradFactors, IndexFactors
from .sizing import sides

BLOCK_ELEMENTS = 2**24  # largest generated block (64 MiB in float32)


class Projector:
    """Seeded random projections to about ``dim`` dimensions per layer."""

    def __init__(self, dim: int, kind: str = "gaussian", seed: int = 0, materialized: bool = False):
        """``dim`` and ``kind`` (one of :data:`tracin.config.PROJECTIONS`) are validated by
        :class:`tracin.config.ScoringConfig`."""
        self.dim, self.kind, self.seed = dim, kind, seed
        self.materialized = materialized  # always split k_in * k_out = dim (for stored gradient vectors)
        self._cache: Dict[Tuple, torch.Tensor] = {}

    def describe(self) -> Dict[str, object]:
        return {"projection_dim": self.dim, "projection": self.kind, "seed": self.seed, "materialized": self.materialized}

    def for_vectors(self) -> "Projector":
        """The same projection sized for materialised per-example vectors (k_in * k_out = dim)."""
        return Projector(self.dim, self.kind, self.seed, materialized=True)

    def matrix(self, key: str, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """R [rows, cols] with E[R^T R] = I, reproducible from (seed, key)."""
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        gen = torch.Generator(device=gen_device).manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
        shape = (rows, cols)
        if self.kind == "gaussian":
            R = torch.randn(shape, generator=gen, device=gen_device, dtype=torch.float32) / math.sqrt(rows)
        elif self.kind == "rademacher":
            R = (torch.randint(0, 2, shape, generator=gen, device=gen_device).float() * 2 - 1) / math.sqrt(rows)
        else:
            u = torch.rand(shape, generator=gen, device=gen_device)
            R = ((u < 1 / 6).float() - (u > 5 / 6).float()) * math.sqrt(3.0 / rows)
        return R.to(device=device, dtype=dtype)

    def _cached(self, key: str, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        index = (key, rows, cols, device, dtype)
        if index not in self._cache:
            self._cache[index] = self.matrix(key, rows, cols, device, dtype)
        return self._cache[index]

    def sides(self, da: int, dd: int, ghost: bool = False) -> Tuple[int, int]:
        """(k_in, k_out) of a layer with input width ``da`` and output width ``dd`` (:func:`sides`)."""
        return sides(self.dim, da, dd, ghost and not self.materialized)

    def ghost(self, name: str, A: torch.Tensor, D: torch.Tensor, ones: bool, ghost_form: bool = False) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Project A [B, g, T, da] (plus the implicit bias column) and D [B, g, T, dd]; ``ghost_form``
        says the kernel will use the factors themselves (sized k_in + k_out), not their product."""
        da, dd = A.shape[-1] + int(ones), D.shape[-1]
        if (da + dd if ghost_form and not self.materialized else da * dd) <= self.dim:
            return A, D, ones
        k_in, k_out = self.sides(da, dd, ghost_form)
        if k_in < da:
            P = self._cached(f"{name}:in", k_in, da, A.device, A.dtype)
            A = A @ P[:, : A.shape[-1]].T
            if ones:
                A = A + P[:, -1]
            ones = False
        if k_out < dd:
            D = D @ self._cached(f"{name}:out", k_out, dd, D.device, D.dtype).T
        return A, D, ones

    def index(self, name: str, factors: IndexFactors) -> IndexFactors:
        d = factors.D.shape[-1]
        if d <= self.dim:
            return factors
        return IndexFactors(factors.idx, factors.D @ self._cached(f"{name}:emb", self.dim, d, factors.D.device, factors.D.dtype).T)

    def grads(self, name: str, factors: GradFactors) -> GradFactors:
        """Blockwise projection of materialised gradients [B, P] -> [B, dim] when P > dim."""
        G = factors.G
        P = G.shape[1]
        if P <= self.dim:
            return factors
        step = max(1, BLOCK_ELEMENTS // self.dim)
        out = G.new_zeros(G.shape[0], self.dim)
        for start in range(0, P, step):
            block = self.matrix(f"{name}:grad:{start}", self.dim, min(step, P - start), G.device, G.dtype)
            out += G[:, start:start + block.shape[1]] @ block.T
        return GradFactors(out)

"""Damped inverses of Kronecker factors, made no earlier than a pass needs them: P = (S + l I)^-1 and whiteners W with
W W^T = P, from a float64 Cholesky factorisation of S + l I (an eigendecomposition where rounding makes it fail), or
truncated to the leading eigen-directions of S (``projection_dim`` under K-FAC, :func:`kept_whitener`). l = damping *
mean eigenvalue of S, Kronfluence's heuristic; :mod:`tracin.layers.precondition` fits S and hands these to the layer handlers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


class Inverses:
    """One factor's damped inverses P = (S + l I)^-1 for several checkpoints at once, [n, g, d, d], and whiteners W
    with W W^T = P, [n, g, d, k] (k = d unless the fit keeps a rank), on the run's device and dtype. Nothing costing
    d^3 is made before a pass needs it: from the float64 Cholesky factors L of S + l I, a one-sided influence pass
    applies P to its (few) query rows by two triangular solves (2 d^2 per row) until the rows solved would pass n d / 3,
    then forms P (about 2 n d^3 / 3) once; W = L^-T is made only when a pass whitens both sides. A truncated fit gives
    W first and makes P only if asked."""

    def __init__(self, device: torch.device, dtype: torch.dtype, P: Optional[torch.Tensor] = None,
                 W: Optional[torch.Tensor] = None, cholesky: Optional[torch.Tensor] = None,
                 low_rank: Optional["LowRank"] = None):
        """``cholesky``: float64 Cholesky factors L [n, g, d, d] of S + l I; ``low_rank``: S's exact low-rank form."""
        self.device, self.dtype = device, dtype
        self._P, self._W, self._L = P, W, cholesky
        self._low = low_rank
        self._solved = 0  # rows solved with L so far, per group

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def _release(self) -> None:
        if self._P is not None and self._W is not None:
            self._L = None

    def inverse(self) -> torch.Tensor:
        if self._P is None:
            if self._low is not None:
                self._P = self._here(self._low.matrix(-1.0))
            elif self._L is not None:
                self._P = self._here(torch.cholesky_inverse(self._L.flatten(0, 1)).view(self._L.shape))
            else:
                assert self._W is not None
                W = self._W.to(torch.float64)
                self._P = self._here(W @ W.transpose(-1, -2))
            self._release()
        return self._P

    def whitener(self) -> torch.Tensor:
        if self._W is None and self._low is not None:
            self._W = self._here(self._low.matrix(-0.5))
        if self._W is None:
            assert self._L is not None
            L = self._L
            eye = torch.eye(L.shape[-1], dtype=L.dtype).expand_as(L)
            self._W = self._here(torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2))
            self._release()
        return self._W

    def apply_inverse(self, index: int, X: torch.Tensor) -> torch.Tensor:
        """X P of checkpoint ``index`` for rows X [B, g, T, d]: by Cholesky solves while they are the cheaper way
        (see the class), else with P."""
        B, g, T, d = X.shape
        if self._P is None and self._low is not None:
            return self._low.apply(index, X, -1.0)
        L = self._L
        if self._P is None and L is not None and (self._solved + B * T) * 3 <= L.shape[0] * d:
            self._solved += B * T
            rhs = X.detach().permute(1, 3, 0, 2).reshape(g, d, B * T).to("cpu", torch.float64)  # columns are rows of X
            out = torch.cholesky_solve(rhs, L[index])  # P x for each column: (X P)^T as P is symmetric
            return out.view(g, d, B, T).permute(2, 0, 3, 1).to(X.device, X.dtype)
        return torch.einsum("bgti,gij->bgtj", X, self.inverse()[index].to(X.device, X.dtype))

    def apply_whitener(self, index: int, X: torch.Tensor) -> torch.Tensor:
        """X W of checkpoint ``index`` for rows X [B, g, T, d] ([B, g, T, k] when W keeps k directions)."""
        return torch.einsum("bgti,gij->bgtj", X, self.whitener()[index].to(X.device, X.dtype))


class LowRank:
    """S = Y^T Y [n, g, d, d] of rank r < d from its scaled rows Y [n, g, r, d], with the damping l [n, g] (float64).
    The inverse by Woodbury, P = (S + l I)^-1 = (I - Y^T K^-1 Y) / l with K = l I + Y Y^T (r x r: one Cholesky
    factorisation, r^3 / 3, and r^2 d for Y Y^T); a symmetric whitener (S + l I)^-1/2 = l^-1/2 I + V diag((e +
    l)^-1/2 - l^-1/2) V^T from the eigen-decomposition Y Y^T = U diag(e) U^T (V = Y^T U e^-1/2) only when a pass asks
    for one."""

    def __init__(self, Y: torch.Tensor, lam: torch.Tensor):
        self.Y, self.lam = Y, lam
        self.gram = Y @ Y.transpose(-1, -2)  # [n, g, r, r]
        K = self.gram.clone()
        torch.diagonal(K, dim1=-2, dim2=-1).add_(lam[..., None])
        self.L = torch.linalg.cholesky(K)  # K's eigenvalues are at least l > 0
        self._eigen: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """K^-1 rhs for rhs [n, g, r, k]."""
        return torch.cholesky_solve(rhs, self.L)

    def _whitener_terms(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(V [n, g, d, r] orthonormal, its coefficients (e + l)^-1/2 - l^-1/2 [n, g, r]); zero directions drop out."""
        if self._eigen is None:
            values, U = torch.linalg.eigh(self.gram)
            values = values.clamp_min(0)
            root = values.sqrt()
            V = (self.Y.transpose(-1, -2) @ U) / torch.where(root > 0, root, torch.ones_like(root)).unsqueeze(-2)
            lam = self.lam[..., None]
            self._eigen = (V * (root > 0).unsqueeze(-2), (values + lam).rsqrt() - lam.rsqrt())
        return self._eigen

    def matrix(self, power: float) -> torch.Tensor:
        """(S + l I)^power [n, g, d, d] for power -1 (P) or -1/2 (the symmetric whitener)."""
        eye = torch.eye(self.Y.shape[-1], dtype=self.Y.dtype)
        if power == -1.0:
            return (eye - self.Y.transpose(-1, -2) @ self._solve(self.Y)) / self.lam[..., None, None]
        V, coefficients = self._whitener_terms()
        return eye * self.lam[..., None, None].rsqrt() + (V * coefficients.unsqueeze(-2)) @ V.transpose(-1, -2)

    def apply(self, index: int, X: torch.Tensor, power: float) -> torch.Tensor:
        """X (S + l I)^power of checkpoint ``index`` for X [B, g, T, d], in float64 (the identity and low-rank terms
        nearly cancel along the directions the training data uses)."""
        B, g, T, d = X.shape
        x = X.detach().to("cpu", torch.float64)
        lam = self.lam[index][None, :, None, None]  # [1, g, 1, 1]
        if power == -1.0:
            Y = self.Y[index]  # [g, r, d]
            along = torch.einsum("bgtd,grd->grbt", x, Y).reshape(g, Y.shape[1], B * T)
            solved = torch.cholesky_solve(along, self.L[index]).view(g, -1, B, T)
            out = (x - torch.einsum("grbt,grd->bgtd", solved, Y)) / lam
        else:
            V, coefficients = (t[index] for t in self._whitener_terms())
            along = torch.einsum("bgtd,gdr->bgtr", x, V) * coefficients[:, None, :]
            out = x * lam.rsqrt() + torch.einsum("bgtr,gdr->bgtd", along, V)
        return out.to(X.device, X.dtype)


def low_rank_inverses(X: torch.Tensor, count: int, damping: float, where: Tuple[torch.device, torch.dtype]) -> Inverses:
    """The :class:`Inverses` of S = X^T X / count for the rows X [g, r, d] of a factor with r < d, exactly
    (:class:`LowRank`: r^2 d + r^3 / 3 instead of d^3 / 3 and more). l = damping * mean eigenvalue of S as for a full
    factor (trace / d), 1 for a zero factor."""
    Y = X.detach().to("cpu", torch.float64) / count ** 0.5
    lam = _damping(Y.pow(2).sum(dim=(1, 2)), Y.shape[-1], damping)  # trace(S) = |Y|^2
    return Inverses(*where, low_rank=LowRank(Y.unsqueeze(0), lam.unsqueeze(0)))


@dataclass(frozen=True)
class FactorInverse:
    """One checkpoint's entry ``index`` of a layer factor's :class:`Inverses`: ``inverse()`` P [g, d, d],
    ``whitener()`` W [g, d, k], ``apply_inverse(X)`` X P for X [B, g, T, d]."""

    group: Inverses
    index: int

    def inverse(self) -> torch.Tensor:
        return self.group.inverse()[self.index]

    def whitener(self) -> torch.Tensor:
        return self.group.whitener()[self.index]

    def apply_inverse(self, X: torch.Tensor) -> torch.Tensor:
        return self.group.apply_inverse(self.index, X)

    def apply_whitener(self, X: torch.Tensor) -> torch.Tensor:
        return self.group.apply_whitener(self.index, X)


def damped_cholesky(S: torch.Tensor, damping: float) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(L, None) with L the float64 Cholesky factor of S + l I for S [g, d, d], l = damping * mean eigenvalue of S
    (its trace / d, per group); when rounding makes the factorisation fail, (None, W) with W W^T = (S + l I)^-1 from
    an eigendecomposition. A group whose S is zero gets the identity (its layer's factors are all zero, so are its
    scores)."""
    damped, lam = _symmetric_and_damping(S, damping)
    torch.diagonal(damped, dim1=1, dim2=2).add_(lam[:, None])  # in place: d x d is large
    L, info = torch.linalg.cholesky_ex(damped)
    if bool((info != 0).any()):
        values, vectors = torch.linalg.eigh(damped)
        return None, vectors * values.clamp_min(torch.finfo(damped.dtype).tiny).rsqrt().unsqueeze(1)
    return L, None


def whitener(S: torch.Tensor, damping: float) -> torch.Tensor:
    """W [g, d, d] with W W^T = (S + l I)^-1 for S [g, d, d] (:func:`damped_cholesky`; W = L^-T), float64."""
    L, W = damped_cholesky(S, damping)
    return W if W is not None else Inverses(torch.device("cpu"), torch.float64, cholesky=L.unsqueeze(0)).whitener()[0]


Eigen = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # values [g, d] descending, at least 0; vectors [g, d, d]; l [g]


def damped_eigen(S: torch.Tensor, damping: float) -> Eigen:
    """The eigen-decomposition of the symmetric part of S [g, d, d] in float64, leading direction first, with its
    damping l [g] (as for every inverse here)."""
    S, lam = _symmetric_and_damping(S, damping)
    values, vectors = torch.linalg.eigh(S)  # ascending
    return values.flip(-1).clamp_min(0), vectors.flip(-1), lam


def kept_whitener(eigen: Eigen, keep: int) -> torch.Tensor:
    """W [g, d, keep] with W W^T the damped inverse (S + l I)^-1 of S on the ``keep`` leading eigen-directions of S,
    W = U_k diag((s_k + l)^-1/2), from :func:`damped_eigen`'s decomposition of S. Whitened factors a W are then
    ``keep`` numbers wide and their inner products keep, of each example pair's preconditioned product, the part along
    the directions the training data varies in most (on average a fraction s / (s + l) per direction, so the dropped
    directions are those that carry least of it). Deterministic: no random matrix."""
    values, vectors, lam = eigen
    return vectors[:, :, :keep] * (values[:, :keep] + lam[:, None]).rsqrt().unsqueeze(1)


def _symmetric_and_damping(S: torch.Tensor, damping: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the symmetric part of S [g, d, d] as a new float64 CPU tensor, l [g]): l = damping * mean eigenvalue of S (its
    trace / d), and 1 for a group whose S is zero (its layer's factors are all zero, so are its scores, whatever the
    inverse; with 1 it is the identity)."""
    S = S.detach().to("cpu", torch.float64)
    sym = (S + S.transpose(1, 2)).mul_(0.5)
    return sym, _damping(torch.diagonal(sym, dim1=1, dim2=2).sum(-1), S.shape[-1], damping)


def _damping(traces: torch.Tensor, d: int, damping: float) -> torch.Tensor:
    """l [g] = damping * mean eigenvalue (trace / d) of each group's factor, 1 where the factor is zero."""
    lam = damping * traces.clamp_min(0) / d
    return torch.where(lam <= 0, torch.ones_like(lam), lam)

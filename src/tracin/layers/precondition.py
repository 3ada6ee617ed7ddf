"""K-FAC preconditioning: TracIn scores g_i^T P g_j with P a Kronecker-factored inverse curvature,
kept exact under the ghost dot-product.

For a Linear or Conv layer with inputs a (bias as a trailing 1 when the bias is in scope) and
output-gradients d at positions t, the per-example gradient is sum_t d_t a_t^T. Per checkpoint the
preconditioner is fitted on training data:

    S_in  = (1/N) sum_i sum_t a_it a_it^T      [g, da, da]   (g = conv groups)
    S_out = (1/N) sum_i sum_t d_it d_it^T      [g, dd, dd]   (d from the given labels: empirical Fisher)

and P = (S_out + l_out I)^-1 (x) (S_in + l_in I)^-1 with each damping l = damping * mean eigenvalue of
its factor (Kronfluence's heuristic, applied to each factor). Writing (S + l I)^-1 = W W^T, the
preconditioned inner product is the plain one of the transformed factors a -> W_in^T a, d -> W_out^T d,
so every kernel (ghost, materialised, projected) runs unchanged on them and the result is exact for
this P. Self-influence becomes g^T P g, which no longer grows with the size of a layer's inputs — on
image folders that size works against finding flipped labels (docs/quality.md).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import TracInError
from .inverses import Eigen, FactorInverse, Inverses, damped_cholesky, damped_eigen, kept_whitener, low_rank_inverses
from .budget import allocate
from .statistics import CovarianceSums, InvariantInputs, with_ones



# layer -> (its input factor's inverse, its output-gradient factor's), per checkpoint
Whiteners = Dict[str, Tuple[FactorInverse, FactorInverse]]


def check_precondition(precondition: str, handlers: Sequence) -> None:
    """For ``precondition="kfac"`` (names are checked by :class:`tracin.config.ScoringConfig`), refuse a
    scope (layer handlers) with layers it does not cover: K-FAC needs a layer's inputs and output-gradients
    (Linear, Conv)."""
    if precondition == "kfac":
        other = [f"{h.name} ({type(h.module).__name__})" for h in handlers if not h.kronecker]
        if other:
            raise TracInError(
                f"precondition='kfac' covers Linear and Conv layers only, but {', '.join(other[:3])}"
                f"{' and more' if len(other) > 3 else ''} {'is' if len(other) == 1 else 'are'} in scope; choose layers "
                "without them (e.g. layers='last' / --layers last) or precondition='none'.")


AUTO_SHARE = 0.95  # precondition="auto" uses K-FAC when the layers it covers hold this share of the scope's parameters


def resolve_precondition(precondition: str, handlers: Sequence) -> Tuple[str, list, List[str]]:
    """(the preconditioner a run uses, "kfac" or "none"; the layer handlers it scores; the layers ``"auto"`` left out).

    ``"auto"`` (the default, chosen by the counterfactual evidence in docs/quality.md) is K-FAC over the Linear and
    Conv layers in scope when they hold at least :data:`AUTO_SHARE` of its parameters (the rest, typically
    normalisation layers' scales and shifts, are left out); otherwise plain TracIn over the whole scope (e.g. a
    model whose embeddings carry most of its parameters). ``"kfac"`` refuses other layers; ``"none"`` is plain."""
    if precondition != "auto":
        check_precondition(precondition, handlers)
        return precondition, list(handlers), []
    covered = [h for h in handlers if h.kronecker]
    total = sum(h.num_params for h in handlers)
    if covered and sum(h.num_params for h in covered) >= AUTO_SHARE * total:
        return "kfac", covered, [h.name for h in handlers if not h.kronecker]
    return "none", list(handlers), []


def fit_whiteners(sums: Sequence["CovarianceSums"], damping: float, device: torch.device, dtype: torch.dtype,
                  rank: Optional[int] = None) -> List[Whiteners]:
    """The whiteners of each layer's factors and their products (the damped inverses) for each checkpoint's
    statistics in ``sums`` (each summed over every rank first); with ``rank``, each layer's whiteners keep the
    leading eigen-directions of its factors only (:func:`tracin.layers.inverses.kept_whitener`), as many as
    :func:`tracin.layers.budget.allocate` gives it. A layer's factors of all the checkpoints are inverted in one batched call (per
    checkpoint and layer the calls cost more than the arithmetic on small layers)."""
    for s in sums:
        s.all_reduce()
        assert s.count > 0, "loaders refuse an empty training set before a fit starts"
    out: List[Whiteners] = [{} for _ in sums]
    names = {name: None for s in sums for name in s.layers()}  # every layer, in the order first met
    spectra = _Spectra(sums, damping)
    budgets = allocate(sums, rank, spectra.values) if rank is not None else {}
    for name in names:
        keep = budgets.get(name)
        for side in (0, 1):
            members = [c for c, s in enumerate(sums) if name in s.ghost]  # a data-dependent layer may be absent
            rows = [sums[c].rows(name, side) for c in members]
            if keep is None and all(r is not None for r in rows):  # fewer rows than half the width: exact low rank
                for c, X in zip(members, rows):
                    inverses = low_rank_inverses(X, sums[c].count, damping, (device, dtype))  # type: ignore[arg-type]
                    out[c].setdefault(name, [None, None])[side] = FactorInverse(inverses, 0)
                continue
            for group, distinct, slots in _factor_groups(sums, name, side):
                if keep is not None:  # [n, g, d, k]
                    W = torch.stack([kept_whitener(spectra.of(c, name, side), keep[side]) for c in distinct])
                    inverses = Inverses(device, dtype, W=W.to(device, dtype))
                else:
                    inverses = _layer_inverses(name, _means(sums, distinct, name, side), damping, (device, dtype))
                for c in group:
                    out[c].setdefault(name, [None, None])[side] = FactorInverse(inverses, slots[c])
    return [{name: tuple(f) for name, f in w.items()} for w in out]  # type: ignore[misc]


def _factor_groups(sums: Sequence["CovarianceSums"], name: str, side: int) -> List[Tuple[List[int], List[int], Dict[int, int]]]:
    """One factor of a layer at the checkpoints that ran it (a data-dependent layer may be absent), grouped by the
    factor's shape: per group (its checkpoints, the distinct ones whose statistics are decomposed, each member's place
    among them; :func:`_distinct`)."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for c, s in enumerate(sums):
        if name in s.ghost:
            groups.setdefault(tuple(s.total(name, side).shape), []).append(c)
    return [(group, *_distinct(sums, group, name, side)) for group in groups.values()]


def _means(sums: Sequence["CovarianceSums"], checkpoints: List[int], name: str, side: int) -> torch.Tensor:
    """One factor's statistics X^T X / count at ``checkpoints`` (of one shape), stacked: [n, g, d, d]."""
    return torch.stack([sums[c].total(name, side) / sums[c].count for c in checkpoints])


def _distinct(sums: Sequence["CovarianceSums"], group: List[int], name: str, side: int) -> Tuple[List[int], Dict[int, int]]:
    """(the checkpoints of ``group`` whose statistics of one factor are inverted, each member's place among them): a
    checkpoint whose statistics equal the group's first's (an input factor the same at every checkpoint,
    :class:`InvariantInputs`) shares its inverse."""
    first = group[0]
    reference = sums[first].total(name, side)
    distinct, slots = [first], {first: 0}
    for c in group[1:]:
        if sums[c].count == sums[first].count and torch.equal(sums[c].total(name, side), reference):
            slots[c] = 0
        else:
            slots[c] = len(distinct)
            distinct.append(c)
    return distinct, slots


def _layer_inverses(name: str, stacked: torch.Tensor, damping: float, where: Tuple[torch.device, torch.dtype]) -> Inverses:
    """The :class:`Inverses` of one layer's factors [n, g, d, d] (decomposed in float64: inverses before rounding) on
    ``where`` (device, dtype); factors that are not finite or that no decomposition can invert are one clear error
    naming the layer."""
    with _invertible(name, stacked):
        flat = stacked.flatten(0, 1)
        L, W = damped_cholesky(flat, damping)
        if L is not None:
            return Inverses(*where, cholesky=L.view(stacked.shape))
        return Inverses(*where, W=W.view(stacked.shape).to(*where))


@contextmanager
def _invertible(name: str, S: torch.Tensor) -> Iterator[None]:
    """Around a decomposition of a layer's statistics S: not finite, or not decomposable, is one clear error."""
    scale = float(S.abs().max()) if S.numel() else 0.0
    try:
        if not math.isfinite(scale):
            raise torch.linalg.LinAlgError("not finite")
        yield
    except torch.linalg.LinAlgError:
        raise TracInError(f"The K-FAC statistics of layer {name!r} cannot be inverted (entries up to {scale:.3g}): its "
                          "inputs or gradients are far outside float32's comfortable range; rescale the inputs, or score "
                          "with precondition='none' (--precondition none).") from None


class _Spectra:
    """Under a kept rank: each factor's damped eigen-decomposition (:func:`damped_eigen`) at each checkpoint, made once
    for the shared budget (:func:`tracin.layers.budget.allocate`) and for the kept whiteners (:func:`kept_whitener`),
    a factor's checkpoints in one batched call (measured twice as fast as one call each); a checkpoint whose statistics
    equal the first one's (an input factor the same at every checkpoint) shares its decomposition."""

    def __init__(self, sums: Sequence[CovarianceSums], damping: float):
        self.sums, self.damping = sums, damping
        self._made: Dict[Tuple[str, int], Dict[int, Eigen]] = {}

    def of(self, c: int, name: str, side: int) -> Eigen:
        if (name, side) not in self._made:
            self._made[(name, side)] = self._decompose(name, side)
        return self._made[(name, side)][c]

    def values(self, c: int, name: str, side: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues [g, d] descending, damping [g]) of checkpoint ``c``'s statistics of a factor."""
        values, _, lam = self.of(c, name, side)
        return values, lam

    def _decompose(self, name: str, side: int) -> Dict[int, Eigen]:
        out: Dict[int, Eigen] = {}
        for group, distinct, slots in _factor_groups(self.sums, name, side):
            stacked = _means(self.sums, distinct, name, side)
            with _invertible(name, stacked):
                values, vectors, lam = damped_eigen(stacked.flatten(0, 1), self.damping)
            n, g = stacked.shape[:2]
            values, vectors, lam = values.view(n, g, -1), vectors.view(n, g, *vectors.shape[1:]), lam.view(n, g)
            out.update({c: (values[slots[c]], vectors[slots[c]], lam[slots[c]]) for c in group})
        return out


class FitData(Protocol):
    """The training data as a K-FAC fit reads it (the engine's scheduler provides one)."""

    checkpoints: int  # how many checkpoints to fit
    device: torch.device
    dtype: torch.dtype  # of the whiteners
    budget_bytes: int  # for every checkpoint's statistics at once
    total: int  # training examples (for the progress bar)
    progress: bool

    def at_checkpoints(self) -> Iterator[Tuple[int, int, object]]:
        """(checkpoint index, first example index, raw batch) with that checkpoint loaded, reading the data
        once (each group of batches at every checkpoint in turn)."""

    def at_checkpoint(self, c: int) -> Iterator[Tuple[int, object]]:
        """Load checkpoint ``c``; (first example index, raw batch) over the data."""

    def raw_factors(self, first: int, batch: object) -> Tuple[int, Dict]:
        """(batch size, {layer: (A, D, bias in scope, ...) or None}) at the loaded checkpoint."""


class MovingFisher:
    """In-run K-FAC statistics: moving averages of each layer's factor covariances over the training batches as they
    come, which forget over about ``passes`` passes over ``num_examples`` examples, and their damped inverses as they
    stand (the same damping rule as a fitted preconditioner's)."""

    def __init__(self, num_examples: int, device: torch.device, passes: float = 1.0):
        self.sums = CovarianceSums(torch.float64, device, rows=False)
        self.num_examples, self.passes = num_examples, passes

    def keep(self, size: int) -> float:
        """How much of the averages a batch of ``size`` examples keeps."""
        return max(0.0, 1.0 - size / (self.passes * self.num_examples))

    def add(self, name: str, raw: Tuple, size: int) -> None:
        """Fold one batch's raw factors of a layer (A, D, bias in scope, ghost form) into its averages; a batch whose
        factors are not finite (a step the gradient scaler skips) is left out."""
        if not all(bool(torch.isfinite(t).all()) for t in raw[:2]):
            return
        self.sums.scale(self.keep(size), name)
        self.sums.add(name, *raw[:4])

    def count(self, size: int) -> None:
        """A recorded batch of ``size`` examples: the averages' example count moves as their sums do."""
        self.sums.count = self.sums.count * self.keep(size) + size

    def whiteners(self, damping: float, device: torch.device) -> Whiteners:
        """The damped inverses of the averages as they stand now."""
        return fit_whiteners([self.sums], damping, device, torch.float32)[0]


SIDES = ("both", "query", "key")  # how a batch's factors take part in a pairing (see Whitening.apply)


@dataclass(frozen=True)
class Whitening:
    """One checkpoint's fitted whiteners as one batch's factors meet them: ``side`` ``"both"`` (both sides of every
    pairing whitened), ``"query"`` (this side gets the whole inverse) or ``"key"`` (this side stays as it is)."""

    whiteners: Whiteners
    side: str = "both"

    def apply(self, name: str, A: torch.Tensor, D: torch.Tensor, ones: bool) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Transformed factors (A' [B, g, T, da + ones], D' [B, g, T, dd], no implicit bias; ``"key"`` leaves A and the
        implicit bias as they are) of one layer: ``"both"``
        whitens them (A W_in, D W_out: the pairing of two whitened sides is g^T P g'); ``"query"`` applies the whole
        inverse (A W_in W_in^T, D W_out W_out^T) and ``"key"`` leaves them as they are, which gives the same g^T P g'
        while only the (few) query examples are transformed."""
        if self.side == "key":
            return A, D, ones
        if name not in self.whiteners:
            raise TracInError(f"Layer {name!r} never ran while K-FAC was fitted on the training data, so it has no "
                              "preconditioner; fit on data that reaches it (fit_preconditioner) or leave it out of layers.")
        inputs, outputs = self.whiteners[name]
        if self.side == "query":
            return inputs.apply_inverse(with_ones(A, ones)), outputs.apply_inverse(D), False
        return inputs.apply_whitener(with_ones(A, ones)), outputs.apply_whitener(D), False


class KFAC:
    """Per-checkpoint K-FAC preconditioner: the engine fits it (one extra forward and backward pass over the training
    data per checkpoint); :meth:`whitening` hands one checkpoint's whiteners, for one side of a pairing, to the layer
    handlers with each batch. Once fitted it holds no run state."""

    def __init__(self, damping: float = 0.1, left_out: Sequence[str] = (), rank: Optional[int] = None):
        """``damping``: validated by :class:`tracin.config.ScoringConfig`; ``left_out``: layers of the requested scope
        that ``precondition="auto"`` leaves out (recorded in :meth:`describe`); ``rank``: the run's ``projection_dim``,
        which under K-FAC keeps each layer's leading eigen-directions (:func:`tracin.layers.inverses.kept_whitener`)."""
        self.damping = float(damping)
        self.rank = rank
        self.per_checkpoint: Optional[List[Whiteners]] = None
        self.fit_examples = 0
        self.left_out: List[str] = list(left_out)

    @property
    def fitted(self) -> bool:
        return self.per_checkpoint is not None

    def describe(self) -> Dict[str, object]:
        return {"precondition": "kfac", "damping": self.damping, "fisher": "empirical", "fit_examples": self.fit_examples,
                "left_out": list(self.left_out), "rank": self.rank}

    def state(self) -> Dict[str, torch.Tensor]:
        """The fitted whiteners as named tensors (``"checkpoint|layer|side"``, side 0: W_in, 1: W_out), to save; the
        inverses follow from them (P = W W^T), so they are neither formed nor saved here."""
        assert self.per_checkpoint is not None, "fit before saving"
        return {f"{c}|{name}|{side}": f.whitener() for c, whiteners in enumerate(self.per_checkpoint)
                for name, pair in whiteners.items() for side, f in enumerate(pair)}

    def load_state(self, tensors: Dict[str, torch.Tensor], checkpoints: int, fit_examples: int) -> None:
        """Take the whiteners of :meth:`state` for ``checkpoints`` checkpoints, fitted on ``fit_examples`` examples."""
        fitted: List[Dict[str, Dict[int, FactorInverse]]] = [{} for _ in range(checkpoints)]
        try:
            for key, W in tensors.items():
                c, name, side = key.split("|")
                fitted[int(c)].setdefault(name, {})[int(side)] = FactorInverse(Inverses(W.device, W.dtype, W=W.unsqueeze(0)), 0)
            self.per_checkpoint = [{name: (pair[0], pair[1]) for name, pair in w.items()} for w in fitted]
        except (ValueError, IndexError, KeyError):
            raise TracInError(f"The saved K-FAC whiteners do not describe {checkpoints} checkpoints' layers (each its two "
                              "factors); build the index again.") from None
        self.fit_examples = fit_examples

    def whitening(self, checkpoint: int, side: str = "both") -> Whitening:
        """The whiteners of ``checkpoint`` (fitted first) for a batch on ``side`` of a pairing (:data:`SIDES`)."""
        assert self.per_checkpoint is not None, "the engine fits the preconditioner before any pass uses it"
        return Whitening(self.per_checkpoint[checkpoint], side)
    def fit(self, data: "FitData") -> None:
        """Fit the whiteners of every checkpoint on ``data`` (:class:`FitData`). Statistics are summed in
        float64 (float32 on MPS) and over the ranks of an initialised process group.

        ``data.at_checkpoints()`` (the data read once) is used while the statistics of all checkpoints fit in
        ``data.budget_bytes`` together (checked as each group moves on from checkpoint 0, as a data-dependent
        branch can add layers); otherwise the data is read once per checkpoint with ``data.at_checkpoint(c)``,
        holding one checkpoint's statistics at a time."""
        checkpoints, device, dtype = data.checkpoints, data.device, data.dtype
        stats_dtype = torch.float32 if device.type == "mps" else torch.float64
        bar = tqdm(total=data.total * checkpoints, desc=f"K-FAC fit ({data.total} examples x {checkpoints} checkpoints)",
                   unit="pass", disable=not data.progress, leave=False)
        sums = [CovarianceSums(stats_dtype, device) for _ in range(checkpoints)]
        invariant: Optional[InvariantInputs] = InvariantInputs(sums, data.budget_bytes // 2)

        def add(c: int, first: int, batch: object) -> None:
            size, factors = data.raw_factors(first, batch)
            for name, pair in factors.items():
                if pair is not None:
                    shared = invariant is not None and invariant.matches(c, first, name, pair[0], pair[2])
                    sums[c].add(name, *pair[:4], inputs=not shared)
            if invariant is not None and c > 0:
                invariant.absent(c, first, factors)
            sums[c].count += size
            bar.update(size)

        fits = True
        for c, first, batch in data.at_checkpoints():
            if c == 1 and checkpoints * sums[0].nbytes() > data.budget_bytes:
                fits = False
                break
            add(c, first, batch)
        if fits:
            assert invariant is not None
            invariant.finish()
            fitted = fit_whiteners(sums, self.damping, device, dtype, self.rank)
        else:
            bar.reset()
            invariant, fitted = None, []
            for c in range(checkpoints):
                sums[c] = CovarianceSums(stats_dtype, device)
                for first, batch in data.at_checkpoint(c):
                    add(c, first, batch)
                fitted += fit_whiteners(sums[c:c + 1], self.damping, device, dtype, self.rank)
                sums[c].clear()
        bar.close()
        self.fit_examples = sums[-1].count
        self.per_checkpoint = fitted

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

from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import TracInError

Whiteners = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # layer -> (W_in [g, da, da], W_out [g, dd, dd])


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


def with_ones(A: torch.Tensor, ones: bool) -> torch.Tensor:
    """A [B, g, T, da] with the implicit bias column made explicit: [B, g, T, da + ones]."""
    return torch.cat([A, A.new_ones(*A.shape[:-1], 1)], dim=-1) if ones else A


class CovarianceSums:
    """Running sums of the two Kronecker factors per layer over the examples of a fit pass."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = device
        self.sums: Dict[str, List[torch.Tensor]] = {}
        self.count = 0

    def add(self, name: str, A: torch.Tensor, D: torch.Tensor, ones: bool) -> None:
        """One batch of one layer: A [B, g, T, da] (bias implicit when ``ones``), D [B, g, T, dd]."""
        a = with_ones(A, ones).to(self.dtype).transpose(0, 1).flatten(1, 2)  # [g, B*T, da]
        d = D.to(self.dtype).transpose(0, 1).flatten(1, 2)
        s_in, s_out = a.transpose(1, 2) @ a, d.transpose(1, 2) @ d
        if name in self.sums:
            self.sums[name][0] += s_in
            self.sums[name][1] += s_out
        else:
            self.sums[name] = [s_in, s_out]

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of an initialised process group (each saw its shard).
        The ranks first agree on the layers: one whose shard never reached a layer (a data-dependent
        branch) adds zeros for it, so every rank reduces the same tensors in the same order."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        shapes: List[Dict[str, List[Tuple[int, ...]]]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(shapes, {name: [tuple(t.shape) for t in pair] for name, pair in self.sums.items()})
        union = {name: pair for rank_shapes in shapes for name, pair in rank_shapes.items()}
        for name in sorted(union):
            if name not in self.sums:
                self.sums[name] = [torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in union[name]]
            for s in self.sums[name]:
                dist.all_reduce(s)
        count = torch.tensor([self.count], dtype=torch.float64, device=self.device)
        dist.all_reduce(count)
        self.count = int(count.item())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.sums.values() for t in pair)

    def whiteners(self, damping: float, device: torch.device, dtype: torch.dtype) -> Whiteners:
        """The whiteners of each layer's factors, from the statistics summed over every rank."""
        self.all_reduce()
        assert self.count > 0, "loaders refuse an empty training set before a fit starts"
        return {name: tuple(whitener(s / self.count, damping).to(device, dtype) for s in pair)  # type: ignore[misc]
                for name, pair in self.sums.items()}


def whitener(S: torch.Tensor, damping: float) -> torch.Tensor:
    """W [g, d, d] with W W^T = (S + l I)^-1, l = damping * mean eigenvalue of S [g, d, d] (per group);
    the identity for a group whose S is zero (its layer's factors are all zero, so are its scores)."""
    S = S.detach().to("cpu", torch.float64)
    S = (S + S.transpose(1, 2)) / 2
    values, vectors = torch.linalg.eigh(S)
    values = values.clamp_min(0)
    lam = damping * values.mean(dim=1, keepdim=True)
    zero = lam <= 0
    scale = torch.where(zero, torch.ones_like(values), (values + torch.where(zero, torch.ones_like(lam), lam)).rsqrt())
    W = vectors * scale.unsqueeze(1)
    eye = torch.eye(S.shape[-1], dtype=S.dtype).expand_as(W)
    return torch.where(zero.unsqueeze(-1), eye, W)


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
        """(batch size, {layer: (A, D, bias in scope) or None}) at the loaded checkpoint."""


class KFAC:
    """Per-checkpoint K-FAC preconditioner. The scheduler fits it (one extra forward and backward pass
    over the training data per checkpoint) and selects the loaded checkpoint's whiteners; layer
    handlers transform their factors with :meth:`apply`."""

    def __init__(self, damping: float = 0.1):
        """``damping``: validated by :class:`tracin.config.ScoringConfig`."""
        self.damping = float(damping)
        self.per_checkpoint: Optional[List[Whiteners]] = None
        self.current: Whiteners = {}
        self.fit_examples = 0

    @property
    def fitted(self) -> bool:
        return self.per_checkpoint is not None

    def describe(self) -> Dict[str, object]:
        return {"precondition": "kfac", "damping": self.damping, "fisher": "empirical", "fit_examples": self.fit_examples}

    def fit(self, data: "FitData") -> None:
        """Fit the whiteners of every checkpoint on ``data`` (:class:`FitData`). Statistics are summed in
        float64 (float32 on MPS) and over the ranks of an initialised process group.

        ``data.at_checkpoints()`` (the data read once) is used while the statistics of all checkpoints fit in
        ``data.budget_bytes`` together (checked as each group moves on from checkpoint 0, as a data-dependent
        branch can add layers); otherwise the data is read once per checkpoint with ``data.at_checkpoint(c)``,
        holding one checkpoint's statistics at a time."""
        checkpoints, device, dtype = data.checkpoints, data.device, data.dtype
        stats_dtype = torch.float32 if device.type == "mps" else torch.float64
        bar = tqdm(total=data.total * checkpoints, desc="K-FAC fit", unit="example", disable=not data.progress, leave=False)
        sums = [CovarianceSums(stats_dtype, device) for _ in range(checkpoints)]

        def add(c: int, first: int, batch: object) -> None:
            size, factors = data.raw_factors(first, batch)
            for name, pair in factors.items():
                if pair is not None:
                    sums[c].add(name, *pair)
            sums[c].count += size
            bar.update(size)

        fits = True
        for c, first, batch in data.at_checkpoints():
            if c == 1 and checkpoints * sums[0].nbytes() > data.budget_bytes:
                fits = False
                break
            add(c, first, batch)
        if fits:
            fitted = [s.whiteners(self.damping, device, dtype) for s in sums]
        else:
            bar.reset()
            fitted = []
            for c in range(checkpoints):
                sums[c] = CovarianceSums(stats_dtype, device)
                for first, batch in data.at_checkpoint(c):
                    add(c, first, batch)
                fitted.append(sums[c].whiteners(self.damping, device, dtype))
                sums[c].sums.clear()
        bar.close()
        self.fit_examples = sums[-1].count
        self.per_checkpoint = fitted

    def select(self, checkpoint: int) -> None:
        self.current = self.per_checkpoint[checkpoint] if self.per_checkpoint is not None else {}

    def apply(self, name: str, A: torch.Tensor, D: torch.Tensor, ones: bool) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """Whitened factors (A' [B, g, T, da + ones], D' [B, g, T, dd], no implicit bias) of one layer."""
        if name not in self.current:
            raise TracInError(f"Layer {name!r} never ran while K-FAC was fitted on the training data, so it has no "
                              "preconditioner; fit on data that reaches it (fit_preconditioner) or leave it out of layers.")
        W_in, W_out = self.current[name]
        A = torch.einsum("bgti,gij->bgtj", with_ones(A, ones), W_in.to(A.device, A.dtype))
        D = torch.einsum("bgti,gij->bgtj", D, W_out.to(D.device, D.dtype))
        return A, D, False

"""How a K-FAC preconditioner takes part in a scheduler's passes.

The fit reads the training data once per checkpoint (:class:`tracin.layers.precondition.KFAC` sums the factor
statistics; :class:`FitSource` hands it the raw factors). An influence pass that pairs test with training examples
needs P on one side only: the test side gets the whole inverse (``"query"``), the training side stays as it is
(``"key"``). Self-influence, normalised scores, cached test factors, gradient stores and whiteners of a kept rank
(``projection_dim`` under K-FAC) whiten both sides (``"both"``). Either way the influence pass's training factors are
the very ones the fit pass computed, kept here while they fit in a quarter of the memory budget, so the training
data is not run through the model a second time.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from torch.utils.data import DataLoader

from .blocks import FactorDict
from .loaders import dataset_size
from ..layers.base import LayerHandler, LayerRun
from ..layers.precondition import KFAC, Whitening
from ..tasks.base import Task


class FitRun(Protocol):
    """What the K-FAC part of a pass reads of the run it serves (the scheduler provides it)."""

    handlers: List[LayerHandler]
    checkpoints: list
    device: torch.device
    dtype: torch.dtype
    budget: int
    progress: bool
    task: Task
    loaded: Optional[int]  # the checkpoint the model holds

    def load(self, index: int) -> None:
        """Load checkpoint ``index`` into the model."""

    def numbered(self, loader: DataLoader, first: int = 0) -> Iterator[Tuple[int, object]]:
        """(index of the batch's first example, raw batch) over ``loader``."""

    def at_checkpoints(self, loader: DataLoader) -> Iterator[Tuple[int, int, object]]:
        """(checkpoint, first example index, raw batch) with that checkpoint loaded, the data read once."""

    def raw_factors(self, batch: object, first_index: int) -> FactorDict:
        """Untransformed (A, D, bias in scope, ...) per layer of a batch on the device, at the loaded checkpoint."""


class Preconditioning:
    """A run's K-FAC preconditioner in its passes: the fit, the fit pass's kept training factors, and which side of a
    pairing each kind of batch is on. ``run`` (a :class:`FitRun`) is the scheduler it serves."""

    def __init__(self, run: FitRun, kfac: KFAC):
        self.run, self.kfac = run, kfac
        self.sides: Dict[str, str] = {}  # what ("test" / "training") -> the side it is on (empty: both whitened)
        self.kept: Optional[Dict[Tuple[int, int], FactorDict]] = None  # (checkpoint, first example) -> raw fit factors
        self.kept_bytes = 0
        self.expected_examples = 0

    def fit(self, train: DataLoader, keep: bool) -> None:
        """Fit on ``train`` at every checkpoint; ``keep``: keep the pass's raw factors for the pass over the same
        training data that follows (:meth:`kept_factors`)."""
        self.kept, self.kept_bytes = ({} if keep else None), 0
        self.expected_examples = dataset_size(train) * len(self.run.checkpoints)  # factor rows a whole fit would keep
        self.kfac.fit(FitSource(self, train))

    def keep(self, checkpoint: int, first: int, raw: FactorDict) -> None:
        """Keep one fit batch's raw factors, or give up keeping once they pass a quarter of the budget (at the first
        batch already when the whole fit, at that batch's bytes per example, would pass it)."""
        if self.kept is None:
            return
        size = sum(t.numel() * t.element_size() for r in raw.values() if r is not None for t in r[:2])
        if not self.kept:  # the first batch: when the whole fit at its rate would not fit, give up before keeping any
            examples = next((r[0].shape[0] for r in raw.values() if r is not None), 1)
            if size * self.expected_examples / max(1, examples) > self.run.budget // 4:
                self.kept = None
                return
        self.kept_bytes += size
        if self.kept_bytes > self.run.budget // 4:
            self.kept = None
        else:
            self.kept[(checkpoint, first)] = raw

    @contextmanager
    def pairing(self, one_sided: bool) -> Iterator[None]:
        """Around an influence pass: the test side alone transformed (``one_sided``) or both; afterwards both sides
        again and the kept factors released."""
        self.sides = {"test": "query", "training": "key"} if one_sided else {}
        try:
            yield
        finally:
            self.sides, self.kept = {}, None

    def whitening(self, what: str, checkpoint: int) -> Whitening:
        """The whiteners of ``checkpoint`` for a batch of ``what`` (``"test"`` / ``"training"``) on its side."""
        return self.kfac.whitening(checkpoint, self.sides.get(what, "both"))

    def kept_factors(self, what: str, whitening: Whitening, where: Tuple[int, int], runs: Dict[str, LayerRun]) -> Optional[FactorDict]:
        """The kept factors of a training batch at ``where`` (checkpoint, first example) when the fit pass kept them,
        transformed with ``whitening`` as each layer's ``runs`` entry asks; else None (the batch must be run)."""
        kept = self.kept.get(where) if self.kept and what == "training" else None
        if kept is None:
            return None
        with torch.no_grad():
            return {h.name: None if kept.get(h.name) is None else h.transform(kept[h.name], runs[h.name], whitening)
                    for h in self.run.handlers if h.hooked}


class FitSource:
    """A run's training data as the K-FAC fit reads it (:class:`tracin.layers.precondition.FitData`)."""

    def __init__(self, owner: Preconditioning, train: DataLoader):
        run = owner.run
        self.owner, self.run, self.train = owner, run, train
        self.checkpoints, self.device, self.dtype = len(run.checkpoints), run.device, run.dtype
        self.budget_bytes, self.total, self.progress = run.budget // 4, dataset_size(train), run.progress

    def at_checkpoints(self) -> Iterator[Tuple[int, int, object]]:
        return self.run.at_checkpoints(self.train)

    def at_checkpoint(self, c: int) -> Iterator[Tuple[int, object]]:
        self.run.load(c)
        return self.run.numbered(self.train)

    def raw_factors(self, first: int, batch: object) -> Tuple[int, FactorDict]:
        run = self.run
        factors = run.raw_factors(run.task.to_device(batch, run.device), first)  # the bias column left implicit
        assert run.loaded is not None
        self.owner.keep(run.loaded, first, factors)
        return run.task.batch_size(batch), factors

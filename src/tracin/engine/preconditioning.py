"""How a K-FAC preconditioner takes part in a scheduler's passes.

The fit reads the training data once per checkpoint (:class:`tracin.layers.precondition.KFAC` sums the factor
statistics; :class:`FitSource` hands it the raw factors). An influence pass that pairs test with training examples
needs P on one side only: the test side gets the whole inverse (``"query"``), the training side stays as it is
(``"key"``), and its factors are the very ones the fit pass computed, kept here while they fit in a quarter of the
memory budget, so the training data is not run through the model a second time. Self-influence, normalised scores,
cached test factors and gradient stores whiten both sides (``"both"``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .blocks import FactorDict
from .capture import EXACT
from .loaders import dataset_size
from ..layers.precondition import KFAC, with_ones


class Preconditioning:
    """A scheduler's K-FAC preconditioner for one run: its fit, the fit pass's kept training factors, and which
    side of a pairing it transforms. ``run`` is the :class:`tracin.engine.scheduler.Scheduler` it serves."""

    def __init__(self, run, kfac: KFAC):
        self.run, self.kfac = run, kfac
        self.sides: Dict[str, str] = {}  # what ("test" / "training") -> the side it is on (empty: both whitened)
        self.kept: Optional[Dict[Tuple[int, int], FactorDict]] = None  # (checkpoint, first example) -> raw fit factors
        self.kept_bytes = 0
        self.expected_examples = 0

    def fit(self, train: DataLoader, keep: bool) -> bool:
        """Fit on ``train`` at every checkpoint; ``keep``: keep the pass's raw factors for a one-sided influence pass
        (:meth:`factors`). False when ``precondition="auto"`` met a layer K-FAC cannot cover: the run is plain."""
        if self.run.config.precondition == "auto" and not self._applies(train):
            return False
        self.kept, self.kept_bytes = ({} if keep else None), 0
        self.expected_examples = dataset_size(train) * len(self.run.checkpoints)  # factor rows a whole fit would keep
        self.kfac.fit(FitSource(self, train))
        return True

    def _applies(self, train: DataLoader) -> bool:
        """For ``precondition="auto"``: decide the exact layers first (on the first training batch; with K-FAC on they
        would be refused); when a layer needs exact per-example passes, which K-FAC does not cover, say so once."""
        runs = self.run.runs.values()
        for layer_run in runs:
            layer_run.preconditioner = None
        self.run._detect(train)
        exact = [name for name, layer_run in self.run.runs.items() if layer_run.mode == EXACT]
        if exact:
            warnings.warn(f"precondition='auto' scores plain TracIn: {exact[0]!r} needs exact per-example passes, which "
                          "K-FAC does not cover (precondition='none' says so up front; exclude= the layer to keep K-FAC).",
                          stacklevel=4)
            return False
        for layer_run in runs:
            layer_run.preconditioner = self.kfac
        return True

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

    def factors(self, what: str, checkpoint: int, first: int) -> Optional[FactorDict]:
        """Set the side ``what`` is on; return the kept factors of the batch at ``first`` when that side is the
        untransformed one and the fit pass kept them at this checkpoint, else None (the batch must be run)."""
        self.kfac.side = self.sides.get(what, "both")
        kept = self.kept.get((checkpoint, first)) if self.kept and self.kfac.side == "key" else None
        if kept is None:
            return None
        run = self.run
        with torch.no_grad():
            return {h.name: None if kept.get(h.name) is None else h.transform(kept[h.name], run.runs[h.name])
                    for h in run.handlers if h.hooked}


class FitSource:
    """A scheduler's training data as the K-FAC fit reads it (:class:`tracin.layers.precondition.FitData`)."""

    def __init__(self, owner: Preconditioning, train: DataLoader):
        run = owner.run
        self.owner, self.run, self.train = owner, run, train
        self.checkpoints, self.device, self.dtype = len(run.checkpoints), run.device, run.dtype
        self.budget_bytes, self.total, self.progress = run.budget // 4, dataset_size(train), run.progress

    def at_checkpoints(self) -> Iterator[Tuple[int, int, object]]:
        return self.run._at_checkpoints(self.train)

    def at_checkpoint(self, c: int) -> Iterator[Tuple[int, object]]:
        self.run._load(c)
        return self.run._numbered(self.train)

    def raw_factors(self, first: int, batch: object) -> Tuple[int, FactorDict]:
        run = self.run
        factors = run.capture.factors(run.model, run.task, run.task.to_device(batch, run.device), "training", first, raw=True)
        # the bias column made explicit once, for the statistics and for the kept copy alike (each would copy A)
        factors = {name: None if r is None else (with_ones(r[0], r[2]), r[1], False, *r[3:]) for name, r in factors.items()}
        self.owner.keep(run._loaded, first, factors)
        return run.task.batch_size(batch), factors

"""The scheduler: test factors cached per checkpoint, train examples streamed in tiles.

For each block of test examples ("test chunk", sized so its factors for every checkpoint fit in
half the memory budget) the test factors are computed once per checkpoint and kept. Training
examples then stream past in tiles (sized from the rest of the budget). For each tile, every
checkpoint is loaded once and applied to all of the tile's batches, and the tile's scores
(summed over checkpoints, each weighted by its learning rate) are handed to the accumulators —
so top-k lists are exact top-k of the checkpoint-summed TracIn score. Passes over the training
data alone (self-influence, gradient stores, the K-FAC fit) also read it once: each group of raw
batches sees every checkpoint in turn. The test side lives in :mod:`tracin.engine.chunks`, the training side
(groups read once for every checkpoint, tiles) in :mod:`tracin.engine.training`, the K-FAC preconditioner's part
in the passes in :mod:`tracin.engine.preconditioning`.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .capture import EXACT, BatchCapture
from . import chunks, training
from .preconditioning import Preconditioning
from ..checkpoints import Checkpoint, weights_for
from .loaders import dataset_size, numbered_batches
from .resume import ProgressHook
from ..config import ScoringConfig
from ..device import default_memory_budget, set_float32_math
from ..errors import TracInError
from .blocks import FactorDict, batch_bytes, factor_bytes
from ..layers.base import LayerHandler, LayerRun
from ..layers.factors import DEFAULT_MAX_ELEMENTS
from ..layers.precondition import KFAC
from ..layers.projection import Projector
from ..tasks.base import Task

TileSink = Callable[[slice, torch.Tensor, int], None]  # (test rows, scores [m, n_tile], first train index)


# precision name -> (autocast dtype, float32 math for tracin.device.set_float32_math)
PRECISION_MODES: Dict[str, Tuple[Optional[torch.dtype], Optional[str]]] = {
    "fp32": (None, "ieee"), "tf32": (None, "tf32"), "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None)}


@dataclass
class Target:
    """What a run scores: the model, its checkpoints, the layer handlers in scope, the task and the device."""

    model: nn.Module
    checkpoints: List[Checkpoint]
    handlers: List[LayerHandler]
    task: Task
    device: torch.device
    measurement: Optional[Task] = None  # what the test examples' gradients are of (None: the task's loss)


@dataclass
class Transforms:
    """The factor transforms of a run: a projector and a K-FAC preconditioner (each optional), and the
    kernels of a previous run to repeat (layer name -> mode; e.g. for cached test factors)."""

    projector: Optional[Projector] = None
    preconditioner: Optional[KFAC] = None
    modes: Dict[str, Optional[str]] = field(default_factory=dict)


class Scheduler:
    """Runs TracIn passes over a model prepared for scoring; use as a context manager.

    On entry the model is moved to the device, put in eval mode, its out-of-scope parameters are
    frozen (so no autograd graph is built for them), hooks are installed and float32 math is set as
    ``config.precision`` asks (full float32 for exact scores: no TF32); on exit all of that is undone and
    the model's original weights are restored.
    """

    def __init__(self, target: Target, config: ScoringConfig, transforms: Optional[Transforms] = None):
        self.model, self.task, self.device = target.model, target.task, target.device
        self.measurement = target.measurement
        self.checkpoints = list(target.checkpoints)
        self.handlers = list(target.handlers)
        self.config = config
        self.transforms = transforms or Transforms()
        self.budget = default_memory_budget(self.device, config.memory_budget)
        self.progress = config.progress
        self.normalize = config.normalize  # "none" | "cosine" (both gradients unit length) | "train" (train gradient unit length)
        self.precision, self.float32_math = PRECISION_MODES[config.precision]
        self.preconditioner = self.transforms.preconditioner  # fitted by fit_preconditioner
        self.stats: Dict[str, object] = {"checkpoint_loads": 0, "tiles": 0, "test_chunks": 0}
        self.plan: Dict[str, int] = {}  # chunk_examples and tile_limit in use; preset to repeat a run's tiling
        self._max_elements = max(2**16, min(DEFAULT_MAX_ELEMENTS, self.budget // 16))
        self.preconditioning = Preconditioning(self, self.preconditioner) if self.preconditioner is not None else None

    def _layer_runs(self) -> Dict[str, LayerRun]:
        """Each handler's settings for this run: the forced or repeated kernel, and the transforms."""
        kernel, t = self.config.kernel, self.transforms
        runs = {}
        for h in self.handlers:
            mode = t.modes.get(h.name) or (kernel if kernel != "auto" and kernel in h.modes else None)
            mode = EXACT if h.modes == (EXACT,) else mode
            runs[h.name] = LayerRun(mode=mode, projector=t.projector, preconditioner=t.preconditioner)
        return runs

    # -- model preparation -------------------------------------------------------------------
    def __enter__(self) -> "Scheduler":
        model = self.model
        self._weights = self._device_weights()  # validates every checkpoint before the model is touched
        self._was_training = model.training
        first = next(model.parameters(), None)
        self._home = first.device if first is not None else torch.device("cpu")
        self._original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        in_scope = {id(p) for h in self.handlers for p in h.parameters()}
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(id(p) in in_scope)
        model.to(self.device).eval()
        self.dtype = self.handlers[0].parameters()[0].dtype
        self.runs = self._layer_runs()
        self.loaded: Optional[int] = None  # the checkpoint whose weights the model holds
        self.detect_source: Optional[DataLoader] = None  # the training data the exact layers are decided on
        self.capture = BatchCapture(self.handlers, self.runs, self.precision)
        self._restore_math = set_float32_math(self.float32_math)
        return self

    def __exit__(self, *exc) -> None:
        self._restore_math()
        self.capture.remove()
        self.model.load_state_dict(self._original)
        self.model.to(self._home)
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self.model.train(self._was_training)
        self.stats["layer_modes"] = self.modes()

    def modes(self) -> Dict[str, Optional[str]]:
        """The kernel each layer used in this run (None for a layer no batch reached yet)."""
        return {name: run.mode for name, run in self.runs.items()}

    def _device_weights(self) -> List[Dict[str, torch.Tensor]]:
        """Every checkpoint's weights, checked against the model up front, kept on the device
        when they fit in a quarter of the budget."""
        weights = [weights_for(self.model, c) for c in self.checkpoints]
        if self.device.type == "cpu" or sum(batch_bytes(w) for w in weights) > self.budget // 4:
            return weights
        return [{k: v.to(self.device) for k, v in w.items()} for w in weights]

    def load(self, index: int) -> None:
        self.model.load_state_dict(self._weights[index], strict=True)
        self.loaded = index
        with torch.no_grad():
            self.task.on_checkpoint(self.model, index)
        self.stats["checkpoint_loads"] = int(self.stats["checkpoint_loads"]) + 1  # type: ignore[arg-type]

    def detect(self, loader: Optional[DataLoader] = None, batch=None) -> None:
        """Decide the exact layers at the first checkpoint, before any factors are kept (:meth:`BatchCapture.detect`),
        on the first batch of ``loader`` (the training data: its batches hold several examples even when a test set
        holds one) when one is given, else on ``batch``."""
        if self.capture.checked:
            return
        if loader is not None:
            batch = next(iter(loader), batch)
        if batch is not None:
            if self.loaded != 0:
                self.load(0)
            self.capture.detect(self.model, self.task, self.task.to_device(batch, self.device))

    def factors(self, batch, what: str, first_index: int) -> FactorDict:
        """Factors of a batch (on the device) at the loaded checkpoint: of the task's loss for training examples, of
        the measurement for test examples; preconditioned as the batch's side of a pairing asks."""
        task = self.measurement if what == "test" and self.measurement is not None else self.task
        whitening = None
        if self.preconditioning is not None:
            assert self.loaded is not None
            whitening = self.preconditioning.whitening(what, self.loaded)
            kept = self.preconditioning.kept_factors(what, whitening, (self.loaded, first_index), self.runs)
            if kept is not None:  # the fit pass computed this batch's raw factors at this checkpoint already
                return kept
        return self.capture.factors(self.model, task, batch, what, first_index, whitening=whitening)

    def raw_factors(self, batch, first_index: int) -> FactorDict:
        """Each layer's untransformed (A, D, bias in scope, ...) for a training batch (on the device) at the loaded
        checkpoint, as a preconditioner is fitted on."""
        return self.capture.factors(self.model, self.task, batch, "training", first_index, raw=True)

    def fit_preconditioner(self, train: DataLoader, keep: bool = False) -> None:
        """Fit the K-FAC preconditioner on ``train`` at every checkpoint (one forward and backward pass
        each; the data read once when every checkpoint's statistics fit in a quarter of the budget).

        ``keep``: also keep the fit pass's raw training factors while they fit in a quarter of the budget, so the
        next :meth:`influence` pairs them (on the unwhitened side) instead of running that pass again."""
        assert self.preconditioning is not None
        self.preconditioning.fit(train, keep)

    def one_sided(self, with_self: bool, cached: bool) -> bool:
        """Whether an influence pass applies the preconditioner to the test side only, pairing the fit pass's own
        training factors: not with self-influence, normalised scores, cached test factors, or whiteners of a kept rank
        (both sides whitened: a rank's whitened factors are narrower than the raw ones)."""
        if self.preconditioner is None or self.preconditioner.rank is not None:
            return False
        return not (with_self or cached) and self.normalize == "none"

    # -- kernels over blocks -----------------------------------------------------------------
    def pair(self, test: FactorDict, train: FactorDict) -> Optional[torch.Tensor]:
        total = None
        for name, t in test.items():
            r = train.get(name)
            if t is None or r is None:
                continue
            s = t.pair_scores(r, self._max_elements)  # type: ignore[arg-type]
            total = s if total is None else total.add_(s)
        return total

    def self_scores(self, train: FactorDict, size: int) -> torch.Tensor:
        total = torch.zeros(size, device=self.device, dtype=self.dtype)
        for f in train.values():
            if f is not None:
                total += f.self_scores(self._max_elements)
        return total

    def norms(self, squared: torch.Tensor) -> torch.Tensor:
        """Gradient norms from squared norms, kept away from zero."""
        return squared.clamp_min(torch.finfo(self.dtype).tiny).sqrt()

    # -- passes --------------------------------------------------------------------------------
    def test_chunks(self, test: DataLoader, skip: Optional[Callable[[int], bool]] = None) -> Iterator[Tuple[slice, Optional[list]]]:
        """(rows, cache) for each chunk of the test set, reading ``test`` once (:func:`tracin.engine.chunks.test_chunks`)."""
        return chunks.test_chunks(self, test, skip)

    def cache_test(self, test: DataLoader) -> List[Tuple[slice, list]]:
        """Every test chunk's factors for every checkpoint, computed now (for reuse across calls)."""
        return [(rows, cache) for rows, cache in self.test_chunks(test)]  # type: ignore[misc]

    def influence(
        self,
        train: DataLoader,
        test: Optional[DataLoader],
        sink: TileSink,
        with_self: bool = False,
        cached: Optional[List[Tuple[slice, list]]] = None,
        hook: Optional[ProgressHook] = None,
        initial_self: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """Stream ``train`` against ``test`` (or against ``cached`` test factors from :meth:`cache_test`);
        ``sink`` receives each tile's checkpoint-summed scores. Returns self-influence [n_train] when ``with_self``.

        ``hook`` (a :class:`tracin.engine.resume.ProgressHook`, e.g. a ResumeState) is told after every tile and chunk, and says which
        chunks and tiles a resumed run has already finished; ``initial_self`` is the partial self-influence
        of a resumed run."""
        start = time.perf_counter()
        self.detect_source = train  # decided at the probe, which loads the first checkpoint anyway
        if cached is not None:
            self.detect(train)
        n_train = dataset_size(train)
        C = len(self.checkpoints)
        skip = hook.chunk_finished if hook is not None else None
        stream = iter(cached) if cached is not None else self.test_chunks(test, skip)  # type: ignore[arg-type]
        self_scores = None
        if with_self:
            self_scores = initial_self.to(self.device) if initial_self is not None else torch.zeros(n_train, device=self.device, dtype=self.dtype)
        n_test_total = sum(rows.stop - rows.start for rows, _ in cached) if cached is not None else dataset_size(test)  # type: ignore[arg-type]
        bar = tqdm(total=n_train * C * n_test_total, desc="TracIn train stream", unit="pair", unit_scale=True,
                   disable=not self.progress, leave=False)
        self.stats["test_chunks"] = 0
        one_sided = self.one_sided(with_self, cached is not None)
        with self.preconditioning.pairing(one_sided) if self.preconditioning is not None else nullcontext():
            n_test = self._stream(stream, train, sink, self_scores, hook, bar)
        bar.close()
        self.stats["seconds"] = time.perf_counter() - start
        self.stats["n_train"], self.stats["n_test"] = n_train, n_test
        return self_scores

    def _stream(self, stream, train: DataLoader, sink: TileSink, self_scores: Optional[torch.Tensor],
                hook: Optional[ProgressHook], bar) -> int:
        """The body of :meth:`influence`: every test chunk against the training tiles; returns the test examples seen.
        (A test chunk's factors are computed as the chunk is reached, so the preconditioner's sides hold throughout.)"""
        n_train, C, n_test = dataset_size(train), len(self.checkpoints), 0
        for chunk_index, (rows, cache) in enumerate(stream):
            m = rows.stop - rows.start
            n_test += m
            self.stats["test_chunks"] = chunk_index + 1
            if cache is None or (hook is not None and hook.chunk_finished(rows.start)):
                bar.update(n_train * C * m)
                continue
            cache_bytes = sum(factor_bytes(f) for blocks, _ in cache for _, f in blocks)
            want_self = self_scores if chunk_index == 0 else None
            done_until = hook.next_train(rows) if hook is not None else 0
            for tile in training.tiles(self, train, m, cache_bytes, skip_until=done_until):
                tile_first, n_tile = self._span(tile)
                if tile_first + n_tile <= done_until:  # committed by the interrupted run
                    bar.update(n_tile * C * m)
                    continue
                for part, scores, self_part in self._scored_parts(tile, cache, m, want_self is not None):
                    part_first = part[0][0]
                    if want_self is not None:
                        want_self[part_first:part_first + self_part.shape[0]] += self_part
                    sink(rows, scores, part_first)
                    bar.update(scores.shape[1] * C * m)
                    self.stats["tiles"] = int(self.stats["tiles"]) + 1  # type: ignore[arg-type]
                    if hook is not None:
                        hook.tile_done(rows, part_first + scores.shape[1], want_self, dict(self.plan))
            if hook is not None:
                hook.chunk_done(rows)
        return n_test

    def _score_tile(self, tile: List[Tuple[int, object]], cache: list, m: int, with_self: bool):
        """Checkpoint-summed scores [m, n_tile] of one tile, and its self-influence [n_tile] (or None)."""
        tile_first, n_tile = self._span(tile)
        scores = torch.zeros(m, n_tile, device=self.device, dtype=self.dtype)
        selfs = torch.zeros(n_tile, device=self.device, dtype=self.dtype) if with_self else None
        for c, ckpt in enumerate(self.checkpoints):
            self.load(c)
            lr = float(ckpt.learning_rate)  # type: ignore[arg-type]
            blocks, test_norms = cache[c]
            for first, batch in tile:
                factors = self.factors(batch, "training", first)
                b = self.task.batch_size(batch)
                cols = slice(first - tile_first, first - tile_first + b)
                sq = self.self_scores(factors, b) if selfs is not None or self.normalize != "none" else None
                train_norms = self.norms(sq) if self.normalize != "none" else None
                for offset, block in blocks:
                    s = self.pair(block, factors)
                    if s is not None:
                        if train_norms is not None:
                            s = s / train_norms
                        if test_norms is not None:
                            s = s / test_norms[offset:offset + s.shape[0], None]
                        scores[offset:offset + s.shape[0], cols].add_(s, alpha=lr)
                if selfs is not None:
                    selfs[cols].add_(sq, alpha=lr)
        return scores, selfs

    def _scored_parts(self, tile: List[Tuple[int, object]], cache: list, m: int, with_self: bool):
        """[(tile part, scores, self-influence)]: the whole tile, or, after a CUDA out-of-memory error,
        its halves (recursively; later tiles use the smaller size too)."""
        try:
            return [(tile, *self._score_tile(tile, cache, m, with_self))]
        except torch.cuda.OutOfMemoryError:
            n = self._span(tile)[1]
            if len(tile) == 1:
                raise TracInError(
                    f"The device ran out of memory on a single batch of {n} examples; lower --batch_size (batch_size=)."
                ) from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(tile) // 2
            self.plan["tile_limit"] = self._span(tile[:half])[1]
            warnings.warn(f"CUDA out of memory on a tile of {n} training examples; halving it to {self.plan['tile_limit']} and going on.",
                          stacklevel=2)
            return self._scored_parts(tile[:half], cache, m, with_self) + self._scored_parts(tile[half:], cache, m, with_self)

    def self_influence(self, train: DataLoader) -> torch.Tensor:
        """TracIn(z, z) for every training example, [n_train]; the data read once (:func:`tracin.engine.training.at_checkpoints`)."""
        start = time.perf_counter()
        n_train = dataset_size(train)
        out = torch.zeros(n_train, device=self.device, dtype=self.dtype)
        bar = tqdm(total=n_train * len(self.checkpoints), desc="TracIn self-influence", unit="ex", disable=not self.progress, leave=False)
        for c, first, batch in self.at_checkpoints(train):
            self.detect(batch=batch)  # at the first batch, with the first checkpoint loaded
            b = self.task.batch_size(batch)
            factors = self.factors(self.task.to_device(batch, self.device), "training", first)
            out[first:first + b].add_(self.self_scores(factors, b), alpha=float(self.checkpoints[c].learning_rate))  # type: ignore[arg-type]
            bar.update(b)
        bar.close()
        self.stats["seconds"] = time.perf_counter() - start
        return out

    def vectors(self, loader: DataLoader, what: str, write: Callable[[int, int, torch.Tensor], None]) -> int:
        """Per-example gradient vectors (projected when a projector is set), the data read once
        (:func:`tracin.engine.training.at_checkpoints`): ``write(checkpoint index, first example index, vectors [B, D])``. Returns D."""
        dim = 0
        bar = tqdm(total=dataset_size(loader) * len(self.checkpoints), desc=f"{what} gradients", unit="ex",
                   disable=not self.progress, leave=False)
        for c, first, batch in self.at_checkpoints(loader):
            self.detect(batch=batch)
            factors = self.factors(self.task.to_device(batch, self.device), what, first)
            vec = torch.cat([f.to_vector() for f in factors.values() if f is not None], dim=1)
            dim = vec.shape[1]
            write(c, first, vec)
            bar.update(self.task.batch_size(batch))
        bar.close()
        return dim

    # -- iteration helpers ---------------------------------------------------------------------
    def _span(self, tile: List[Tuple[int, object]]) -> Tuple[int, int]:
        """(index of the tile's first training example, number of examples in the tile)."""
        return tile[0][0], tile[-1][0] + self.task.batch_size(tile[-1][1]) - tile[0][0]

    def numbered(self, loader: DataLoader, first: int = 0):
        """(index of the batch's first example, batch) for each batch (:func:`numbered_batches`)."""
        return numbered_batches(loader, self.task.batch_size, first)

    def at_checkpoints(self, loader: DataLoader) -> Iterator[Tuple[int, int, object]]:
        """(checkpoint index, first example index, raw batch) for every batch at every checkpoint, the data read once
        (:func:`tracin.engine.training.at_checkpoints`)."""
        return training.at_checkpoints(self, loader)

"""The TracIn facade: the public entry point of the library."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .accumulate import MatrixAccumulator, TopKAccumulator
from .checkpoints import Checkpoint
from .data import DataSource, dataset_size, make_loader
from .device import default_memory_budget, resolve_device
from .engine import Scheduler
from .errors import TracInError
from .results import InfluenceResult, TopK
from .scope import LayerSpec, resolve_layers
from .tasks import Task, as_task

KERNELS = ("auto", "ghost", "materialize")


class TracIn:
    """TracInCP influence of training examples on test examples.

    ``TracIn(z, z') = sum_c lr_c * <grad loss(z; theta_c), grad loss(z'; theta_c)>`` over the
    checkpoints, restricted to the parameters of the selected layers. Positive scores mark
    proponents (the training example helped), negative ones opponents (it hurt).

    Args:
        model: the network; its weights are replaced by each checkpoint's while scoring and restored afterwards.
            It is scored in eval mode (dropout off, batch norm on its running statistics).
        checkpoints: :class:`Checkpoint` objects, or a directory to :meth:`Checkpoint.discover`.
        layers: ``"all"``, ``"last"``, an int N (the last N parameterised modules) or module names / glob patterns.
        task: a :class:`Task` or a callable ``(model, batch) -> Tensor[B]`` of per-example losses;
            None means classification with cross-entropy on ``(inputs, labels)`` batches.
        device: ``"auto"`` (cuda, then mps, then cpu), or any torch device.
        batch_size: examples per forward/backward pass.
        memory_budget: bytes of working memory for cached test factors and score tiles; by default
            half the device's free memory (a quarter of free host memory on cpu).
        progress: show tqdm progress bars.
        kernel: ``"auto"`` picks ghost or materialised per Linear/Conv layer from its shapes;
            ``"ghost"`` / ``"materialize"`` force one (both are exact).
        num_workers: DataLoader worker processes for Dataset inputs (0: load in the main process).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Union[Sequence[Checkpoint], str, "os.PathLike[str]"],
        layers: LayerSpec = "all",
        task: Union[Task, Callable, None] = None,
        device: Union[str, torch.device] = "auto",
        batch_size: int = 256,
        memory_budget: Optional[int] = None,
        progress: bool = True,
        kernel: str = "auto",
        num_workers: int = 0,
    ):
        if isinstance(checkpoints, (str, Path, os.PathLike)):
            checkpoints = Checkpoint.discover(checkpoints)
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise TracInError("No checkpoints were given; pass at least one Checkpoint.")
        if not all(isinstance(c, Checkpoint) for c in checkpoints):
            raise TracInError("checkpoints must be Checkpoint objects (or a directory of checkpoint files).")
        if batch_size < 1:
            raise TracInError(f"batch_size must be at least 1, got {batch_size}.")
        if kernel not in KERNELS:
            raise TracInError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}.")
        self.model = model
        self.checkpoints: List[Checkpoint] = checkpoints
        self.task = as_task(task)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.memory_budget = default_memory_budget(self.device, memory_budget)
        self.progress = progress
        self.kernel = kernel
        self.num_workers = num_workers
        self.handlers = resolve_layers(model, layers)
        self.last_stats: Dict[str, object] = {}

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """Number of parameters in scope."""
        return sum(h.num_params for h in self.handlers)

    def scope(self) -> List[Dict[str, object]]:
        """One row per module in scope: name, type, parameter count, kernel used by the last run."""
        return [
            {"name": h.name, "type": type(h.module).__name__, "params": h.num_params, "kernel": h.mode}
            for h in self.handlers
        ]

    # -- scoring ---------------------------------------------------------------------------------
    def _scheduler(self) -> Scheduler:
        return Scheduler(self.model, self.checkpoints, self.handlers, self.task, self.device,
                         self.memory_budget, progress=self.progress, kernel=self.kernel)

    def influence(
        self,
        train_dataset: DataSource,
        test_dataset: DataSource,
        top_k: int = 100,
        self_influence: bool = False,
    ) -> InfluenceResult:
        """Exact top-k proponents and opponents of every test example.

        Returns an :class:`InfluenceResult` whose ``proponents`` / ``opponents`` hold
        [n_test, k] values and train indices (proponents largest first, opponents most negative
        first). With ``self_influence=True`` the same pass also fills ``result.self_influence`` [n_train].
        """
        train = make_loader(train_dataset, self.batch_size, "training", self.num_workers)
        test = make_loader(test_dataset, self.batch_size, "test", self.num_workers)
        n_train, n_test = dataset_size(train), dataset_size(test)
        if not isinstance(top_k, int) or top_k < 1:
            raise TracInError(f"top_k must be a positive integer, got {top_k!r}.")
        if top_k > n_train:
            raise TracInError(f"top_k={top_k} is larger than the training set ({n_train} examples); use top_k <= {n_train}.")
        parts: Dict[int, TopKAccumulator] = {}

        def sink(rows: slice, scores: torch.Tensor, first: int) -> None:
            if rows.start not in parts:
                parts[rows.start] = TopKAccumulator(scores.shape[0], top_k, scores.device, scores.dtype)
            parts[rows.start].update(scores, first)

        with self._scheduler() as run:
            selfs = run.influence(train, test, sink, with_self=self_influence)
        self.last_stats = dict(run.stats)
        pieces = [parts[start].result() for start in sorted(parts)]
        pv, pi, nv, ni = (torch.cat([p[i] for p in pieces]).cpu() for i in range(4))
        assert pv.shape[0] == n_test
        return InfluenceResult(
            proponents=TopK(pv, pi),
            opponents=TopK(nv, ni),
            self_influence=selfs.cpu() if selfs is not None else None,
            stats=self.last_stats,
        )

    def influence_matrix(self, train_dataset: DataSource, test_dataset: DataSource) -> torch.Tensor:
        """The full TracIn matrix [n_test, n_train] (on the CPU). Holds n_test * n_train numbers: use
        :meth:`influence` for top-k on large sets."""
        train = make_loader(train_dataset, self.batch_size, "training", self.num_workers)
        test = make_loader(test_dataset, self.batch_size, "test", self.num_workers)
        acc: Optional[MatrixAccumulator] = None

        def sink(rows: slice, scores: torch.Tensor, first: int) -> None:
            nonlocal acc
            if acc is None:
                acc = MatrixAccumulator(dataset_size(test), dataset_size(train), scores.dtype)
            acc.update(rows, scores, first)

        with self._scheduler() as run:
            run.influence(train, test, sink)
        self.last_stats = dict(run.stats)
        assert acc is not None
        return acc.matrix

    def self_influence(self, train_dataset: DataSource) -> torch.Tensor:
        """TracIn(z, z) for every training example, [n_train] (on the CPU). High values flag
        surprising examples — mislabelled ones rank near the top."""
        train = make_loader(train_dataset, self.batch_size, "training", self.num_workers)
        with self._scheduler() as run:
            out = run.self_influence(train)
        self.last_stats = dict(run.stats)
        return out.cpu()

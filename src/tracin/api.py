"""The TracIn facade: the public entry point of the library."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .accumulate import DiskMatrix, MatrixAccumulator, TopKAccumulator
from .checkpoints import Checkpoint
from .data import DataSource, dataset_size, make_loader
from .device import default_memory_budget, resolve_device
from .engine import Scheduler
from .errors import TracInError
from .results import InfluenceResult, TopK
from .precondition import KFAC, check_precondition
from .projection import Projector
from .distributed import all_gather, merge_topk, rank_and_world
from .resume import ResumeState
from .sampling import TrainPlan, plan_training
from .scope import LayerSpec, resolve_layers
from .stored import StoreWriter, describe, open_store
from .tasks import Task, as_task

KERNELS = ("auto", "ghost", "materialize")
NORMALIZE = ("none", "cosine", "train")
# precision name -> (autocast dtype, float32 math: tracin.device.set_float32_math)
PRECISIONS = {"fp32": (None, "ieee"), "tf32": (None, "tf32"), "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None)}


class TracIn:
    """TracInCP influence of training examples on test examples.

    ``TracIn(z, z') = sum_c lr_c * <grad loss(z; theta_c), grad loss(z'; theta_c)>`` over the
    checkpoints, restricted to the parameters of the selected layers. Positive scores mark
    proponents (the training example helped), negative ones opponents (it hurt).

    Args:
        model: the network; its weights are replaced by each checkpoint's while scoring and restored afterwards.
            It is scored in eval mode (dropout off, batch norm on its running statistics).
        checkpoints: :class:`Checkpoint` objects, or a directory to :meth:`Checkpoint.discover`.
        layers: ``"all"``, ``"last"``, ``"output_bias"`` (the last module's bias alone), an int N (the last
            N parameterised modules), or module or parameter names / glob patterns (``"fc"``, ``"fc.bias"``).
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
        projection_dim: project per-example gradients to about this many dimensions per layer
            (an unbiased approximation; None: exact). See :mod:`tracin.projection`.
        projection: ``"gaussian"``, ``"rademacher"`` or ``"sparse"``.
        seed: seed of the projection matrices and of training-set sampling.
        sample_rate: score a seeded random fraction of the training set (None: all). Indices stay
            positions in the full training set; left-out examples are NaN in full-length outputs.
        stratify_by: a key the task provides (``"label"``; ``"relation"``/``"head"``/``"tail"`` for
            knowledge graphs; see ``Task.strata``) or a callable ``batch -> Tensor[B]`` of keys, to
            sample each stratum at ``sample_rate``.
        normalize: ``"none"`` (TracIn), ``"cosine"`` (each gradient scaled to unit length per checkpoint)
            or ``"train"`` (the training gradient scaled to unit length): variants that stop large-gradient
            training examples from dominating every list; exact under every kernel (norms come from the
            same factors). Self-influence is never normalised.
        precision: ``"fp32"`` (exact: TensorFloat-32 is turned off while scoring, also where the process
            allows it), ``"tf32"`` (float32 matmuls and convolutions on TensorFloat-32 tensor cores of NVIDIA
            Ampere or newer GPUs; the same as fp32 elsewhere), or ``"bf16"`` / ``"fp16"``: forward and backward
            under autocast; bf16 runs the kernels in bf16, fp16 scales each example's loss for the backward pass
            and keeps the kernels in fp32; scores are summed in fp32. All but fp32 are approximate; see
            docs/scale.md for their accuracy and speed (fp16 can lose well-fit examples' tiny gradients).
        precondition: ``"none"`` (TracIn's plain inner product) or ``"kfac"``: g^T P g' with P a Kronecker-factored
            inverse of each layer's empirical Fisher, fitted on the training data at every checkpoint (one extra
            pass each; :meth:`fit_preconditioner`); exact for that P under every kernel. Linear and Conv layers only.
            It keeps self-influence from growing with the size of a layer's inputs (docs/quality.md).
        damping: K-FAC damping, a fraction of each factor's mean eigenvalue (Kronfluence's heuristic is 0.1).
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
        projection_dim: Optional[int] = None,
        projection: str = "gaussian",
        seed: int = 0,
        sample_rate: Optional[float] = None,
        stratify_by: Union[str, Callable, None] = None,
        precision: str = "fp32",
        normalize: str = "none",
        precondition: str = "none",
        damping: float = 0.1,
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
        if num_workers < 0:
            raise TracInError(f"num_workers must be 0 (load in this process) or more, got {num_workers}.")
        if kernel not in KERNELS:
            raise TracInError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}.")
        self.model = model
        self.checkpoints: List[Checkpoint] = checkpoints
        self.task = as_task(task)
        rank, world = rank_and_world()
        if world > 1 and device == "auto" and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank % torch.cuda.device_count()))}"
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.memory_budget = default_memory_budget(self.device, memory_budget)
        self.progress = progress
        self.kernel = kernel
        self.num_workers = num_workers
        self.projector = Projector(projection_dim, projection, seed) if projection_dim is not None else None
        self.seed = seed
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise TracInError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if stratify_by is not None and not isinstance(stratify_by, str) and not callable(stratify_by):
            raise TracInError(f"stratify_by must be a key the task provides (e.g. 'label') or a callable batch -> keys, got {stratify_by!r}.")
        if precision not in PRECISIONS:
            raise TracInError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}.")
        self.precision_name = precision
        self.precision, self.float32_math = PRECISIONS[precision]
        if normalize not in NORMALIZE:
            raise TracInError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZE)}.")
        self.normalize = normalize
        self.sample_rate = sample_rate
        self.stratify_by = stratify_by
        self.handlers = resolve_layers(model, layers)
        check_precondition(precondition, self.handlers)
        self.preconditioner = KFAC(damping) if precondition == "kfac" else None
        self.last_stats: Dict[str, object] = {}
        self._cached_test: Optional[Tuple[object, list, Dict[str, Optional[str]]]] = None

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """Number of parameters in scope."""
        return sum(h.num_params for h in self.handlers)

    def scope(self) -> List[Dict[str, object]]:
        """One row per module in scope: name, type, parameter count, kernel used by the last run, the
        parameters in scope, and whether they are all of the module's trainable ones."""
        return [
            {"name": h.name, "type": type(h.module).__name__, "params": h.num_params, "kernel": h.mode,
             "parameters": list(h.param_names),
             "whole": set(h.param_names) == {n for n, p in h.module.named_parameters(recurse=False) if p.requires_grad}}
            for h in self.handlers
        ]

    # -- scoring ---------------------------------------------------------------------------------
    def _scheduler(self, vectors: bool = False) -> Scheduler:
        """A scheduler for this configuration; ``vectors``: per-example vectors are materialised (stores)."""
        projector = self.projector.for_vectors() if vectors and self.projector is not None else self.projector
        return Scheduler(self.model, self.checkpoints, self.handlers, self.task, self.device,
                         self.memory_budget, progress=self.progress, kernel=self.kernel, projector=projector,
                         precision=self.precision, normalize=self.normalize, preconditioner=self.preconditioner,
                         float32_math=self.float32_math)

    def _fitted(self, run: Scheduler, train_loader=None) -> None:
        """Fit the preconditioner on ``train_loader`` unless it is fitted (or none is used)."""
        if self.preconditioner is None or self.preconditioner.fitted:
            return
        if train_loader is None:
            raise TracInError("precondition='kfac' needs its preconditioner fitted on training data first; call "
                              "fit_preconditioner(train_dataset) (or score a training set with this object) before this.")
        run.fit_preconditioner(train_loader)

    def fit_preconditioner(self, train_dataset: DataSource) -> None:
        """Fit (or refit) the K-FAC preconditioner on ``train_dataset`` at every checkpoint. Scoring methods
        that receive a training set fit it on that set when it is not fitted yet; fit explicitly to use
        other data, or before :meth:`cache_test` / :meth:`influence_from_saved`."""
        if self.preconditioner is None:
            raise TracInError("fit_preconditioner needs precondition='kfac'.")
        self.preconditioner.per_checkpoint = None
        with self._scheduler() as run:
            self._fitted(run, self._plan(train_dataset).loader)

    def _plan(self, train_dataset: DataSource) -> TrainPlan:
        return plan_training(train_dataset, self.batch_size, self.num_workers, self.task, self.sample_rate,
                             self.stratify_by, self.seed)

    def influence(
        self,
        train_dataset: DataSource,
        test_dataset: DataSource,
        top_k: int = 100,
        self_influence: bool = False,
        matrix_path: Union[str, Path, None] = None,
        resume_dir: Union[str, Path, None] = None,
        resume_key: Optional[Dict[str, object]] = None,
    ) -> InfluenceResult:
        """Exact top-k proponents and opponents of every test example.

        Returns an :class:`InfluenceResult` whose ``proponents`` / ``opponents`` hold
        [n_test, k] values and train indices (proponents largest first, opponents most negative
        first). With ``self_influence=True`` the same pass also fills ``result.self_influence`` [n_train].
        With ``matrix_path``, the same pass also writes the full [n_test, n_train] float32 matrix to
        that ``.npy`` file tile by tile (memory-mapped, never whole in memory; NaN for training
        examples left out by sampling); the file appears under its name only once complete.
        With ``resume_dir``, progress is committed there after every train tile; calling again with the
        same arguments (and ``resume_key``, any JSON-able description of your inputs) after an
        interruption continues where it stopped and gives the same result; different settings are
        refused. The directory is removed when the run completes.
        """
        plan = self._plan(train_dataset)
        test = make_loader(test_dataset, self.batch_size, "test", self.num_workers)
        n_test = dataset_size(test)
        if not isinstance(top_k, int) or top_k < 1:
            raise TracInError(f"top_k must be a positive integer, got {top_k!r}.")
        if top_k > plan.n_scored:
            what = "the sampled training set" if plan.sampled is not None else "the training set"
            raise TracInError(f"top_k={top_k} is larger than {what} ({plan.n_scored} examples); use top_k <= {plan.n_scored}.")
        if matrix_path is not None and rank_and_world()[1] > 1:
            raise TracInError("matrix_path (--full_matrix) is not supported under torch.distributed yet; run it in one process.")
        state = None
        if resume_dir is not None:
            rank, world = rank_and_world()
            config = {"user": resume_key, "top_k": top_k, "self_influence": self_influence, "matrix": matrix_path is not None,
                      "layers": [h.name for h in self.handlers], "kernel": self.kernel, "batch_size": self.batch_size,
                      "projection": self.projector.describe() if self.projector else None, "sample_rate": self.sample_rate,
                      "seed": self.seed, "precision": self.precision_name, "normalize": self.normalize,
                      "precondition": self.preconditioner.damping if self.preconditioner is not None else None,
                      "n_train": plan.n_scored, "n_test": n_test, "world": world,
                      "checkpoints": [[c.name, c.learning_rate] for c in self.checkpoints]}
            state = ResumeState(Path(resume_dir) / f"rank{rank}" if world > 1 else Path(resume_dir), config)
        parts: Dict[int, TopKAccumulator] = {}
        disk = (DiskMatrix(Path(matrix_path), n_test, plan.n_full, plan.sampled, reopen=state is not None and state.resumed)
                if matrix_path is not None else None)

        def sink(rows: slice, scores: torch.Tensor, first: int) -> None:
            if rows.start not in parts:
                parts[rows.start] = (state.accumulator(rows, scores.shape[0], top_k, scores.device, scores.dtype) if state is not None
                                     else TopKAccumulator(scores.shape[0], top_k, scores.device, scores.dtype))
            parts[rows.start].update(scores, plan.offset + first)
            if disk is not None:
                disk.update(rows, scores, first)

        cached = self._cached_test[1] if self._cached_test is not None and self._cached_test[0] is test_dataset else None
        with self._scheduler() as run:
            self._fitted(run, plan.loader)
            if cached is not None:
                for h in self.handlers:
                    h.mode = self._cached_test[2][h.name]  # type: ignore[index]
            if state is not None and state.plan:
                run.plan.update(state.plan)
            selfs = run.influence(plan.loader, test, sink, with_self=self_influence, cached=cached, hook=state,
                                  initial_self=state.self_scores if state is not None else None)
        self.last_stats = dict(run.stats)
        if disk is not None:
            disk.finish()
        results = {start: acc.result() for start, acc in parts.items()}
        if state is not None:
            results.update(state.done)
            self.last_stats["resumed_from_tile"] = state.tiles - int(run.stats["tiles"])  # type: ignore[arg-type]
            state.finish()
        pieces = [results[start] for start in sorted(results)]
        local = tuple(torch.cat([p[i] for p in pieces]).cpu() for i in range(4))
        pv, pi, nv, ni = merge_topk(all_gather(local), top_k)
        assert pv.shape[0] == n_test
        if plan.sampled is not None:
            self.last_stats["sampled_indices"] = plan.sampled
        self_scores = torch.cat(all_gather(selfs.cpu())) if selfs is not None else None
        return InfluenceResult(
            proponents=TopK(pv, plan.to_full(pi)),
            opponents=TopK(nv, plan.to_full(ni)),
            self_influence=plan.spread(self_scores) if self_scores is not None else None,
            stats=self.last_stats,
        )

    def cache_test(self, test_dataset: DataSource) -> None:
        """Compute the test set's factors for every checkpoint now and keep them, so later
        :meth:`influence` calls with this same ``test_dataset`` object skip that work."""
        test = make_loader(test_dataset, self.batch_size, "test", self.num_workers)
        with self._scheduler() as run:
            self._fitted(run)
            cache = run.cache_test(test)
        self._cached_test = (test_dataset, cache, {h.name: h.mode for h in self.handlers})

    def clear_cache(self) -> None:
        """Free the cached test factors."""
        self._cached_test = None

    def _store_description(self) -> Dict[str, object]:
        projection = self.projector.for_vectors().describe() if self.projector else None
        precondition = None
        if self.preconditioner is not None:
            if not self.preconditioner.fitted:
                raise TracInError("precondition='kfac' needs its preconditioner fitted on the training data the store was "
                                  "made from; call fit_preconditioner(train_dataset) first.")
            precondition = self.preconditioner.describe()
        return describe([h.name for h in self.handlers], projection, self.checkpoints, precondition)

    def save_train_gradients(self, train_dataset: DataSource, directory: Union[str, Path]) -> Path:
        """Compute every training example's (projected) gradient at every checkpoint and store them in
        ``directory`` ([C, n_train, D] float32 memory map plus metadata), for :meth:`influence_from_saved`.
        Use with ``projection_dim`` unless the layers in scope are small: D is the gradient size."""
        train = make_loader(train_dataset, self.batch_size, "training", self.num_workers)
        writer = StoreWriter(Path(directory), len(self.checkpoints), dataset_size(train))
        with self._scheduler(vectors=True) as run:
            self._fitted(run, train)
            run.vectors(train, "training", writer)
        writer.finish(self._store_description())
        return Path(directory)

    def influence_from_saved(self, directory: Union[str, Path], test_dataset: DataSource, top_k: int = 100) -> InfluenceResult:
        """Top-k proponents/opponents of ``test_dataset`` against gradients saved by
        :meth:`save_train_gradients`, without reading the training data. The store's metadata
        (layers, projection, checkpoint weights and learning rates) must match this scorer."""
        store = open_store(Path(directory), self._store_description())
        n_train = store.shape[1]
        if not isinstance(top_k, int) or not 1 <= top_k <= n_train:
            raise TracInError(f"top_k must be between 1 and the stored training set size {n_train}, got {top_k!r}.")
        test = make_loader(test_dataset, self.batch_size, "test", self.num_workers)
        n_test = dataset_size(test)
        vectors = torch.zeros(len(self.checkpoints), n_test, store.shape[2])

        def keep(c: int, first: int, vec: torch.Tensor) -> None:
            vectors[c, first:first + vec.shape[0]] = vec.detach().float().cpu()

        with self._scheduler(vectors=True) as run:
            self._fitted(run)
            run.vectors(test, "test", keep)
            vectors = vectors.to(self.device)
            tiny = torch.finfo(vectors.dtype).tiny
            if self.normalize == "cosine":
                vectors = vectors / vectors.norm(dim=2, keepdim=True).clamp_min(tiny)
            acc = TopKAccumulator(n_test, top_k, self.device, vectors.dtype)
            rows = max(1, int(self.memory_budget // max(1, 4 * (3 * n_test + len(self.checkpoints) * store.shape[2]))))
            for start in range(0, n_train, rows):
                scores = torch.zeros(n_test, min(rows, n_train - start), device=self.device)
                for c, ckpt in enumerate(self.checkpoints):
                    tile = torch.from_numpy(np.array(store[c, start:start + rows])).to(self.device)
                    if self.normalize != "none":
                        tile = tile / tile.norm(dim=1, keepdim=True).clamp_min(tiny)
                    scores.add_(vectors[c] @ tile.T, alpha=float(ckpt.learning_rate))  # type: ignore[arg-type]
                acc.update(scores, start)
        pv, pi, nv, ni = (t.cpu() for t in acc.result())
        return InfluenceResult(proponents=TopK(pv, pi), opponents=TopK(nv, ni), stats={"stored_train": n_train})

    def influence_matrix(self, train_dataset: DataSource, test_dataset: DataSource) -> torch.Tensor:
        """The full TracIn matrix [n_test, n_train] (on the CPU). Holds n_test * n_train numbers: use
        :meth:`influence` for top-k on large sets."""
        plan = self._plan(train_dataset)
        test = make_loader(test_dataset, self.batch_size, "test", self.num_workers)
        acc: Optional[MatrixAccumulator] = None

        def sink(rows: slice, scores: torch.Tensor, first: int) -> None:
            nonlocal acc
            if acc is None:
                acc = MatrixAccumulator(dataset_size(test), plan.n_local, scores.dtype)
            acc.update(rows, scores, first)

        with self._scheduler() as run:
            self._fitted(run, plan.loader)
            run.influence(plan.loader, test, sink)
        self.last_stats = dict(run.stats)
        assert acc is not None
        return plan.spread(torch.cat(all_gather(acc.matrix), dim=1))

    def self_influence(self, train_dataset: DataSource) -> torch.Tensor:
        """TracIn(z, z) for every training example, [n_train] (on the CPU). High values flag
        surprising examples — mislabelled ones rank near the top."""
        plan = self._plan(train_dataset)
        with self._scheduler() as run:
            self._fitted(run, plan.loader)
            out = run.self_influence(plan.loader)
        self.last_stats = dict(run.stats)
        return plan.spread(torch.cat(all_gather(out.cpu())))

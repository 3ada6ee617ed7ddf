"""The TracIn facade: the public entry point of the library."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .checkpoints import Checkpoint
from .config import ScoringConfig
from .device import default_memory_budget, resolve_device
from .engine.accumulate import DiskMatrix, MatrixAccumulator, TopKSink
from .engine.distributed import all_gather, barrier, merge_topk, rank_and_world
from .engine.loaders import DataSource, dataset_size, make_loader
from .engine.resume import ResumeState
from .engine.sampling import TrainPlan, plan_training
from .engine.capture import EXACT
from .engine.scheduler import Scheduler, Target, Transforms
from .engine.scope import resolve_layers, scope_rows
from .engine.ann import approximate_with_recall
from .engine.index import (DTYPES, META as INDEX_META, FoldingWriter, GradientIndex, IndexMeta, describe_checkpoints, fold,
                           mine, plan_or_resume, rows_to_compute, search, shard_rows_for)
from .errors import TracInError
from .layers.precondition import KFAC, resolve_precondition
from .layers.projection import Projector
from .results import InfluenceResult, TopK
from .tasks.arguments import as_measurement, as_task
from .tasks.base import Task


@dataclass
class _TestCache:
    """Test factors computed ahead by :meth:`TracIn.cache_test`: for ``dataset`` (the same object must be
    scored again), every test chunk's per-checkpoint factors, and the kernel each layer used for them."""

    dataset: object
    chunks: list
    modes: Dict[str, Optional[str]]


class TracIn:
    """TracInCP influence of training examples on test examples.

    ``TracIn(z, z') = sum_c lr_c * <grad loss(z; theta_c), grad loss(z'; theta_c)>`` over the
    checkpoints, restricted to the parameters of the selected layers. Positive scores mark
    proponents (the training example helped), negative ones opponents (it hurt).

    Args:
        model: the network; its weights are replaced by each checkpoint's while scoring and restored afterwards.
            It is scored in eval mode (dropout off, batch norm on its running statistics).
        checkpoints: :class:`Checkpoint` objects, or a directory to :meth:`Checkpoint.discover`.
        task: a :class:`Task` or a callable ``(model, batch) -> Tensor[B]`` of per-example losses;
            None means classification with cross-entropy on ``(inputs, labels)`` batches.
        device: ``"auto"`` (cuda, then mps, then cpu), or any torch device.
        config: a :class:`tracin.config.ScoringConfig` holding every setting below; or give them as keywords
            (``TracIn(model, ckpts, layers="last", precondition="none")``), which build that config. Not both: a
            keyword passed with ``config=`` is refused, as is a name that is no setting. Either way ``self.config``
            is the one object the run reads.

    Settings (keyword-only; :class:`tracin.config.ScoringConfig` declares, defaults and checks each):
        layers: ``"all"``, ``"last"``, ``"output_bias"`` (the last module's bias alone), an int N (the last
            N parameterised modules), or module or parameter names / glob patterns (``"fc"``, ``"fc.bias"``).
        exclude: module or parameter names / glob patterns to leave out of ``layers`` (``["encoder.pos_embedding",
            "*.bias"]``).
        batch_size: examples per forward/backward pass.
        memory_budget: bytes of working memory for cached test factors and score tiles; by default
            half the device's free memory (a quarter of free host memory on cpu).
        progress: show tqdm progress bars.
        kernel: ``"auto"`` picks ghost or materialised per Linear/Conv layer from its shapes;
            ``"ghost"`` / ``"materialize"`` force one (both are exact).
        num_workers: DataLoader worker processes for Dataset inputs (0: load in the main process).
        projection_dim: project per-example gradients to about this many dimensions per layer
            (an unbiased approximation; None: exact). See :mod:`tracin.layers.projection`.
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
        precondition: ``"auto"`` (the default), ``"kfac"`` or ``"none"``. ``"kfac"``: g^T P g' with P a Kronecker-factored
            inverse of each layer's empirical Fisher, fitted on the training data at every checkpoint (one extra pass
            each, whose factors the influence pass reuses; :meth:`fit_preconditioner`); exact for that P under every
            kernel; Linear and Conv layers only. ``"auto"``: K-FAC over the Linear/Conv layers in scope when they hold at
            least 95% of its parameters (the others, e.g. norm layers, are left out and named in
            ``preconditioner.describe()``), else plain TracIn; also plain (with a warning) when a layer needs exact
            per-example passes. Chosen by counterfactual evidence: K-FAC predicts retraining far better than the
            plain inner product on every setting measured (docs/quality.md, LDS). ``"none"``: Pruthi et al.'s plain
            TracIn (Captum's TracInCP).
        damping: K-FAC damping, a fraction of each factor's mean eigenvalue (Kronfluence's heuristic is 0.1).
        measurement: what the test examples' gradients are of: None or ``"loss"`` (the task's loss, TracIn's own
            definition), ``"margin"`` (minus the classification margin: true logit less the logsumexp of the others),
            or a Task / callable ``(model, batch) -> Tensor[B]`` of per-example values where lower is better, as for a
            loss (a positive score then means the training example helped lower it).
    """

    def __init__(
        self,
        model: nn.Module,
        checkpoints: Union[Sequence[Checkpoint], str, "os.PathLike[str]"],
        *,
        task: Union[Task, Callable, None] = None,
        device: Union[str, torch.device] = "auto",
        config: Optional[ScoringConfig] = None,
        **settings: Any,
    ):
        if config is not None and settings:
            raise TracInError(f"Give the settings either as config= or as keywords, not both ({next(iter(settings))}= was "
                              "passed with config=); use config.replace(...) to change a config.")
        self.config = config if config is not None else ScoringConfig.from_settings(settings)
        self.model = model
        self.checkpoints: List[Checkpoint] = _checkpoint_list(checkpoints)
        self.task = as_task(task)
        self.measurement = as_measurement(self.config.measurement)
        self.device = _process_device(device)
        self._scope = resolve_layers(model, self.config.layers, self.config.exclude)  # the requested layers
        precondition, self.handlers, left_out = resolve_precondition(self.config.precondition, self._scope)
        self._auto_pending = self.config.precondition == "auto" and precondition == "kfac"  # decided on training data
        c = self.config
        self.projector = Projector(c.projection_dim, c.projection, c.seed) if c.projection_dim is not None else None
        self.preconditioner = KFAC(c.damping, left_out, c.projection_dim) if precondition == "kfac" else None
        self.passes: List[Dict[str, object]] = []  # each scoring pass's statistics, in order ({"pass": name, ...})
        self._cached_test: Optional[_TestCache] = None
        self._modes: Dict[str, Optional[str]] = {}  # the kernel each layer used in the last run

    @property
    def last_stats(self) -> Dict[str, object]:
        """The statistics of the latest scoring pass (every pass's are in :attr:`passes`)."""
        return self.passes[-1] if self.passes else {}

    def _record(self, name: str, stats: Dict[str, object]) -> Dict[str, object]:
        self.passes.append({"pass": name, **stats})
        return self.passes[-1]

    # -- introspection ---------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """Number of parameters in scope."""
        return sum(h.num_params for h in self.handlers)

    def scope(self) -> List[Dict[str, object]]:
        """One row per module in scope: name, type, parameter count, kernel used by the last run, the
        parameters in scope, and whether they are all of the module's trainable ones."""
        return scope_rows(self.handlers, self._modes)

    # -- scoring ---------------------------------------------------------------------------------
    @contextmanager
    def _scheduler(self, vectors: bool = False, modes: Optional[Dict[str, Optional[str]]] = None,
                   train=None) -> Iterator[Scheduler]:
        """A scheduler for this configuration, entered; ``vectors``: per-example vectors are materialised (stores);
        ``modes``: kernels to repeat; ``train``: the run's training loader, on which ``precondition="auto"`` is decided
        first (:meth:`_decide_auto`). The kernels it used are kept for :meth:`scope`."""
        self._decide_auto(train)
        # under K-FAC, projection_dim keeps the leading directions of its whiteners (KFAC.rank), no random matrix
        projector = None if self.preconditioner is not None else self.projector
        projector = projector.for_vectors() if vectors and projector is not None else projector
        target = Target(self.model, self.checkpoints, self.handlers, self.task, self.device, self.measurement)
        run = Scheduler(target, self.config, Transforms(projector, self.preconditioner, dict(modes or {})))
        try:
            with run:
                yield run
        finally:
            self._modes = {name: mode for name, mode in run.stats.get("layer_modes", {}).items()}  # type: ignore[union-attr]

    def _decide_auto(self, train_loader) -> None:
        """``precondition="auto"``, decided once, here, on the first training batch: K-FAC over the layers it covers,
        unless one of them needs exact per-example passes (which K-FAC does not cover); then plain TracIn over the
        whole requested scope, the layers K-FAC would have left out included, said once."""
        if not self._auto_pending or train_loader is None:
            return
        self._auto_pending = False
        kfac, self.preconditioner = self.preconditioner, None
        with self._scheduler() as run:
            run.detect(train_loader)
            exact = [name for name, mode in run.modes().items() if mode == EXACT]
        if not exact:
            self.preconditioner = kfac
            return
        self.handlers = self._scope
        warnings.warn(f"precondition='auto' scores plain TracIn over every requested layer: {exact[0]!r} needs exact "
                      "per-example passes, which K-FAC does not cover (precondition='none' says so up front; exclude= the "
                      "layer to keep K-FAC).", stacklevel=4)

    def _fitted(self, run: Scheduler, train_loader=None, keep: bool = False) -> None:
        """Fit the preconditioner on ``train_loader`` unless it is fitted (or none is used); ``keep``: the influence
        pass that follows reuses the fit pass's factors (:meth:`Scheduler.fit_preconditioner`)."""
        if self.preconditioner is None or self.preconditioner.fitted:
            return
        if train_loader is None:
            raise TracInError("precondition='kfac' needs its preconditioner fitted on training data first; call "
                              "fit_preconditioner(train_dataset) (or score a training set with this object) before this.")
        run.fit_preconditioner(train_loader, keep)

    def fit_preconditioner(self, train_dataset: DataSource) -> None:
        """Fit (or refit) the K-FAC preconditioner on ``train_dataset`` at every checkpoint. Scoring methods
        that receive a training set fit it on that set when it is not fitted yet; fit explicitly to use
        other data, or before :meth:`cache_test`."""
        if self.preconditioner is None:
            raise TracInError("fit_preconditioner needs precondition='kfac'.")
        self.preconditioner.per_checkpoint = None
        loader = self._plan(train_dataset).loader
        with self._scheduler(train=loader) as run:
            self._fitted(run, loader)

    def _plan(self, train_dataset: DataSource) -> TrainPlan:
        c = self.config
        return plan_training(train_dataset, c.batch_size, c.num_workers, self.task, c.sample_rate, c.stratify_by, c.seed)

    def _test_loader(self, test_dataset: DataSource):
        return make_loader(test_dataset, self.config.batch_size, "test", self.config.num_workers)

    def influence(
        self,
        train_dataset: DataSource,
        test_dataset: DataSource,
        top_k: int = 100,
        self_influence: bool = False,
        matrix_path: Union[str, Path, None] = None,
        resume_dir: Union[str, Path, None] = None,
        resume_key: Optional[Dict[str, object]] = None,
        keep_progress: bool = False,
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
        refused. The directory is removed when the run completes, unless ``keep_progress``: then the caller
        removes it once it has stored the results, and a failure before that resumes with nothing left to score.
        """
        plan = self._plan(train_dataset)
        test = self._test_loader(test_dataset)
        n_test = dataset_size(test)
        _check_top_k(top_k, plan)
        if matrix_path is not None and rank_and_world()[1] > 1:
            raise TracInError("matrix_path (--full_matrix) is not supported under torch.distributed yet; run it in one process.")
        request = {"user": resume_key, "top_k": top_k, "self_influence": self_influence, "matrix": matrix_path is not None}
        state = self._resume_state(resume_dir, request, plan, n_test) if resume_dir is not None else None
        disk = (DiskMatrix(Path(matrix_path), n_test, plan.n_full, plan.sampled, reopen=state is not None and state.resumed)
                if matrix_path is not None else None)
        sink = TopKSink(top_k, plan.offset, state, disk)
        cache = self._cached_test if self._cached_test is not None and self._cached_test.dataset is test_dataset else None
        with self._scheduler(modes=cache.modes if cache is not None else None, train=plan.loader) as run:
            self._fitted(run, plan.loader, keep=True)
            if state is not None and state.plan:
                run.plan.update(state.plan)
            selfs = run.influence(plan.loader, test, sink, with_self=self_influence, cached=cache.chunks if cache else None,
                                  hook=state, initial_self=state.self_scores if state is not None else None)
        stats = self._record("influence", run.stats)
        if disk is not None:
            disk.finish()
        results = sink.results()
        if state is not None:
            stats["resumed_from_tile"] = state.tiles - int(run.stats["tiles"])  # type: ignore[arg-type]
            if not keep_progress:
                state.finish()
        pv, pi, nv, ni = merge_topk(all_gather(results), top_k)
        assert pv.shape[0] == n_test
        _check_finite("influence", pv, nv)
        if plan.sampled is not None:
            stats["sampled_indices"] = plan.sampled
        self_scores = torch.cat(all_gather(selfs.cpu())) if selfs is not None else None
        if self_scores is not None:
            _check_finite("self-influence", self_scores)
        return InfluenceResult(
            proponents=TopK(pv, plan.to_full(pi)),
            opponents=TopK(nv, plan.to_full(ni)),
            self_influence=plan.spread(self_scores) if self_scores is not None else None,
            stats=stats,
        )

    def _resume_state(self, resume_dir: Union[str, Path], request: Dict[str, object], plan: TrainPlan, n_test: int) -> ResumeState:
        """The progress of this influence run in ``resume_dir`` (per rank under torch.distributed), keyed by
        everything its scores depend on: the settings, the ``request`` (top-k, outputs, the user's key), the
        layers in scope, the data sizes and the checkpoints."""
        rank, world = rank_and_world()
        settings = {k: v for k, v in self.config.to_dict().items() if k not in ("progress", "num_workers", "memory_budget")}
        key = {**request, "settings": settings, "layers": [h.name for h in self.handlers], "n_train": plan.n_scored,
               "n_test": n_test, "world": world, "checkpoints": [[c.name, c.learning_rate] for c in self.checkpoints]}
        return ResumeState(Path(resume_dir) / f"rank{rank}" if world > 1 else Path(resume_dir), key)

    def cache_test(self, test_dataset: DataSource) -> None:
        """Compute the test set's factors for every checkpoint now and keep them, so later
        :meth:`influence` calls with this same ``test_dataset`` object skip that work."""
        test = self._test_loader(test_dataset)
        with self._scheduler() as run:
            self._fitted(run)
            chunks = run.cache_test(test)
            modes = run.modes()
        self._cached_test = _TestCache(test_dataset, chunks, modes)

    def clear_cache(self) -> None:
        """Free the cached test factors."""
        self._cached_test = None

    # -- the gradient index ------------------------------------------------------------------------
    def _index_description(self) -> Dict[str, object]:
        """What an index's rows depend on (:data:`tracin.engine.index.COMPARED`), and the settings."""
        pre = self.preconditioner
        precondition = {k: v for k, v in pre.describe().items() if k != "fit_examples"} if pre is not None else None
        projection = (self.projector.for_vectors().describe() if self.projector is not None and pre is None else None)
        return {"settings": self.config.to_dict(), "layers": [h.name for h in self.handlers], "projection": projection,
                "precondition": precondition, "normalize": self.config.normalize,
                "checkpoints": describe_checkpoints(self.checkpoints)}

    def build_index(self, train_dataset: DataSource, directory: Union[str, Path], dtype: Optional[str] = None,
                    source: Optional[str] = None) -> Path:
        """Write a gradient index of ``train_dataset`` into ``directory`` (:mod:`tracin.engine.index`): one row per
        training example, the checkpoints folded in and the K-FAC whiteners applied, so :meth:`query` scores a test set
        with one matrix product and no training data. Run again after an interruption, it writes only the missing
        shards; under torchrun the ranks write different shards. ``dtype``: ``"float32"`` (default), ``"float16"`` or
        ``"bfloat16"``; ``source``: a note of what the rows are, kept in ``index.json``."""
        return self._index_part(train_dataset, Path(directory), dtype, source, add=False)

    def add_to_index(self, train_dataset: DataSource, directory: Union[str, Path], source: Optional[str] = None) -> Path:
        """Append ``train_dataset`` to the index in ``directory`` (its rows follow the existing ones), with the
        index's own K-FAC whiteners (not refitted); run again after an interruption, it finishes that part."""
        return self._index_part(train_dataset, Path(directory), None, source, add=True)

    def _index_part(self, train_dataset: DataSource, directory: Path, dtype: Optional[str], source: Optional[str],
                    add: bool) -> Path:
        if self.config.sample_rate is not None:
            raise TracInError("A gradient index holds every training example; drop sample_rate (stratify_by) to build one.")
        loader = make_loader(train_dataset, self.config.batch_size, "training", self.config.num_workers)
        with self._scheduler(vectors=True, train=loader) as run:
            index = self._open_index(run, train_dataset, directory, dtype, add)
            part = plan_or_resume(index, dataset_size(loader), source, add)
            todo = mine(index, part)
            if todo:
                subset, rows = rows_to_compute(train_dataset, loader, part, todo)
                writer = FoldingWriter(index, todo, rows, [float(c.learning_rate) for c in self.checkpoints],  # type: ignore[arg-type]
                                       self.config.normalize)
                run.vectors(make_loader(subset, self.config.batch_size, "training", self.config.num_workers)
                            if subset is not None else loader, "training", writer)
        barrier()
        index.require_complete()
        return directory

    def _open_index(self, run: Scheduler, train_dataset: DataSource, directory: Path, dtype: Optional[str],
                    add: bool) -> GradientIndex:
        """The index in ``directory`` (its whiteners taken), or a new one: K-FAC fitted on ``train_dataset``, the
        metadata and whiteners written by rank 0."""
        if (directory / INDEX_META).exists() or add:
            index = self._checked_index(directory)
            if dtype is not None and dtype != index.meta.dtype:
                raise TracInError(f"The gradient index in {directory} stores {index.meta.dtype}, not {dtype}; drop the "
                                  "dtype or choose a new directory.")
            return index
        dtype = dtype or "float32"
        if dtype not in DTYPES:
            raise TracInError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
        self._fitted(run, self._plan(train_dataset).loader)
        estimate = sum(min(h.num_params, self.config.projection_dim or h.num_params) for h in self.handlers)
        budget = default_memory_budget(torch.device("cpu"), self.config.memory_budget)
        meta = IndexMeta(self._index_description(), dtype, shard_rows_for(estimate * len(self.checkpoints), budget),
                         self.preconditioner.fit_examples if self.preconditioner is not None else 0)
        index = GradientIndex(directory, meta)
        if rank_and_world()[0] == 0:
            directory.mkdir(parents=True, exist_ok=True)
            if self.preconditioner is not None:
                index.save_whiteners(self.preconditioner.state())
        barrier()
        return index

    def _checked_index(self, directory: Path) -> GradientIndex:
        """The index in ``directory``, checked against this scorer; its K-FAC whiteners become this scorer's."""
        index = GradientIndex.load(directory)
        if self._auto_pending and index.decided_plain():  # precondition="auto" was decided at the build
            self._auto_pending, self.preconditioner, self.handlers = False, None, self._scope
        index.check(self._index_description())
        if self.preconditioner is not None:
            self.preconditioner.load_state(index.load_whiteners(), len(self.checkpoints), index.meta.fit_examples)
        return index

    def query(self, directory: Union[str, Path], test_dataset: DataSource, top_k: int = 100,
              self_influence: bool = False, ann_probes: Optional[int] = None) -> InfluenceResult:
        """Exact top-k proponents/opponents of ``test_dataset`` against the gradient index in ``directory`` (built by
        :meth:`build_index` with this scorer's settings and checkpoints), without reading the training data. Indices
        are index rows. ``self_influence``: also every row's stored self-influence. ``ann_probes``: approximate search
        instead, probing that many lists of a FAISS inverted-file index (:mod:`tracin.engine.ann`, the ``ann`` extra),
        its recall@k against the exact search measured on up to 10 of the test examples (``stats["ann_recall"]``).
        Under K-FAC the index's whiteners become this scorer's (later scoring uses them, without a refit)."""
        index = self._checked_index(Path(directory))
        index.require_complete()
        n_rows = index.meta.n_rows
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_rows:
            raise TracInError(f"top_k must be between 1 and the index's {n_rows} rows, got {top_k!r}.")
        queries = self._index_queries(self._test_loader(test_dataset))
        tile_bytes = default_memory_budget(self.device, self.config.memory_budget) // 4
        if ann_probes is None:
            pv, pi, nv, ni = (t.cpu() for t in search(index, queries.to(self.device), top_k, tile_bytes).result())
            stats: Dict[str, object] = {"search": "exact"}
        else:
            (pv, pi, nv, ni), stats = approximate_with_recall(index, queries, top_k, ann_probes, (self.device, tile_bytes))
        _check_finite("influence", pv, nv)
        return InfluenceResult(proponents=TopK(pv, pi), opponents=TopK(nv, ni),
                               self_influence=index.self_influence() if self_influence else None,
                               stats={"index_rows": n_rows, **stats})

    def _index_queries(self, test) -> torch.Tensor:
        """The test examples' rows as an index holds training rows: [m, checkpoints x vector size] (float32, CPU)."""
        vectors: Optional[torch.Tensor] = None

        def keep(c: int, first: int, vec: torch.Tensor) -> None:
            nonlocal vectors
            if vectors is None:
                vectors = torch.zeros(len(self.checkpoints), dataset_size(test), vec.shape[1])
            vectors[c, first:first + vec.shape[0]] = vec.detach().float().cpu()

        with self._scheduler(vectors=True) as run:
            run.vectors(test, "test", keep)
        assert vectors is not None
        rates = [float(c.learning_rate) for c in self.checkpoints]  # type: ignore[arg-type]
        return fold(vectors, rates, self.config.normalize, "test")[0]

    def influence_matrix(self, train_dataset: DataSource, test_dataset: DataSource) -> torch.Tensor:
        """The full TracIn matrix [n_test, n_train] (on the CPU). Holds n_test * n_train numbers: use
        :meth:`influence` for top-k on large sets."""
        plan = self._plan(train_dataset)
        test = self._test_loader(test_dataset)
        acc = MatrixAccumulator(dataset_size(test), plan.n_local)
        with self._scheduler(train=plan.loader) as run:
            self._fitted(run, plan.loader, keep=True)
            run.influence(plan.loader, test, acc.update)
        self._record("influence_matrix", run.stats)
        matrix = torch.cat(all_gather(acc.matrix), dim=1)
        _check_finite("influence", matrix)
        return plan.spread(matrix)

    def self_influence(self, train_dataset: DataSource) -> torch.Tensor:
        """TracIn(z, z) for every training example, [n_train] (on the CPU). High values flag
        surprising examples — mislabelled ones rank near the top."""
        plan = self._plan(train_dataset)
        with self._scheduler(train=plan.loader) as run:
            self._fitted(run, plan.loader)
            out = run.self_influence(plan.loader)
        self._record("self_influence", run.stats)
        scores = torch.cat(all_gather(out.cpu()))
        _check_finite("self-influence", scores)
        return plan.spread(scores)


def _checkpoint_list(checkpoints: Union[Sequence[Checkpoint], str, "os.PathLike[str]"]) -> List[Checkpoint]:
    """The checkpoints as a non-empty list (a directory is discovered)."""
    if isinstance(checkpoints, (str, Path, os.PathLike)):
        checkpoints = Checkpoint.discover(checkpoints)
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise TracInError("No checkpoints were given; pass at least one Checkpoint.")
    if not all(isinstance(c, Checkpoint) for c in checkpoints):
        raise TracInError("checkpoints must be Checkpoint objects (or a directory of checkpoint files).")
    if all(c.learning_rate == 0 for c in checkpoints):
        raise TracInError("Every checkpoint's learning rate is 0, so every TracIn score would be 0 and any top-k list "
                          "arbitrary; give the learning rates used in training (learning_rate= or --learning_rate).")
    return checkpoints


def _process_device(device: Union[str, torch.device]) -> torch.device:
    """The device this process scores on: under torch.distributed with CUDA, ``"auto"`` is the rank's own GPU."""
    rank, world = rank_and_world()
    if world > 1 and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank % torch.cuda.device_count()))}"
    return resolve_device(device)


def _check_finite(what: str, *scores: torch.Tensor) -> None:
    """Refuse scores that are NaN or infinite rather than rank them (a NaN would sort as the top proponent, or read as
    an example left out by sampling)."""
    bad = sum(int((~torch.isfinite(s)).sum()) for s in scores)
    if bad:
        raise TracInError(
            f"{bad} {what} scores are NaN or infinite: the gradients overflowed float32 at some checkpoint (weights, inputs "
            "or learning rates too large), or the K-FAC damping is too small for the factors' conditioning (raise "
            "damping= / --damping; 0.1 is the default). Nothing was ranked.")


def _check_top_k(top_k: object, plan: TrainPlan) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise TracInError(f"top_k must be a positive integer, got {top_k!r}.")
    if top_k > plan.n_scored:
        what = "the sampled training set" if plan.sampled is not None else "the training set"
        raise TracInError(f"top_k={top_k} is larger than {what} ({plan.n_scored} examples); use top_k <= {plan.n_scored}.")

"""In-run TracIn: influence and self-influence recorded inside the training steps themselves.

TracIn's ideal form (Pruthi et al. 2020, section 3) sums over every optimisation step t in which a training example z
was in the batch:

    self-influence(z)  = sum_t eta_t ||grad l(z; w_t)||^2
    influence(q, z)    = sum_t eta_t <grad l(q; w_t), grad l(z; w_t)>

The recorder hooks the layers in scope; the training step's own backward pass leaves each layer's inputs and output
gradients behind, and the layer handlers' kernels (ghost dot-products or materialised gradients, as for checkpoints)
turn them into per-example squared norms and inner products with the query set's gradients. The only extra work is a
forward and backward pass of the query set every ``query_every`` steps (none without queries). eta_t is the learning
rate the optimizer holds for the layer's parameters at the step (schedulers included). The per-example gradient is
that of the example's own loss, whatever the reduction of the loss that was backpropagated (a mean divides each
example's gradient by the batch size; the recorder undoes it), so gradient accumulation, loss scaling and mixed
precision leave it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import DataError, TracInError
from ..layers.base import Call, LayerHandler, LayerRun
from ..layers.exact import ExactHandler
from ..layers.factors import Factors
from ..layers.norm import BATCH_NORMS
from ..layers.precondition import MovingFisher, Whitening, Whiteners
from ..results import InfluenceResult, TopK
from ..tasks.arguments import as_task
from ..tasks.base import Batch, Task
from .blocks import batch_bytes
from .capture import BatchCapture, sums_agree
from .loaders import DataSource, make_loader
from .scope import resolve_layers, scope_rows


QUERY_CACHE_BYTES = 256 * 2**20  # query batches kept on the device between query passes up to this size
FISHER_PASSES = 1.0  # the in-run K-FAC statistics' moving averages forget over about this many passes over the data
KFAC_RUN = "in-run K-FAC"  # a LayerRun's preconditioner: the handler transforms its factors with the batch's whitening
KEY = Whitening({}, "key")  # the training side of a preconditioned pairing stays as it is (the query side takes P)


@dataclass
class _Scope:
    """One set of layers the recorder sums over, with each layer's run settings and the calls it captured."""

    handlers: List[LayerHandler]
    runs: Dict[str, LayerRun]

    @classmethod
    def of(cls, model: nn.Module, layers: Any, exclude: Sequence[str], what: str, kfac: bool = False) -> "_Scope":
        handlers = resolve_layers(model, layers, exclude)
        plain = [h.name for h in handlers if not h.kronecker]
        if kfac and plain:
            raise TracInError(f"precondition='kfac' covers Linear and Conv layers only, and {plain[0]!r} is in the {what} "
                              "scope; leave it out (exclude=) or record with precondition='none'.")
        batch_norms = [h.name for h in handlers if isinstance(h.module, BATCH_NORMS)]
        if batch_norms:
            raise TracInError(f"BatchNorm {batch_norms[0]!r} normalises over the batch while training, so an example's own "
                              f"gradient is not defined there; leave BatchNorm layers out of the {what} scope (exclude=, or "
                              "layers='last').")
        recomputed = [h.name or "the model" for h in handlers if h.capture != "output" or len(h.uses()) > 1]
        if recomputed:
            raise TracInError(f"In-run recording takes layers whose kernels read one module's output, and {recomputed[0]!r} "
                              "(attention's packed projection, a recurrent layer, a tied weight, or parameters broadcast over "
                              f"the batch) is in its {what} scope; leave it out (exclude=) or choose layers='last'.")
        exact = [h for h in handlers if isinstance(h, ExactHandler)]
        if exact:
            raise TracInError(f"In-run recording needs a kernel for every layer of its {what} scope, but "
                              f"{', '.join(exact[0].full_names()[:3])} would need per-example backward passes (tied, "
                              "recurrent or custom layers); leave them out (exclude=) or choose layers='last'.")
        return cls(handlers, {h.name: LayerRun(preconditioner=KFAC_RUN if kfac else None) for h in handlers})


@dataclass(frozen=True)
class InRunConfig:
    """The settings of an in-run recording (keywords of :class:`InRun`).

    layers, exclude: the influence scope, as for :class:`tracin.TracIn` (default ``"all"``).
    self_influence_layers: the self-influence scope (None: the influence scope).
    query_every: recompute the query gradients every N recorded batches (1: at every step's weights; N > 1 reuses them
        for the batches between, an approximation recorded in :meth:`InRun.describe`).
    top_k: proponents and opponents kept per query.
    query_batch_size: query examples per forward/backward pass.
    precondition: ``"none"`` (Pruthi et al.'s inner products) or ``"kfac"``: influence is g_q^T P_t g_z with P_t the
        K-FAC inverse of the empirical Fisher of the influence scope's Linear/Conv layers, estimated in-run as a moving
        average of the training batches' factor covariances over about one pass of the data (damped by ``damping``
        times each factor's mean eigenvalue, as ``TracIn`` damps), inverted whenever the queries' gradients are taken
        (every ``query_every`` batches), which then take P_t. Self-influence stays plain.
    """

    layers: Any = "all"
    exclude: Tuple[str, ...] = ()
    self_influence_layers: Any = None
    query_every: int = 1
    top_k: int = 10
    query_batch_size: int = 64
    precondition: str = "none"
    damping: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.query_every < 1 or self.top_k < 1 or self.query_batch_size < 1:
            raise TracInError(f"query_every, top_k and query_batch_size must be at least 1, got {self.query_every}, "
                              f"{self.top_k} and {self.query_batch_size}.")
        if self.precondition not in ("none", "kfac") or not self.damping > 0:
            raise TracInError(f"precondition must be none or kfac and damping positive, got {self.precondition!r} and "
                              f"{self.damping}.")

    def to_dict(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


@dataclass
class _Pending:
    """A forwarded batch waiting for its backward pass: its calls, example ids, the weight of each example's loss in
    the backpropagated loss, whether it is the run's first (checked), and the gradient that reached that loss."""

    calls: Dict[Tuple[int, str], List[Call]]
    ids: torch.Tensor
    per_example: float
    first: bool
    scale: Optional[float] = None


class InRun:
    """Records in-run TracIn while the user's loop trains ``model`` with ``optimizer``.

    Three lines change in a plain loop::

        recorder = InRun(model, optimizer, num_examples=len(train_set), queries=test_set)
        for ids, x, y in loader:                                      # the batch carries each example's index
            optimizer.zero_grad()
            losses = F.cross_entropy(model(x), y, reduction="none")  # per-example losses [B]
            recorder.backward(losses, ids)                            # instead of losses.mean().backward()
            optimizer.step()
        result = recorder.result()

    Args:
        model, optimizer: what trains; the optimizer's learning rates are read at every step.
        num_examples: the size of the training set; ``ids`` are positions in it (0 .. num_examples - 1).
        queries: a Dataset or DataLoader of examples to explain (the task's batches), or None for self-influence only.
        task: the loss of the query examples, as for :class:`tracin.TracIn` (None: cross-entropy on (inputs, labels)).
        config: an :class:`InRunConfig`; or its fields as keywords (``layers="last", query_every=10``), not both.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_examples: int, *,
                 queries: Optional[DataSource] = None, task: Union[Task, Callable, None] = None,
                 config: Optional[InRunConfig] = None, **settings: Any):
        if config is not None and settings:
            raise TracInError("Give the settings either as config= or as keywords, not both.")
        try:
            self.config = config or InRunConfig(**settings)
        except TypeError as exc:
            raise TracInError(f"{exc}; the settings are the fields of tracin.engine.inrun.InRunConfig.") from None
        if num_examples < 1:
            raise TracInError(f"num_examples must be at least 1, got {num_examples}.")
        c = self.config
        self.model, self.optimizer, self.num_examples = model, optimizer, num_examples
        self.task = as_task(task)
        self.influence_scope = _Scope.of(model, c.layers, c.exclude, "influence", c.precondition == "kfac")
        self.self_scope = (self.influence_scope if c.self_influence_layers is None
                           else _Scope.of(model, c.self_influence_layers, (), "self-influence"))
        self.queries = make_loader(queries, c.query_batch_size, "query") if queries is not None else None
        device = next(model.parameters()).device
        self.self_influence = torch.zeros(num_examples, dtype=torch.float64, device=device)
        self.seen = torch.zeros(num_examples, dtype=torch.long, device=device)
        self.matrix: Optional[torch.Tensor] = None  # [n_queries, num_examples] float64, once queries are scored
        self.steps = self.skipped = 0
        self.checkpoints: List[Any] = []  # a manifest's checkpoints (tracin.workflows.results_dir.Scorer): every step counts
        self.preconditioner = None
        self._query_factors: Optional[List[Dict[str, Factors]]] = None  # per query batch, per layer
        self._query_cache: Optional[List[Batch]] = None  # the query batches on the device, when small enough to keep
        self._fisher = MovingFisher(num_examples, device, FISHER_PASSES) if c.precondition == "kfac" else None
        self._whiteners: Optional[Whiteners] = None  # the in-run K-FAC inverse in use
        self._calls: Dict[Tuple[int, str], List[Call]] = {}
        self._paused = False  # while the query pass runs its own capture, and while factors are computed
        self._pending: List[_Pending] = []  # batches announced by expect(), recorded by flush()
        self._hooks = [h.module.register_forward_hook(self._hook(key, h)) for key, scope in self._scopes() for h in scope.handlers]

    @property
    def device(self) -> torch.device:
        return self.self_influence.device

    @property
    def num_parameters(self) -> int:
        return sum(h.num_params for h in self.influence_scope.handlers)

    def scope(self) -> List[Dict[str, object]]:
        """One row per layer of the influence scope, as :meth:`tracin.TracIn.scope` gives them."""
        return scope_rows(self.influence_scope.handlers, {n: r.mode for n, r in self.influence_scope.runs.items()})

    # -- capture -------------------------------------------------------------------------------------------------
    def _scopes(self) -> List[Tuple[int, _Scope]]:
        scopes = [(0, self.influence_scope)]
        return scopes if self.self_scope is self.influence_scope else scopes + [(1, self.self_scope)]

    def _hook(self, key: int, handler: LayerHandler):
        def hook(module: nn.Module, args: Tuple, output: torch.Tensor) -> None:
            if self._paused or not (isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled()):
                return
            call = Call(args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), input_version=0,
                        output_shape=output.shape)

            def store(grad: torch.Tensor, call: Call = call) -> None:
                call.delta = grad

            output.register_hook(store)
            self._calls.setdefault((key, handler.name), []).append(call)
        return hook

    def remove(self) -> None:
        """Take the recorder's hooks off the model (it records nothing more)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # -- one training step ----------------------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, ids: Any, reduction: str = "mean", weight: float = 1.0,
                 scaler: Any = None) -> torch.Tensor:
        """Backpropagate ``weight`` times the batch's loss (``losses`` [B] per example, reduced by ``reduction``: "mean"
        or "sum"; ``weight`` e.g. 1 / accumulation steps; scaled by a ``torch.amp.GradScaler`` when given) into the
        parameters' ``.grad`` as ``loss.backward()`` does, and record the batch's examples ``ids`` [B] at the weights of
        this step: each example's own loss gradient, whatever the reduction, weight and scale. Returns the reduced
        loss (detached, without the weight)."""
        total = losses.mean() if reduction == "mean" else losses.sum() if reduction == "sum" else None
        if total is None:
            raise TracInError(f"reduction={reduction!r} is not one of mean, sum.")
        if not weight > 0:
            raise TracInError(f"weight must be positive, got {weight}.")
        if losses.dim() != 1:
            raise DataError(f"backward() needs the per-example losses [B] (reduction='none'), got shape {tuple(losses.shape)}.")
        ids = self._ids(ids, losses.shape[0])
        loss = weight * total
        self.expect(loss, ids, weight / (losses.shape[0] if reduction == "mean" else 1.0))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.flush()
        return total.detach()

    def expect(self, loss: torch.Tensor, ids: Any, per_example: float) -> None:
        """For loops that run the backward pass themselves (a framework's trainer): the batch just forwarded holds the
        examples ``ids`` [B], and ``loss`` (the scalar about to be backpropagated, perhaps scaled further by the
        framework: the gradient reaching it says by how much) is ``per_example`` times the sum of their own losses.
        :meth:`flush`, after the backward pass and before the optimizer steps, records it."""
        ids = self._ids(ids, None)
        first = self.steps == 0 and not self._pending and all(p.grad is None or not bool(p.grad.any()) for p in self._parameters())
        entry = _Pending(self._calls, ids, per_example, first)
        self._calls = {}

        def seen(grad: torch.Tensor, entry: _Pending = entry) -> None:
            entry.scale = float(grad)

        loss.register_hook(seen)
        self._pending.append(entry)

    def flush(self) -> None:
        """Record every batch announced by :meth:`expect` whose backward pass has run (in order); one whose loss never
        got a gradient is dropped and counted as skipped."""
        pending, self._pending = self._pending, []
        self._paused = True  # a handler that re-runs its module (norm layers) is not recorded again
        try:
            for entry in pending:
                if entry.scale is None or entry.scale == 0:
                    self.skipped += 1
                    continue
                self._check_rows(entry.calls, len(entry.ids))
                if entry.first:
                    self._check_sums(entry.calls)
                with torch.no_grad():
                    self._record(entry.calls, entry.ids, 1.0 / (entry.scale * entry.per_example))
        finally:
            self._paused = False

    def _parameters(self) -> List[torch.Tensor]:
        return [p for _, scope in self._scopes() for h in scope.handlers for p in h.parameters()]

    def _check_rows(self, calls: Dict[Tuple[int, str], List[Call]], size: int) -> None:
        """Refuse a layer whose calls ran on rows that are not the batch's examples (broadcast over the batch, as a
        position table looked up once is): its factors would not be per example."""
        for (_, name), mine in calls.items():
            rows = next((c.rows for c in mine if c.rows is not None and c.rows != size), None)
            if rows is not None:
                raise TracInError(f"Layer {name!r} ran on {rows} rows for a batch of {size} examples (broadcast over the "
                                  "batch), so its per-example gradients cannot be recorded in-run; leave it out (exclude=).")

    def _check_sums(self, calls: Dict[Tuple[int, str], List[Call]]) -> None:
        """On the first step, from zeroed gradients: each layer's per-example gradients must add up to the gradient
        autograd left in ``.grad``, else its parameters are also used outside its recorded calls (tied weights, a
        functional call) and its records would be wrong."""
        for key, scope in self._scopes():
            for h in scope.handlers:
                mine = calls.get((key, h.name), [])
                grads = [p.grad for p in h.parameters()]
                if not mine:
                    agree = all(g is None or not bool(g.any()) for g in grads)
                else:  # differences measured against the layer's largest gradient
                    agree = sums_agree(h, mine, grads, max((float(g.norm()) for g in grads if g is not None), default=0.0))
                if not agree:
                    raise TracInError(f"The parameters of layer {h.name!r} are also used outside its own forward calls "
                                      "(tied weights, or called functionally by a parent module), so their per-example "
                                      "gradients cannot be recorded in-run; leave it out (exclude=).")

    def _ids(self, ids: Any, size: Optional[int]) -> torch.Tensor:
        ids = torch.as_tensor(ids, device=self.self_influence.device).long().reshape(-1)
        if size is not None and ids.shape[0] != size:
            raise DataError(f"{ids.shape[0]} example ids for a batch of {size} losses; give one id per example.")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_examples):
            raise DataError(f"Example ids must be positions 0..{self.num_examples - 1} of the training set, got "
                            f"{int(ids.min())}..{int(ids.max())}.")
        return ids

    def _rate(self, handler: LayerHandler) -> float:
        """The learning rate the optimizer holds now for the handler's parameters."""
        mine = {id(p) for p in handler.parameters()}
        for group in self.optimizer.param_groups:
            if any(id(p) in mine for p in group["params"]):
                return float(group["lr"])
        raise TracInError(f"Layer {handler.name!r} is in scope but none of its parameters is in the optimizer; choose "
                          "layers the optimizer trains.")

    def _factors(self, scope_key: int, scope: _Scope, calls: Dict[Tuple[int, str], List[Call]], unscale: float,
                 ids: torch.Tensor) -> Dict[str, Factors]:
        out = {}
        for h in scope.handlers:
            mine = calls.get((scope_key, h.name))
            if mine:
                for c in mine:
                    if c.delta is not None:
                        c.delta = c.delta * unscale
                run = scope.runs[h.name]
                if run.preconditioner is None:
                    out[h.name] = h.factors(mine, run)
                    continue
                raw = h.ghost_factors(mine)  # type: ignore[attr-defined] - K-FAC scopes hold Linear/Conv handlers
                assert self._fisher is not None, "a preconditioned scope comes with the in-run statistics"
                self._fisher.add(h.name, raw, len(ids))
                out[h.name] = h.transform(raw, run, KEY)  # type: ignore[attr-defined]
        return out

    def _record(self, calls: Dict[Tuple[int, str], List[Call]], ids: torch.Tensor, unscale: float) -> None:
        """Add this step's eta * squared norms (and eta * inner products with the queries, whose gradients are taken
        now, at the same weights) of the batch's examples."""
        per_scope = {key: self._factors(key, scope, calls, unscale, ids) for key, scope in self._scopes()}
        own = torch.zeros(len(ids), dtype=torch.float64, device=ids.device)
        for h in self.self_scope.handlers:
            f = per_scope[0 if self.self_scope is self.influence_scope else 1].get(h.name)
            if f is not None:
                own += self._rate(h) * f.self_scores().double()
        if not bool(torch.isfinite(own).all()):  # a mixed-precision step the scaler skips: nothing of it is recorded
            self.skipped += 1
            return
        self.self_influence.index_add_(0, ids, own)
        self.seen.index_add_(0, ids, torch.ones_like(ids))
        if self._fisher is not None:
            self._fisher.count(len(ids))
        if self.queries is not None:
            self._add_influence(per_scope[0], ids, self._query_side())
        self.steps += 1

    # -- queries --------------------------------------------------------------------------------------------------
    def _query_side(self) -> List[Dict[str, Factors]]:
        """The query set's factors at this step's weights (recomputed every ``query_every`` steps), in eval mode."""
        if self._query_factors is None or self.steps % self.config.query_every == 0:
            if self._fisher is not None:  # the in-run K-FAC inverse of the moving averages, as they stand now
                self._whiteners = self._fisher.whiteners(self.config.damping, self.device)
            self._query_factors = self._query_pass()
        return self._query_factors

    def _query_pass(self) -> List[Dict[str, Factors]]:
        assert self.queries is not None
        scope = self.influence_scope
        was_training = self.model.training
        self._paused = True
        self.model.eval()
        capture = BatchCapture(scope.handlers, scope.runs)
        capture.checked = True  # the training steps use the handlers' kernels as they are
        devices = [self.device] if self.device.type == "cuda" else []
        # the random state is put back afterwards: iterating the query loader draws from it, and training (dropout,
        # shuffling) must run exactly as it would without the recorder
        with torch.random.fork_rng(devices=devices):
            return self._query_factors_of(capture, was_training)

    def _query_factors_of(self, capture: BatchCapture, was_training: bool) -> List[Dict[str, Factors]]:
        try:
            out = []
            for batch in self._query_batches():
                whitening = Whitening(self._whiteners, "query") if self._whiteners is not None else None
                factors = capture.factors(self.model, self.task, batch, "query", 0, whitening=whitening)
                out.append({k: v for k, v in factors.items() if v is not None})
        finally:
            capture.remove()
            self.model.train(was_training)
            self._paused = False
        return out

    def _query_batches(self) -> Iterator[Batch]:
        """The query batches on the device: read once and kept when they hold at most QUERY_CACHE_BYTES (a test set is
        not decoded again at every query pass), else read again each pass."""
        assert self.queries is not None
        if self._query_cache is not None:
            yield from self._query_cache
            return
        kept: Optional[List[Batch]] = []
        size = 0
        for batch in self.queries:
            batch = self.task.to_device(batch, self.device)
            size += batch_bytes(batch)
            kept = kept if kept is not None and size <= QUERY_CACHE_BYTES else None
            if kept is not None:
                kept.append(batch)
            yield batch
        self._query_cache = kept

    def _add_influence(self, train: Dict[str, Factors], ids: torch.Tensor, query: List[Dict[str, Factors]]) -> None:
        rows = []
        for chunk in query:
            score = None
            for h in self.influence_scope.handlers:
                if h.name in chunk and h.name in train:
                    s = self._rate(h) * chunk[h.name].pair_scores(train[h.name]).double()
                    score = s if score is None else score + s
            rows.append(score if score is not None else torch.zeros(chunk_size(chunk), len(ids), dtype=torch.float64,
                                                                     device=ids.device))
        block = torch.cat(rows)  # [n_queries, B]
        if self.matrix is None:
            self.matrix = torch.zeros(block.shape[0], self.num_examples, dtype=torch.float64, device=ids.device)
        self.matrix.index_add_(1, ids, block)

    # -- results ---------------------------------------------------------------------------------------------------
    def result(self, examples: Optional[Sequence[int]] = None) -> InfluenceResult:
        """What was recorded: ``self_influence`` [num_examples] (NaN for examples never trained on) and, with queries,
        the exact top-k proponents and opponents of the summed in-run scores. ``examples``: only these training
        positions [m] (self-influence [m]; the top-k among them, its indices positions in ``examples``)."""
        s = self.self_influence.clone()
        s[self.seen == 0] = float("nan")
        chosen = torch.as_tensor(examples, device=s.device).long() if examples is not None else None
        s = s[chosen] if chosen is not None else s
        result = InfluenceResult(proponents=None, opponents=None, self_influence=s.float().cpu(), stats=self.describe())
        if self.matrix is not None:
            m = (self.matrix[:, chosen] if chosen is not None else self.matrix).float().cpu()
            k = min(self.config.top_k, m.shape[1])
            pro, opp = m.topk(k, dim=1), (-m).topk(k, dim=1)
            result.proponents = TopK(pro.values, pro.indices)
            result.opponents = TopK(-opp.values, opp.indices)
        return result

    def influence_matrix(self) -> Optional[torch.Tensor]:
        """[n_queries, num_examples] summed in-run scores (float64), or None without queries."""
        return self.matrix

    def describe(self) -> Dict[str, Any]:
        """What the recording holds and how it was made (for manifests)."""
        return {"steps": self.steps, "skipped_steps": self.skipped, "examples_seen": int((self.seen > 0).sum()),
                "query_every": self.config.query_every if self.queries is not None else None,
                "step_size": "the optimizer's learning rate at each step (momentum and adaptive scaling are not applied)",
                "influence_layers": [h.name for h in self.influence_scope.handlers],
                "self_influence_layers": [h.name for h in self.self_scope.handlers]}

    def state_dict(self) -> Dict[str, Any]:
        """The accumulators, to save beside a training checkpoint and resume with :meth:`load_state_dict`."""
        return {"self_influence": self.self_influence.cpu(), "seen": self.seen.cpu(), "steps": self.steps,
                "skipped": self.skipped, "matrix": self.matrix.cpu() if self.matrix is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        device = self.self_influence.device
        if tuple(state["self_influence"].shape) != (self.num_examples,):
            raise DataError(f"The saved in-run state is for {state['self_influence'].shape[0]} examples, not {self.num_examples}.")
        self.self_influence = state["self_influence"].to(device, torch.float64)
        self.seen = state["seen"].to(device, torch.long)
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        self.matrix = state["matrix"].to(device, torch.float64) if state.get("matrix") is not None else None
        self._query_factors = None

    def merge(self, other_state: Dict[str, Any]) -> None:
        """Add another recorder's state (another rank's examples of the same run): sums are exact."""
        self.self_influence += other_state["self_influence"].to(self.self_influence)
        self.seen += other_state["seen"].to(self.seen)
        if other_state.get("matrix") is not None:
            theirs = other_state["matrix"].to(self.self_influence)
            self.matrix = theirs if self.matrix is None else self.matrix + theirs


def chunk_size(chunk: Dict[str, Factors]) -> int:
    return next(iter(chunk.values())).batch_size if chunk else 0

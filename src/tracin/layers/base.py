"""What a layer handler is: one module in scope, its captured calls, and its factors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: handlers are below the factor kernels in no import chain
    from .factors import Factors
    from .precondition import Whitening


@dataclass
class Call:
    """One forward call of a module in scope: its positional inputs and, after backward,
    the gradient of the summed loss at its output ([B, ...], the output's shape)."""

    args: Tuple
    input_version: int
    delta: Optional[torch.Tensor] = None
    output_shape: Optional[torch.Size] = None
    part: int = 0  # which of the handler's sub-computations this call is (handlers that record several per forward)
    rows_dim: int = 0  # the output's dimension that runs over the examples

    @property
    def rows(self) -> Optional[int]:
        """How many rows (examples) the output has, or None for a scalar output."""
        shape = self.output_shape
        return int(shape[self.rows_dim]) if shape is not None and len(shape) > self.rows_dim else None


@dataclass
class Recorded:
    """One tensor whose gradient a handler needs (any ``capture``): the inputs ``args`` to keep with it and the
    ``output`` whose gradient becomes the call's delta; ``part`` says which of the handler's recorded tensors it is."""

    args: Tuple
    output: torch.Tensor
    part: int = 0
    rows_dim: int = 0  # the output's dimension that runs over the examples


@dataclass
class Rerun:
    """What a handler reads of one call of its module during capture (``capture = "rerun"``): ``parts``, the tensors
    whose gradients its kernel needs, and ``output``, the module's forward recomputed so that those tensors are on the
    path to the loss (it replaces the module's own output, which it must equal), or None when they already are (tensors
    of the module's own output)."""

    output: Any
    parts: List[Recorded]


Record = Callable[[Recorded], None]  # what the engine gives a "parameter" handler to record each use with


@dataclass
class LayerRun:
    """What one run asks of one layer handler, handed to :meth:`LayerHandler.factors` with every batch.

    mode: ``"ghost"`` or ``"materialize"``; None lets the handler choose from the shapes of the first
        batch and record its choice here, so the rest of the run keeps it. ``"exact"``: the handler's
        parameters are scored by per-example backward passes instead (set by the engine when the module's
        parameters turn out to be used outside its own forward pass, or broadcast across the batch).
    projector: a :class:`tracin.layers.projection.Projector` when gradients are projected.
    preconditioner: the :class:`tracin.layers.precondition.KFAC` that preconditions the layer in this run (its
        whiteners reach the handler with each batch as a ``Whitening``), or None.
    """

    mode: Optional[str] = None
    projector: Any = None
    preconditioner: Any = None


class LayerHandler:
    """Per-module capture and factor extraction. Subclasses set ``module_types``; handlers hold no
    per-run state (that travels in a :class:`LayerRun`).

    Attributes:
        name: the module's qualified name in the model.
        module: the module.
        param_names: its directly owned parameters in scope (those that require grad).
    """

    module_types: Tuple[type, ...] = ()
    modes: Tuple[str, ...] = ("materialize",)
    hooked = True  # the engine records the module's calls (not the exact fallback's per-example passes)
    # how the engine records them: "output": a forward hook keeps the inputs and the output's gradient; "rerun": the
    # handler reads each call (:meth:`rerun`) and names the tensors to record, among the module's outputs or in a
    # forward it recomputes from the module's own parameters (so that what the module computes functionally has
    # tensors to record); "parameter": the parameters themselves are expanded to the batch's rows while the batch runs
    # (:meth:`expanded`), so their gradient is per example
    capture = "output"
    kronecker: bool = False  # its gradients are sum_t d_t a_t^T with captured (A, D): K-FAC can precondition it
    # its factors stay exact when a call that ran once for the whole batch (output rows 1, broadcast over the batch
    # downstream, as an absolute position embedding is) has its output expanded to the batch's rows during capture,
    # so that the output gradient is per example (the engine checks on the first batch that the losses do not change)
    broadcast_rows: bool = False
    # its materialised per-example gradients ([B, P] in "materialize" mode) are laid out as its parameters are, so the
    # uses of a tied parameter can be summed (tracin.layers.tied)
    shares_layout: bool = False

    def __init__(self, name: str, module: nn.Module, param_names: List[str]):
        self.name = name
        self.module = module
        self.param_names = param_names
        self.check()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this handler scores ``module`` (by type, unless a subclass says otherwise)."""
        return isinstance(module, cls.module_types)

    def check(self) -> None:
        """Raise :class:`UnsupportedModuleError` for configurations without an exact kernel."""

    def parameters(self) -> List[torch.Tensor]:
        """The parameters in scope, in ``param_names`` order."""
        own = dict(self.module.named_parameters(recurse=False))
        return [own[n] for n in self.param_names]

    def full_names(self) -> List[str]:
        """The parameters' names in the model."""
        return [f"{self.name}.{n}" if self.name else n for n in self.param_names]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def uses(self) -> List[nn.Module]:
        """The modules whose calls the engine records for this handler (``capture = "output"``), in the order
        ``Call.part`` numbers them: the handler's own module, or every module sharing a tied parameter."""
        return [self.module]

    def in_scope(self, param: str) -> bool:
        return param in self.param_names

    def batch_gradients(self, calls: List[Call]) -> Optional[List[torch.Tensor]]:
        """The gradient of the summed loss for each parameter in scope (shaped like it) as this handler sees the
        batch: the sum of its per-example gradients. The engine compares it with autograd's gradient on the first
        batch; a difference means the parameters are also used outside the module's forward pass (a parent
        calling them functionally, a weight tied elsewhere, a broadcast). None: the handler cannot tell."""
        return None

    def rerun(self, args: Tuple, kwargs: Dict[str, Any], output: Any) -> Optional[Rerun]:
        """(``capture = "rerun"``) What to record of one call of the module (``args``, ``kwargs`` and its ``output``),
        or None when this call's form has no kernel (the engine then scores the parameters exactly)."""
        raise NotImplementedError

    def expanded(self, rows: int, record: Record) -> ContextManager[None]:
        """(``capture = "parameter"``) While inside, the parameters in scope read as ``rows`` rows each, every read
        handed to ``record`` (its output's gradient is then per example)."""
        raise NotImplementedError

    def factors(self, calls: List[Call], run: LayerRun, whitening: Optional["Whitening"] = None) -> Factors:
        """Factors for the batch from this module's captured calls (at least one), as ``run`` asks; ``whitening``: the
        loaded checkpoint's K-FAC whiteners for this batch's side of a pairing (used by handlers with ``kronecker``
        when ``run.preconditioner`` is set; others ignore it)."""
        raise NotImplementedError


def zero_delta_like(call: Call, reference: torch.Tensor) -> torch.Tensor:
    """The output gradient of a call whose output did not reach the loss: zeros."""
    assert call.output_shape is not None
    return reference.new_zeros(call.output_shape)

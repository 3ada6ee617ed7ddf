"""Capture: one forward and backward pass over a batch, recording each in-scope layer's inputs
and output-gradients, turned into per-layer factors.

The loss is the *sum* of the per-example losses, the model is in eval mode, so the gradient at a
layer's output for example i is exactly d loss_i / d output_i.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import DataError, TracInError
from ..layers.base import Call, LayerHandler, LayerRun, Recorded
from ..layers.factors import Factors, GradFactors
from ..layers.precondition import Whitening
from ..tasks.base import Batch, Task, first_tensor
from .loss_scale import scaled_deltas

EXACT = "exact"  # the LayerRun mode of parameters scored by per-example backward passes


def version(tensor: torch.Tensor) -> int:
    """A tensor's in-place version counter (shared by its views and ``detach()``), which PyTorch names only privately
    (``Tensor._version``): an in-place change of a recorded tensor shows as a new version."""
    return int(getattr(tensor, "_version"))


class BatchCapture:
    """Forward hooks on the in-scope modules, installed for the lifetime of the object; ``runs`` holds
    each handler's per-run settings (by layer name), handed to it with every batch."""

    def __init__(self, handlers: Sequence[LayerHandler], runs: Dict[str, LayerRun], precision: Optional[torch.dtype] = None):
        self.handlers = list(handlers)
        self.runs = runs
        # bf16: forward and backward under autocast, factors (and so the kernels) in bf16.
        # fp16: forward and backward under autocast with loss scaling, factors in fp32 (products of
        # fp16 factors over wide layers overflow and those of small gradients underflow).
        self.precision = precision
        self.loss_scaling = precision == torch.float16
        self.warned_flush = False
        self.calls: Dict[str, List[Call]] = {h.name: [] for h in self.handlers}
        self.outputs: Dict[str, List[Tuple[torch.Tensor, int]]] = {h.name: [] for h in self.handlers}
        self.active = False  # recording only during the task's forward pass
        self.checked = False  # each handler's summed gradient was compared with autograd's on a first batch
        self.rows = 0  # examples in the batch being recorded
        # broadcast outputs are expanded to the batch's rows (LayerHandler.broadcast_rows) once the first batch showed
        # that this leaves every loss unchanged: None until then, then True or False for the run
        self.expand: Optional[bool] = None
        self.verifying = False  # the first batch's pass that decides it
        self.expanded = False  # whether that pass expanded any output
        self.last_loss: Optional[torch.Tensor] = None  # the per-example losses of the last pass, detached
        self._hooks = [handle for h in self.handlers if h.hooked for handle in self._hooks_of(h)]

    def _hooks_of(self, handler: LayerHandler) -> List[torch.utils.hooks.RemovableHandle]:
        """Forward hooks on the handler's modules: each use's output gradient (``capture = "output"``) or the tensors the
        handler names of each call (``"rerun"``) become the handler's calls; broadcast parameters need none."""
        if handler.capture == "rerun":
            return [handler.module.register_forward_hook(self._rerun_hook(handler), with_kwargs=True)]
        if handler.capture == "parameter":
            return []
        return [module.register_forward_hook(self._hook(handler, part)) for part, module in enumerate(handler.uses())]

    def _hook(self, handler: LayerHandler, part: int):
        name = handler.name

        def hook(module: nn.Module, args: Tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            if not self.active:
                return None
            if not isinstance(output, torch.Tensor):
                raise TracInError(f"Module {name!r} returned {type(output).__name__}, not a tensor; it cannot be scored.")
            if not output.requires_grad:
                raise TracInError(f"Module {name!r} ran without autograd (torch.no_grad?); TracIn needs its gradients.")
            expanded = ((self.expand or self.verifying) and handler.broadcast_rows and self.rows > 1 and output.dim() > 0
                        and output.shape[0] == 1 and self.runs[name].mode != EXACT)
            if expanded:  # one row for the whole batch: give every example its own, so its output gradient is its own
                output = output.expand(self.rows, *output.shape[1:]).clone()
                self.expanded = True
            self._record(handler, Recorded(args, output, part))
            return output if expanded else None

        return hook

    def _rerun_hook(self, handler: LayerHandler):
        """The handler reads each call and names the tensors to record, among the module's outputs or in a forward it
        recomputes, which replaces the module's output once it is checked to be equal. A first batch whose call has no
        kernel (its form, or a recomputation that differs) leaves no calls, so the engine scores the parameters by
        exact passes; a later one is an error."""
        def hook(module: nn.Module, args: Tuple, kwargs: Dict, output) -> Optional[object]:
            if not self.active or self.runs[handler.name].mode == EXACT:
                return None
            rerun = handler.rerun(args, kwargs, output)
            differs = rerun is not None and rerun.output is not None and not same_output(rerun.output, output)
            if rerun is None or differs:
                if not self.checked:
                    return None
                if differs:
                    raise TracInError(f"Module {handler.name!r}'s forward pass, recomputed for its per-example gradients, "
                                      "differs from its own output on this batch; leave it out of layers (exclude=).")
                raise TracInError(f"Module {handler.name!r} was called in a form its kernel does not cover (e.g. a packed "
                                  "sequence) after a first batch that it did; leave it out of layers (exclude=).")
            if not all(part.output.requires_grad for part in rerun.parts):
                raise TracInError(f"Module {handler.name!r} ran without autograd (torch.no_grad?); TracIn needs its gradients.")
            for part in rerun.parts:
                self._record(handler, part)
            return rerun.output

        return hook

    def _record(self, handler: LayerHandler, recorded: Recorded) -> None:
        """Keep one call of ``handler``: its inputs (detached) and, after backward, the gradient at ``recorded.output``."""
        output = recorded.output
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in recorded.args)
        first = detached[0] if detached else None
        # detach() shares the version counter, so a later in-place change of the input shows.
        call = Call(args=detached, input_version=version(first) if isinstance(first, torch.Tensor) else 0,
                    output_shape=output.shape, part=recorded.part, rows_dim=recorded.rows_dim)

        def store(grad: torch.Tensor, call: Call = call) -> None:
            call.delta = grad

        # A hook registered now sees the gradient of this output even if a later in-place op
        # (ReLU(inplace=True), +=) rewrites the tensor.
        output.register_hook(store)
        self.calls[handler.name].append(call)
        self.outputs[handler.name].append((output, version(output)))

    def _expanded_parameters(self) -> contextlib.ExitStack:
        """While the batch runs: the broadcast parameters (``capture = "parameter"``) read as one row per example, once
        the first batch has shown (or is checking) that this leaves the losses as they are."""
        stack = contextlib.ExitStack()
        if self.expand or self.verifying:
            for handler in self.handlers:
                if handler.capture == "parameter" and self.runs[handler.name].mode != EXACT:
                    stack.enter_context(handler.expanded(self.rows, functools.partial(self._record_parameter, handler)))
        return stack

    def _record_parameter(self, handler: LayerHandler, recorded: Recorded) -> None:
        if self.active:
            self.expanded = self.expanded or self.rows > 1
            self._record(handler, recorded)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def reset(self) -> None:
        for name in self.calls:
            self.calls[name] = []
            self.outputs[name] = []

    def factors(self, model: nn.Module, task: Task, batch: Batch, what: str, first_index: int,
                raw: bool = False, whitening: Optional[Whitening] = None) -> Dict[str, Optional[Factors]]:
        """Per-layer factors for ``batch`` (``None`` for a layer the forward pass never reached);
        ``raw``: each layer's untransformed (A, D, bias in scope) instead, for fitting a preconditioner;
        ``whitening``: the loaded checkpoint's K-FAC whiteners on this batch's side, for preconditioned layers.
        Layers in ``"exact"`` mode get materialised per-example gradients from per-example backward passes."""
        if self._checking(raw):
            size, direct = self._expanding_pass(model, task, batch, (what, first_index))
        else:
            size, direct = self._pass(model, task, batch, (what, first_index), False)
        out: Dict[str, Optional[Factors]] = {}
        for handler in self.handlers:
            if handler.hooked:
                out[handler.name] = self._module_factors(handler, size, raw, whitening, direct)
        if direct is not None:
            self.checked = True
        self.reset()
        exact = [h for h in self.handlers if self.runs[h.name].mode == EXACT]
        if exact and not raw:
            out.update(self._exact_factors(model, task, batch, exact))
        return out

    def detect(self, model: nn.Module, task: Task, batch: Batch) -> None:
        """Decide on ``batch`` (ideally one of several examples) which modules must run exactly: those whose rows are
        not the examples, and those whose parameters are also used outside their forward pass. Scoring then keeps
        one kind of factors per layer for the whole run, even when its first scored batch holds a single example."""
        if not self._checking(raw=False):
            return
        size, direct = self._expanding_pass(model, task, batch, ("training", 0))
        for handler in self.handlers:
            if handler.hooked and self.runs[handler.name].mode != EXACT:
                self._decide(handler, size, direct)
        self.checked = True
        self.reset()

    def _expanding_pass(self, model: nn.Module, task: Task, batch: Batch, where: Tuple[str, int]):
        """The first batch's checked pass, deciding :attr:`expand`: broadcast outputs are expanded to the batch's rows
        for the run when that leaves every example's loss as it is (else the pass runs again without, and those
        modules take exact per-example passes)."""
        if self.expand is not None or not any(h.broadcast_rows for h in self.handlers):
            return self._pass(model, task, batch, where, True)
        with torch.no_grad():
            reference = self._loss(model, task, batch).detach()
        self.verifying, self.expanded = True, False
        try:
            size, direct = self._pass(model, task, batch, where, True)
            assert self.last_loss is not None
            # only what this batch showed is trusted: an expansion it made (of several rows) that changed no loss
            self.expand = bool(self.expanded and self.last_loss.shape == reference.shape
                               and torch.allclose(self.last_loss, reference, rtol=1e-5, atol=1e-7))
        except RuntimeError:  # the expanded output did not fit where the model used it
            self.expand = False
        finally:
            self.verifying = False
        return (size, direct) if self.expand else self._pass(model, task, batch, where, True)

    def _pass(self, model: nn.Module, task: Task, batch: Batch, where: Tuple[str, int], check: bool):
        """Forward with the hooks recording, the loss checked, (with ``check``) autograd's gradient of every hooked
        handler's parameters, and the backward pass that records each call's output gradient: (batch size, those
        gradients or None)."""
        self.reset()
        self.rows = task.batch_size(batch)
        with torch.enable_grad():
            self.active = True
            try:
                with self._expanded_parameters():
                    loss = self._loss(model, task, batch)
            finally:
                self.active = False
            size = self.rows
            self.last_loss = loss.detach()
            _check_loss(loss, size, *where)
            direct = self._direct_gradients(loss) if check else None
            targets, owners = self._grad_targets()
            if targets:
                self._differentiate(loss, targets, owners)
        return size, direct

    def _checking(self, raw: bool) -> bool:
        """Whether this batch checks each handler's summed gradient against autograd's (the first full-precision one)."""
        return not self.checked and not raw and self.precision is None and any(h.hooked for h in self.handlers)

    def _direct_gradients(self, loss: torch.Tensor) -> Optional[Dict[str, List[Optional[torch.Tensor]]]]:
        """Autograd's gradient of the summed loss for each hooked handler's parameters (the graph is kept)."""
        hooked = [h for h in self.handlers if h.hooked and self.runs[h.name].mode != EXACT]
        params = [p for h in hooked for p in h.parameters()]
        try:
            grads = iter(torch.autograd.grad(loss.sum(), params, allow_unused=True, retain_graph=True)) if params else iter(())
        except RuntimeError:  # e.g. an input rewritten in place: the per-module checks below name the problem
            self.checked = True
            return None
        return {h.name: [next(grads) for _ in h.param_names] for h in hooked}

    def _module_factors(self, handler: LayerHandler, size: int, raw: bool, whitening: Optional[Whitening],
                        direct: Optional[Dict[str, List[Optional[torch.Tensor]]]]) -> Optional[Factors]:
        """One hooked module's factors from its recorded calls (raw, or transformed with ``whitening`` where the run
        preconditions it), or None when it did not run (or runs exactly)."""
        calls = self.calls[handler.name]
        run = self.runs[handler.name]
        if run.mode == EXACT or not self._decide(handler, size, direct) or not calls:
            return None
        if self.precision is not None:
            self._cast_calls(calls)
        with torch.no_grad():
            return handler.ghost_factors(calls) if raw else handler.factors(calls, run, whitening)

    def _decide(self, handler: LayerHandler, size: int, direct: Optional[Dict[str, List[Optional[torch.Tensor]]]]) -> bool:
        """Whether the handler's kernel can score this batch; if not, switch it to exact per-example passes."""
        calls, run = self.calls[handler.name], self.runs[handler.name]
        if not calls:  # not reached; but if its parameters still got gradient, they are used elsewhere (functionally)
            if direct is not None and any(g is not None and bool(g.ne(0).any()) for g in direct.get(handler.name, [])):
                self._go_exact(handler, run, None, size, first=True)
                return False
            return True
        _check_inputs_unchanged(handler, calls)
        rows = [c.rows for c in calls if c.rows is not None]
        mismatch = next((r for r in rows if r != size), None)
        if mismatch is not None or (direct is not None and not sums_agree(handler, calls, direct.get(handler.name))):
            self._go_exact(handler, run, mismatch, size, first=direct is not None)
            return False
        return True

    def _go_exact(self, handler: LayerHandler, run: LayerRun, mismatch: Optional[int], size: int, first: bool) -> None:
        """Score ``handler``'s parameters by per-example backward passes from now on: its module ran on rows that are
        not the examples (a broadcast), or its parameters are also used outside its forward pass. On the run's first
        batch (``first``) nothing was scored with the handler's kernel yet, so the switch is always possible."""
        why = (f"ran on {mismatch} rows for a batch of {size} examples" if mismatch is not None
               else "has parameters that are also used outside its forward pass")
        if (run.mode is not None and not first) or run.preconditioner is not None:
            raise TracInError(
                f"Module {handler.name!r} {why}, so its per-example gradients need exact per-example passes, but this run "
                f"already {'preconditions it with K-FAC' if run.preconditioner is not None else 'scored it with its kernel'}; "
                "leave it out of layers (exclude=), or score with more than one example in the first batch (a test set "
                "of one example: add a second)."
            )
        run.mode = EXACT

    def _cast_calls(self, calls: List[Call]) -> None:
        factor_dtype = torch.float32 if self.loss_scaling else self.precision
        for call in calls:
            call.args = tuple(a.to(factor_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                              for a in call.args)
            if call.delta is not None:
                call.delta = call.delta.to(factor_dtype)

    def _exact_factors(self, model: nn.Module, task: Task, batch: Batch, handlers: List[LayerHandler]) -> Dict[str, Factors]:
        """Materialised per-example gradients of the exact handlers' parameters, one backward pass per example."""
        params = [p for h in handlers for p in h.parameters()]
        G = per_example_gradients(model, task, batch, params)
        out: Dict[str, Factors] = {}
        start = 0
        for h in handlers:
            factors = GradFactors(G[:, start:start + h.num_params])
            start += h.num_params
            projector = self.runs[h.name].projector
            out[h.name] = projector.grads(h.name, factors) if projector is not None else factors
        return out

    def _loss(self, model: nn.Module, task: Task, batch: Batch) -> torch.Tensor:
        """The task's per-example losses [B] (under autocast for bf16/fp16); a dtype clash between the model and
        the batch is one clear error."""
        param = next(model.parameters())
        try:
            if self.precision is not None:
                with torch.autocast(device_type=param.device.type, dtype=self.precision):
                    return task.loss(model, batch).float()
            return task.loss(model, batch)
        except RuntimeError as exc:
            text = str(exc)
            if not any(s in text for s in ("dtype", "scalar type", "Input type", "same type")):
                raise
            data = first_tensor(batch)
            raise DataError(f"The model's parameters are {param.dtype} but the batch's inputs are "
                            f"{data.dtype if data is not None else 'not tensors'}; convert one to the other "
                            "(e.g. model.float() or inputs.float()).") from None

    def _differentiate(self, loss: torch.Tensor, targets: List[torch.Tensor], owners: List[Optional[Call]]) -> None:
        """Backward from the per-example losses [B] to ``targets``, setting every call's delta (with fp16:
        per-example loss-scaled passes, each example's rows from its best pass, unscaled, in fp32)."""
        if not self.loss_scaling:
            self._backward(loss.sum(), targets, owners)
            return
        calls = [c for group in self.calls.values() for c in group]
        flushed = scaled_deltas(loss, calls, lambda total: self._backward(total, targets, owners, retain_graph=True))
        if flushed and not self.warned_flush:
            self.warned_flush = True
            warnings.warn(f"fp16: the output-gradients of {flushed} example(s) of a batch stayed 0 at every loss scale tried "
                          "(their losses are tiny but not 0), so their scores read 0; use --precision bf16 or fp32 where small "
                          "influences matter.")

    @staticmethod
    def _backward(total: torch.Tensor, targets: List[torch.Tensor], owners: List[Optional[Call]], retain_graph: bool = False) -> None:
        """Differentiate ``total`` w.r.t. ``targets``; each owned target's gradient becomes its call's delta
        (the others' deltas are recorded by the hooks on their outputs)."""
        for grad, owner in zip(torch.autograd.grad(total, targets, allow_unused=True, retain_graph=retain_graph), owners):
            if owner is not None and grad is not None:
                owner.delta = grad

    def _grad_targets(self) -> Tuple[List[torch.Tensor], List[Optional[Call]]]:
        """What to differentiate: each call's output when it is unchanged (its gradient is the
        delta), else the module's in-scope parameters (the registered hook then records the delta)."""
        targets: List[torch.Tensor] = []
        owners: List[Optional[Call]] = []
        for handler in self.handlers:
            rewritten = False
            for call, (output, recorded) in zip(self.calls[handler.name], self.outputs[handler.name]):
                if version(output) == recorded:
                    targets.append(output)
                    owners.append(call)
                else:
                    rewritten = True
            if rewritten:
                params = dict(handler.module.named_parameters(recurse=False))
                for pname in handler.param_names:
                    targets.append(params[pname])
                    owners.append(None)
        return targets, owners


def per_example_gradients(model: nn.Module, task: Task, batch: Batch, params: List[torch.Tensor]) -> torch.Tensor:
    """[B, P]: each example's gradient of its own loss with respect to ``params`` (flattened, concatenated), by
    one forward and backward pass per example (``task.example(batch, i)``): exact for any model."""
    size = task.batch_size(batch)
    rows = []
    for i in range(size):
        loss = task.loss(model, task.example(batch, i))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TracInError(f"The task's loss on a single example has shape {tuple(getattr(loss, 'shape', ()))}; it must "
                              "return one loss per example, and task.example(batch, i) must give a batch of that one example.")
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows).detach()


def _check_loss(loss: torch.Tensor, size: int, what: str, first_index: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.shape != (size,):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TracInError(
            f"The task's loss has shape {shape} for a batch of {size}; it must return one unreduced loss per example "
            "(e.g. reduction='none')."
        )
    bad = ~torch.isfinite(loss.detach())
    if bad.any():
        where = (bad.nonzero().flatten()[:5] + first_index).tolist()
        raise DataError(
            f"The loss is NaN or infinite for {what} example(s) {where}; check those inputs and labels and that the "
            "checkpoint's weights are finite."
        )


def _check_inputs_unchanged(handler: LayerHandler, calls: List[Call]) -> None:
    for call in calls:
        first = call.args[0] if call.args else None
        if isinstance(first, torch.Tensor) and version(first) != call.input_version:
            raise TracInError(
                f"The input of module {handler.name!r} was modified in place after the module ran, so its recorded "
                "activations are wrong; make the op after it out-of-place (e.g. inplace=False)."
            )


def sums_agree(handler: LayerHandler, calls: List[Call], direct: Optional[List[Optional[torch.Tensor]]],
               floor: float = 0.0) -> bool:
    """Whether the sum of the handler's per-example gradients equals autograd's batch gradient (parameters used only
    inside the module's recorded calls); True when the handler cannot tell. ``floor``: a norm below which a
    parameter's difference is rounding (a bias whose true gradient is 0, behind a batch-normalising layer)."""
    with torch.no_grad():
        summed = handler.batch_gradients(calls)
    if summed is None or direct is None:
        return True
    for ours, theirs in zip(summed, direct):
        theirs = torch.zeros_like(ours) if theirs is None else theirs
        scale = max(float(ours.norm()), float(theirs.norm()), floor)
        if float((ours - theirs).norm()) > 1e-3 * scale + 1e-9:
            return False
    return True


def same_output(recomputed: object, original: object) -> bool:
    """Whether a recomputed forward output equals the module's own: every tensor of it (a tuple's None kept as None)
    to a relative 1e-4 in float32 and float64, 5e-2 in half precision."""
    if isinstance(original, torch.Tensor):
        if not isinstance(recomputed, torch.Tensor) or recomputed.shape != original.shape:
            return False
        tolerance = 1e-4 if original.dtype in (torch.float32, torch.float64) else 5e-2
        scale = float(original.detach().abs().max()) if original.numel() else 0.0
        return original.numel() == 0 or float((recomputed.detach() - original.detach()).abs().max()) <= tolerance * max(scale, 1e-12)
    if isinstance(original, (tuple, list)):
        return isinstance(recomputed, (tuple, list)) and len(recomputed) == len(original) and all(
            same_output(r, o) for r, o in zip(recomputed, original))
    return recomputed is None and original is None

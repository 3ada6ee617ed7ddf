"""Capture: one forward and backward pass over a batch, recording each in-scope layer's inputs
and output-gradients, turned into per-layer factors.

The loss is the *sum* of the per-example losses, the model is in eval mode, so the gradient at a
layer's output for example i is exactly d loss_i / d output_i.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import DataError, TracInError
from .layers import Call, Factors, LayerHandler
from .tasks import Batch, Task


class BatchCapture:
    """Forward hooks on the in-scope modules, installed for the lifetime of the object."""

    def __init__(self, handlers: Sequence[LayerHandler], precision: Optional[torch.dtype] = None):
        self.handlers = list(handlers)
        self.precision = precision  # bf16/fp16: forward under autocast, factors in that dtype
        self.calls: Dict[str, List[Call]] = {h.name: [] for h in self.handlers}
        self.outputs: Dict[str, List[Tuple[torch.Tensor, int]]] = {h.name: [] for h in self.handlers}
        self.active = False  # recording only during the task's forward pass
        self._hooks = [h.module.register_forward_hook(self._hook(h.name)) for h in self.handlers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Tuple, output: torch.Tensor) -> None:
            if not self.active:
                return
            if not isinstance(output, torch.Tensor):
                raise TracInError(f"Module {name!r} returned {type(output).__name__}, not a tensor; it cannot be scored.")
            if not output.requires_grad:
                raise TracInError(f"Module {name!r} ran without autograd (torch.no_grad?); TracIn needs its gradients.")
            detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            first = detached[0] if detached else None
            # detach() shares the version counter, so a later in-place change of the input shows.
            call = Call(args=detached, input_version=first._version if isinstance(first, torch.Tensor) else 0,
                        output_shape=output.shape)

            def store(grad: torch.Tensor, call: Call = call) -> None:
                call.delta = grad

            # A hook registered now sees the gradient of this output even if a later in-place op
            # (ReLU(inplace=True), +=) rewrites the tensor.
            output.register_hook(store)
            self.calls[name].append(call)
            self.outputs[name].append((output, output._version))

        return hook

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def reset(self) -> None:
        for name in self.calls:
            self.calls[name] = []
            self.outputs[name] = []

    def factors(self, model: nn.Module, task: Task, batch: Batch, what: str, first_index: int,
                raw: bool = False) -> Dict[str, Optional[Factors]]:
        """Per-layer factors for ``batch`` (``None`` for a layer the forward pass never reached);
        ``raw``: each layer's untransformed (A, D, bias in scope) instead, for fitting a preconditioner."""
        self.reset()
        with torch.enable_grad():
            self.active = True
            try:
                if self.precision is not None:
                    device = next(model.parameters()).device.type
                    with torch.autocast(device_type=device, dtype=self.precision):
                        loss = task.loss(model, batch).float()
                else:
                    loss = task.loss(model, batch)
            finally:
                self.active = False
            size = task.batch_size(batch)
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
            targets, owners = self._grad_targets()
            if targets:
                grads = torch.autograd.grad(loss.sum(), targets, allow_unused=True)
                for grad, owner in zip(grads, owners):
                    if owner is not None and grad is not None:
                        owner.delta = grad
        out: Dict[str, Optional[Factors]] = {}
        for handler in self.handlers:
            calls = self.calls[handler.name]
            if not calls:
                out[handler.name] = None
                continue
            for call in calls:
                first = call.args[0]
                if isinstance(first, torch.Tensor) and first._version != call.input_version:
                    raise TracInError(
                        f"The input of module {handler.name!r} was modified in place after the module ran, so its recorded "
                        "activations are wrong; make the op after it out-of-place (e.g. inplace=False)."
                    )
            if self.precision is not None:
                for call in calls:
                    call.args = tuple(a.to(self.precision) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                      for a in call.args)
                    if call.delta is not None:
                        call.delta = call.delta.to(self.precision)
            rows = [c.output_shape[0] for c in calls if c.output_shape is not None and len(c.output_shape)]
            mismatch = next((r for r in rows if r != size), None)
            try:
                with torch.no_grad():
                    out[handler.name] = handler.ghost_factors(calls) if raw else handler.factors(calls)  # its own, more specific checks come first
            except RuntimeError:
                if mismatch is None:
                    raise
            if mismatch is not None:
                raise TracInError(
                    f"Module {handler.name!r} ran on {mismatch} rows for a batch of {size} examples, so its rows are not the "
                    "examples and per-example gradients cannot be read from it; keep the batch as each scored module's "
                    "first dimension, or leave the module out of layers."
                )
        self.reset()
        return out

    def _grad_targets(self) -> Tuple[List[torch.Tensor], List[Optional[Call]]]:
        """What to differentiate: each call's output when it is unchanged (its gradient is the
        delta), else the module's in-scope parameters (the registered hook then records the delta)."""
        targets: List[torch.Tensor] = []
        owners: List[Optional[Call]] = []
        for handler in self.handlers:
            rewritten = False
            for call, (output, version) in zip(self.calls[handler.name], self.outputs[handler.name]):
                if output._version == version:
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

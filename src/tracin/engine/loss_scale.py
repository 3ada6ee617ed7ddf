"""fp16 capture: each example's loss gets its own power-of-two scale in the backward pass, so that its recorded output
gradients sit inside fp16's range whatever the others' size (:class:`LossScale`, :func:`scaled_deltas`)."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from ..errors import TracInError
from ..layers.base import Call


class LossScale:
    """Per-example loss scaling for fp16 backward passes.

    fp16 keeps 5 exponent bits: output-gradients of well-fit examples (often 1e-6 and smaller) flush
    to zero in an fp16 backward pass, while those of badly-fit examples in the same batch are ~1. As
    examples are independent in eval mode, each example's loss gets its own power-of-two scale,
    aiming its largest recorded output-gradient at 2^14 (a quarter of fp16's largest number). The
    first scale is guessed from the loss (for cross-entropy the logit gradient is about min(loss, 1);
    capped at 2^24); later passes raise the scales of examples far below the target and lower those
    that overflowed (an intermediate gradient can overflow while the recorded ones look small), never
    back up to a scale that overflowed. Each example keeps the rows of its best finite pass.
    """

    TARGET = 2.0 ** 14
    SLACK = 2.0 ** 10  # an example is redone while its largest gradient is below TARGET / SLACK
    PASSES = 4

    def __init__(self, loss: torch.Tensor):
        guess = loss.detach().float().abs().clamp(2.0 ** -10, 1.0)
        self.scales = torch.exp2(torch.floor(torch.log2(self.TARGET / guess)))  # [B]
        self.ceiling = torch.full_like(self.scales, float("inf"))  # lowest scale that overflowed
        self.best = torch.full_like(self.scales, -1.0)  # largest gradient of each example's kept pass (-1: none)

    def update(self, largest: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """Given this pass's [B] largest scaled gradients: which examples to keep from it, and whether
        another pass is worth running (the scales are moved for it)."""
        finite = torch.isfinite(largest)
        keep = finite & (largest > self.best)
        self.best = torch.where(keep, largest, self.best)
        self.ceiling = torch.where(finite, self.ceiling, torch.minimum(self.ceiling, self.scales))
        low = finite & (largest < self.TARGET / self.SLACK) & (self.scales * 2 < self.ceiling)
        redo = ~finite | low
        up = torch.exp2(torch.floor(torch.log2(self.TARGET / largest.clamp_min(self.TARGET * 2.0 ** -24))))
        moved = torch.where(finite, torch.minimum(self.scales * up, self.ceiling / 2), self.scales * 2.0 ** -16)
        self.scales = torch.where(redo, moved, self.scales)
        return keep, bool(redo.any())


def scaled_deltas(loss: torch.Tensor, calls: List[Call], backward: Callable[[torch.Tensor], None]) -> int:
    """Loss-scaled backward passes from the per-example losses [B] (``backward(total)`` sets the calls' deltas; the graph
    is kept between passes) until every example's largest recorded output gradient is near :attr:`LossScale.TARGET`;
    each call's delta becomes its examples' rows from their best pass, unscaled, in fp32. Returns how many examples
    with a loss other than 0 kept gradients of 0 at every scale (their scores read 0)."""
    scale = LossScale(loss)
    size = loss.shape[0]
    kept: Dict[int, torch.Tensor] = {}
    for _ in range(LossScale.PASSES):
        scales = scale.scales
        for c in calls:
            c.delta = None
        backward((loss * scales).sum())
        rows = {i: c.delta.movedim(c.rows_dim, 0) for i, c in enumerate(calls)
                if c.delta is not None and c.delta.dim() > c.rows_dim and c.delta.shape[c.rows_dim] == size}
        largest = torch.stack([d.detach().float().abs().reshape(size, -1).amax(1) for d in rows.values()]).amax(0) \
            if rows else torch.zeros_like(scales)
        keep, again = scale.update(largest)
        for i, d in rows.items():  # examples first (movedim), put back below
            per_row = (-1,) + (1,) * (d.dim() - 1)  # a [B] vector broadcast over d's rows
            unscaled = d.float() / scales.view(per_row)
            kept[i] = unscaled if i not in kept else torch.where(keep.view(per_row), unscaled, kept[i])
        if not again:
            break
    if bool((scale.best < 0).any()):
        raise TracInError("Output-gradients are not finite in fp16 at any loss scale tried (an overflow, or an infinite or NaN "
                          "gradient of the loss); use --precision bf16 or fp32.")
    for i, d in kept.items():
        calls[i].delta = d.movedim(0, calls[i].rows_dim)
    return int(((scale.best == 0) & (loss.detach() != 0)).sum())

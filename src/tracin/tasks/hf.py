"""Hugging Face models: a per-example loss from the logits and ``labels`` of dict batches.

Batches are what a Hugging Face collator or a ``datasets.Dataset`` with ``set_format("torch")`` yields: a dict
of tensors (``input_ids``, ``attention_mask``, ..., ``labels``). The model is called with every entry except
``labels``; the loss comes from its logits:

* sequence classification (logits [B, C], labels [B]): cross-entropy per example;
* token classification (logits [B, T, C], labels [B, T]) and causal language modelling (logits [B, T, V], the
  labels shifted by one as the model's own loss shifts them): the per-token cross-entropy, positions labelled
  -100 ignored, summed per example (``reduction="sum"``, the contribution of the example to a summed training
  loss) or averaged over its tokens (``reduction="mean"``).

``kind="auto"`` reads which from the shapes and the model class (``...ForCausalLM`` / ``...LMHeadModel`` shift).
A causal language-model batch without ``labels`` uses ``input_ids`` (padding, where ``attention_mask`` is 0,
ignored).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ..errors import DataError, TracInError
from .base import Batch, Task

KINDS = ("auto", "sequence", "token", "causal_lm")
IGNORE = -100


class HFTask(Task):
    """Per-example loss of a Hugging Face model on dict batches (see the module docstring)."""

    def __init__(self, kind: str = "auto", reduction: str = "sum"):
        if kind not in KINDS:
            raise TracInError(f"kind={kind!r} is not one of {', '.join(KINDS)}.")
        if reduction not in ("sum", "mean"):
            raise TracInError(f"reduction={reduction!r} is not one of sum, mean.")
        self.kind, self.reduction = kind, reduction

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if not isinstance(batch, Mapping):
            raise DataError(f"A Hugging Face task needs dict batches (input_ids, attention_mask, ..., labels), got a "
                            f"{type(batch).__name__}; use a collator or datasets' set_format('torch').")
        kind = self.kind if self.kind != "auto" else _causal_or(model, None)
        labels = self._labels(batch, kind)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        try:
            output = model(**inputs)
        except TypeError as exc:
            if not any(str(k) in str(exc) for k in inputs) and "argument" not in str(exc):
                raise
            raise DataError(f"Dict batches are scored as Hugging Face inputs, model(**batch) without 'labels', and this "
                            f"model does not take them ({exc}); pass task= (a Task, or a callable (model, batch) -> "
                            "per-example loss) for another model.") from None
        logits = getattr(output, "logits", None)
        if logits is None:
            logits = output[0] if isinstance(output, (tuple, list)) else output
        kind = kind or ("sequence" if logits.dim() == 2 else "token")
        if kind == "sequence":
            return F.cross_entropy(logits, labels, reduction="none")
        if kind == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return self._per_token(logits, labels)

    def _labels(self, batch: Mapping, kind: Optional[str]) -> torch.Tensor:
        labels = batch.get("labels")
        if labels is None and kind == "causal_lm" and "input_ids" in batch:
            labels = batch["input_ids"]
            mask = batch.get("attention_mask")
            labels = labels.masked_fill(mask == 0, IGNORE) if mask is not None else labels
        if labels is None:
            raise DataError("The dict batch has no 'labels' entry, so it cannot be scored as Hugging Face inputs; add the "
                            "labels under 'labels', or pass task= (a callable (model, batch) -> per-example loss).")
        return labels

    def _per_token(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, T] (-100 ignored), summed or averaged per example -> [B]."""
        B = logits.shape[0]
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                    reduction="none").view(B, -1)
        if self.reduction == "sum":
            return per_token.sum(1)
        return per_token.sum(1) / (labels.reshape(B, -1) != IGNORE).sum(1).clamp_min(1)

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        return labels if labels is not None and labels.dim() == 1 else None


def causal_name(name: str) -> bool:
    """Whether a Hugging Face model class name (``GPT2LMHeadModel``, ``LlamaForCausalLM``) is a causal language model."""
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _causal_or(model: torch.nn.Module, default: Optional[str]) -> Optional[str]:
    """"causal_lm" for Hugging Face causal language models (by class name), else ``default``."""
    return "causal_lm" if causal_name(type(model).__name__) else default

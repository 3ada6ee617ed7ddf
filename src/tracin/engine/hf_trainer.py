"""In-run TracIn inside ``transformers.Trainer``: :class:`InRunTrainer` is the Trainer with a recorder.

Replace ``Trainer(...)`` with ``InRunTrainer(..., in_run={"queries": test_set})`` (any :class:`InRunConfig` field
beside ``queries``); after ``trainer.train()``, ``trainer.recorder.result()`` holds the self-influence of every
training example and the queries' top-k proponents and opponents, summed over every optimisation step.

What it changes: the training dataset gains an ``index`` column (the example's position; kept from the model's
inputs), and the training loss is computed per example by :class:`tracin.tasks.hf.HFTask` (cross-entropy on the
label for a sequence classifier, the summed token losses for a language model) and reduced as the Trainer reduces it:
the mean over the batch, or the sum over ``num_items_in_batch`` tokens for a language model. The Trainer then scales
and backpropagates that loss as usual (gradient accumulation, mixed precision); the recorder reads how much from the
gradient that reaches it, and records each micro-batch right after its backward pass, at the weights it was computed
at. Evaluation and prediction are the Trainer's own.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch
from transformers import Trainer

from ..errors import TracInError
from ..tasks.hf import HFTask, causal_name
from .inrun import InRun
from .loaders import Indexed

INDEX = "index"


class InRunTrainer(Trainer):
    """``transformers.Trainer`` recording in-run TracIn (see the module docstring). ``in_run``: the recorder's keywords
    (``queries``, and :class:`tracin.engine.inrun.InRunConfig` fields such as ``layers``, ``top_k``,
    ``query_every``, ``precondition``)."""

    def __init__(self, *args: Any, in_run: Optional[Dict[str, Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.train_dataset is None:
            raise TracInError("InRunTrainer records the training examples: give it a train_dataset.")
        self.train_dataset = _with_index(self.train_dataset)
        self.in_run_settings = dict(in_run or {})
        kind = "causal_lm" if causal_name(type(self.model).__name__) else "sequence"
        self.in_run_task = HFTask(kind, reduction="sum")
        self.recorder: Optional[InRun] = None

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.recorder is None:
            settings = dict(self.in_run_settings)
            self.recorder = InRun(self.model, optimizer, len(self.train_dataset), task=self.in_run_task, **settings)
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        """The columns the Trainer keeps: the model's forward arguments and the label names, as the Trainer takes them,
        and ``index``."""
        if self._signature_columns is None:
            forward = list(inspect.signature(self.model.forward).parameters)
            self._signature_columns = list(dict.fromkeys(forward + ["label", "label_ids", *self.label_names, INDEX]))

    def train(self, *args: Any, **kwargs: Any):
        output = super().train(*args, **kwargs)
        if self.recorder is None or (self.recorder.steps == 0 and self.state.global_step > 0):
            raise TracInError("InRunTrainer trained without recording a step: its batches did not carry the examples' "
                              "index (this transformers version keeps columns differently); record with tracin.InRun "
                              "in your own loop instead.")
        return output

    def compute_loss(self, model: torch.nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        ids = inputs.pop(INDEX, None)
        if return_outputs or ids is None or not model.training or self.recorder is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        losses = self.in_run_task.loss(model, inputs)  # [B]: each example's own loss
        if self.in_run_task.kind == "causal_lm":
            tokens = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"][:, 1:] != -100).sum()
            per_example = 1.0 / max(float(tokens), 1.0)
        else:
            per_example = 1.0 / losses.shape[0]
        loss = losses.sum() * per_example
        self.recorder.expect(loss, ids, per_example)
        return loss

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        if self.recorder is not None:
            self.recorder.flush()  # the micro-batch's backward has run; the optimizer has not stepped yet
        return loss


def _with_index(dataset: Any) -> Any:
    """The training set with each example's position under ``index``: a ``datasets.Dataset`` gains the column, any
    other map-style dataset of dicts is wrapped."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "add_column"):
        return dataset if INDEX in dataset.column_names else dataset.add_column(INDEX, list(range(len(dataset))))
    return Indexed(dataset)

"""Training an image classifier with checkpoints that carry everything later commands need."""
from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...checkpoints import save_checkpoint
from ...io import write_csv, write_figure
from .training_data import ImageTraining, TrainingData, training_data, validation_split  # noqa: F401 - re-exported

from ...errors import DataError, TracInError
from .models import build_model, load_pretrained
from ..results_dir import LOCK, folder_lock

CHECKPOINT_PATTERN = "checkpoint_epoch_*"


@dataclass
class TrainSummary:
    checkpoints: List[Path]
    best_model: Path
    best_test_accuracy: float
    log_csv: Path
    curve_png: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


LR_SCHEDULES = ("constant", "cosine")


def epoch_learning_rates(base: float, epochs: int, schedule: str) -> List[float]:
    """The learning rate of each epoch 1..``epochs``: ``base`` throughout (``constant``), or
    ``base * (1 + cos(pi * (e - 1) / epochs)) / 2`` for epoch e (``cosine``: ``base`` in the first
    epoch, decaying towards 0)."""
    if schedule not in LR_SCHEDULES:
        raise TracInError(f"--lr_schedule {schedule} is not one of {', '.join(LR_SCHEDULES)}; pick one of them.")
    if schedule == "constant":
        return [base] * epochs
    return [base * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2 for e in range(1, epochs + 1)]


def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device):
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


OPTIMIZERS = ("sgd", "adamw")


def _optimizer(model: nn.Module, training: "ImageTraining") -> torch.optim.Optimizer:
    if training.optimizer not in OPTIMIZERS:
        raise TracInError(f"--optimizer {training.optimizer} is not one of {', '.join(OPTIMIZERS)}.")
    if training.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=training.momentum,
                           weight_decay=training.weight_decay)


def _check(training: "ImageTraining") -> None:
    if training.epochs < 1 or training.save_every < 1 or training.batch_size < 1 or training.image_size < 8:
        raise TracInError("--epochs, --save_every and --batch_size must be at least 1 and --image_size at least 8.")
    if not training.learning_rate > 0:
        raise TracInError(f"--learning_rate must be positive, got {training.learning_rate}.")


@dataclass
class _Loop:
    """What takes the optimisation steps: the model, its optimizer, the device, and the in-run recorder (or None)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    recorder: Any = None  # a tracin.engine.inrun.InRun with --in_run


def _one_epoch(loop: _Loop, loader: DataLoader, epoch: int) -> int:
    """One pass of optimisation steps (recorded by the loop's recorder when it has one); returns how many were taken."""
    loop.model.train()
    steps = 0
    for ids, x, y in loader:
        x, y = x.to(loop.device), y.to(loop.device)
        loop.opt.zero_grad()
        losses = nn.functional.cross_entropy(loop.model(x), y, reduction="none")
        loss = loop.recorder.backward(losses, ids) if loop.recorder is not None else _backward(losses)
        if not torch.isfinite(loss):
            raise DataError(f"The training loss became {float(loss)} at epoch {epoch}; lower --learning_rate.")
        loop.opt.step()
        steps += 1
    return steps


def _backward(losses: torch.Tensor) -> torch.Tensor:
    loss = losses.mean()
    loss.backward()
    return loss.detach()


def train_image_classifier(data_dir: Path, checkpoint_dir: Path, training: ImageTraining,
                           device: torch.device = torch.device("cpu"), progress: bool = True) -> TrainSummary:
    """Train as ``training`` says: SGD with momentum (or AdamW) at a constant learning rate, or one that follows
    :func:`epoch_learning_rates` (``lr_schedule="cosine"``); a checkpoint every ``save_every`` epochs and after the
    last one, each with weights, epoch, step, class names, architecture, image size, the held-out validation files and
    the learning rate TracIn weights it by: the mean rate of the epochs since the previous checkpoint. ``augment``
    applies to the optimisation steps only; accuracies are measured on the plain images. ``val_fraction`` of each
    class is held out (never trained on, and left out of influence scoring) to choose ``best_model.pt`` by
    validation accuracy; with 0, best_model.pt is the last epoch's. The test set chooses nothing. Writes
    ``training_log.csv`` and ``training_curve.png`` too."""
    _check(training)
    rates = epoch_learning_rates(training.learning_rate, training.epochs, training.lr_schedule)  # checked before any work
    seed_everything(training.seed)
    data = training_data(data_dir, training)
    model = build_model(training.arch, len(data.classes), training.image_size)
    if training.pretrained is not None:
        load_pretrained(model, Path(training.pretrained))
    model.to(device)
    loop = _Loop(model, _optimizer(model, training), device)
    if training.in_run is not None:
        from .in_run import in_run_recorder, write_in_run

        loop.recorder = in_run_recorder(model, loop.opt, data, training)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    lock = folder_lock(checkpoint_dir / LOCK)  # a second run into this folder is refused, never mixed in
    try:
        started = time.perf_counter()
        summary = _epochs(loop, data, checkpoint_dir, training, rates, progress)
        if loop.recorder is not None:
            write_in_run(loop.recorder, data, training, summary.best_model, time.perf_counter() - started)
        return summary
    finally:
        if lock is not None:
            lock.close()


def _epochs(loop: _Loop, data: TrainingData, checkpoint_dir: Path, training: ImageTraining, rates: List[float],
            progress: bool) -> TrainSummary:
    """The epochs of :func:`train_image_classifier` at ``rates`` (one per epoch), its checkpoints and log, with the
    checkpoint folder locked."""
    meta = {"class_names": data.classes, "arch": training.arch, "image_size": training.image_size, "seed": training.seed,
            "augment": training.augment, "lr_schedule": training.lr_schedule, "optimizer": training.optimizer,
            "validation_files": data.validation_files, "run_id": uuid.uuid4().hex}  # discovery refuses mixed runs
    model, opt, device = loop.model, loop.opt, loop.device
    rows, saved, best, step, last_saved = [], [], (-1.0, 0.0), 0, 0
    for epoch in tqdm(range(1, training.epochs + 1), desc="training", unit="epoch", disable=not progress):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = rates[epoch - 1]
        step += _one_epoch(loop, data.steps, epoch)
        row = {"epoch": epoch}
        for name, loader in data.measure.items():
            row[f"{name}_loss"], row[f"{name}_accuracy"] = _evaluate(model, loader, device)
        rows.append({**row, "learning_rate": rates[epoch - 1], "seconds": time.perf_counter() - start})
        if epoch % training.save_every == 0 or epoch == training.epochs:
            span = rates[last_saved:epoch]  # the step sizes of the epochs this checkpoint stands for
            interval_rate = span[0] if len(set(span)) == 1 else float(np.mean(span))
            state = {"optimizer_state_dict": opt.state_dict()} if training.optimizer == "adamw" else {}
            saved.append(save_checkpoint(checkpoint_dir / f"checkpoint_epoch_{epoch}.pt", model.state_dict(),
                                         learning_rate=interval_rate, epoch=epoch, step=step, **meta, **state))
            last_saved = epoch
        chooser = row.get("val_accuracy", float(epoch))  # without a validation split: the latest epoch
        if chooser > best[0]:
            best = (chooser, row["test_accuracy"])
            save_checkpoint(checkpoint_dir / "best_model.pt", model.state_dict(), learning_rate=rates[epoch - 1],
                            epoch=epoch, step=step, **meta)
    log_csv = write_csv(checkpoint_dir / "training_log.csv", rows, list(rows[0]))
    curve = checkpoint_dir / "training_curve.png"
    _plot_curve(rows, curve)
    return TrainSummary(saved, checkpoint_dir / "best_model.pt", best[1], log_csv, curve)


def _plot_curve(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for split in ("train", "val", "test"):
        if f"{split}_loss" in rows[0]:
            ax1.plot(epochs, [r[f"{split}_loss"] for r in rows], label=split)
            ax2.plot(epochs, [r[f"{split}_accuracy"] for r in rows], label=split)
    ax1.set(title="Loss", xlabel="epoch")
    ax2.set(title="Accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(path, fig, dpi=100)

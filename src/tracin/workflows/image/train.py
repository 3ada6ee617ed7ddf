"""Training an image classifier with checkpoints that carry everything later commands need."""
from __future__ import annotations

import math
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...checkpoints import save_checkpoint
from ...io import write_csv, write_figure
from .folders import ImageDataset, image_transform, scan_split, training_transform
from ...errors import DataError, TracInError
from .models import build_model, load_pretrained, normalization

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


@dataclass
class ImageTraining:
    """How :func:`train_image_classifier` trains (the ``tracin train`` flags)."""

    arch: str = "resnet18"
    epochs: int = 10
    save_every: int = 1
    learning_rate: float = 0.01
    batch_size: int = 32
    pretrained: Optional[Path] = None
    image_size: int = 224
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "none"
    lr_schedule: str = "constant"
    optimizer: str = "sgd"  # sgd (with momentum) | adamw (its state is stored in every checkpoint)


OPTIMIZERS = ("sgd", "adamw")


def _optimizer(model: nn.Module, training: "ImageTraining") -> torch.optim.Optimizer:
    if training.optimizer not in OPTIMIZERS:
        raise TracInError(f"--optimizer {training.optimizer} is not one of {', '.join(OPTIMIZERS)}.")
    if training.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=training.momentum,
                           weight_decay=training.weight_decay)


def train_image_classifier(data_dir: Path, checkpoint_dir: Path, training: ImageTraining,
                           device: torch.device = torch.device("cpu"), progress: bool = True) -> TrainSummary:
    """Train as ``training`` says: SGD with momentum at a constant learning rate, or one that follows
    :func:`epoch_learning_rates` (``lr_schedule="cosine"``); a checkpoint every ``save_every`` epochs
    and after the last one, each with weights, epoch, step, class names, architecture, image size and
    the learning rate TracIn weights it by: the mean rate of the epochs since the previous checkpoint.
    ``augment`` (none | crop | flip | crop_flip, :func:`~tracin.workflows.image.folders.training_transform`)
    applies to the optimisation steps only; accuracies are measured on the plain images. Writes
    ``best_model.pt`` (best test accuracy), ``training_log.csv`` and ``training_curve.png``."""
    arch, epochs, save_every, image_size = training.arch, training.epochs, training.save_every, training.image_size
    learning_rate, batch_size, seed, lr_schedule = training.learning_rate, training.batch_size, training.seed, training.lr_schedule
    augment, pretrained = training.augment, training.pretrained
    if epochs < 1 or save_every < 1 or batch_size < 1 or image_size < 8:
        raise TracInError("--epochs, --save_every and --batch_size must be at least 1 and --image_size at least 8.")
    if not learning_rate > 0:
        raise TracInError(f"--learning_rate must be positive, got {learning_rate}.")
    rates = epoch_learning_rates(learning_rate, epochs, lr_schedule)
    seed_everything(seed)
    train_split, class_names = scan_split(Path(data_dir), "train")
    test_split, _ = scan_split(Path(data_dir), "test", class_names)
    transform = image_transform(image_size, normalization(arch))
    augmented = ImageDataset(train_split, training_transform(image_size, augment, normalization(arch)))
    train_set, test_set = ImageDataset(train_split, transform), ImageDataset(test_split, transform)
    model = build_model(arch, len(class_names), image_size)
    if pretrained is not None:
        load_pretrained(model, Path(pretrained))
    model.to(device)
    opt = _optimizer(model, training)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(augmented, batch_size=batch_size, shuffle=True, generator=generator)
    eval_train = DataLoader(train_set, batch_size=max(batch_size, 64))
    eval_test = DataLoader(test_set, batch_size=max(batch_size, 64))
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    meta = {"class_names": class_names, "arch": arch, "image_size": image_size, "seed": seed, "augment": augment,
            "lr_schedule": lr_schedule, "optimizer": training.optimizer, "run_id": uuid.uuid4().hex}  # discovery refuses checkpoints of mixed runs
    rows, saved, best_acc, step, last_saved = [], [], -1.0, 0, 0
    for epoch in tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress):
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = rates[epoch - 1]
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise DataError(f"The training loss became {float(loss.detach())} at epoch {epoch}; lower --learning_rate.")
            loss.backward()
            opt.step()
            step += 1
        train_loss, train_acc = _evaluate(model, eval_train, device)
        test_loss, test_acc = _evaluate(model, eval_test, device)
        rows.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
                     "test_accuracy": test_acc, "learning_rate": rates[epoch - 1], "seconds": time.perf_counter() - start})
        if epoch % save_every == 0 or epoch == epochs:
            span = rates[last_saved:epoch]  # the step sizes of the epochs this checkpoint stands for
            interval_rate = span[0] if len(set(span)) == 1 else float(np.mean(span))
            state = {"optimizer_state_dict": opt.state_dict()} if training.optimizer == "adamw" else {}
            saved.append(save_checkpoint(checkpoint_dir / f"checkpoint_epoch_{epoch}.pt", model.state_dict(),
                                         learning_rate=interval_rate, epoch=epoch, step=step, **meta, **state))
            last_saved = epoch
        if test_acc > best_acc:
            best_acc = test_acc
            save_checkpoint(checkpoint_dir / "best_model.pt", model.state_dict(), learning_rate=rates[epoch - 1],
                            epoch=epoch, step=step, **meta)
    log_csv = checkpoint_dir / "training_log.csv"
    write_csv(log_csv, rows, list(rows[0]))
    curve = checkpoint_dir / "training_curve.png"
    _plot_curve(rows, curve)
    return TrainSummary(saved, checkpoint_dir / "best_model.pt", best_acc, log_csv, curve)


def _plot_curve(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax1.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax1.set(title="Loss", xlabel="epoch")
    ax2.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax2.plot(epochs, [r["test_accuracy"] for r in rows], label="test")
    ax2.set(title="Accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(path, fig, dpi=100)

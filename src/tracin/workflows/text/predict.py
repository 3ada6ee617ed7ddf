"""What the prediction model says about each text: a classifier's class and its probability; a language model's
completion, decoded token by token from the right context (teacher forcing), and whether it is the given one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from torch.utils.data import DataLoader

from .encode import IGNORE
from .model import TextModel
from .records import display


@dataclass
class Predictions:
    """[m] per scored text: the prediction's name (or decoded completion), its confidence (the class probability; the
    geometric mean probability of the given completion's tokens), and whether it matches the label (or every
    completion token)."""

    predicted: List[str]
    confidence: np.ndarray
    correct: np.ndarray


@torch.no_grad()
def predict(setup: TextModel, loader: DataLoader, device: torch.device) -> Predictions:
    model = setup.model.to(device).eval()
    predicted: List[str] = []
    confidence: List[float] = []
    correct: List[bool] = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if setup.kind == "sequence":
            conf, pred = logits.softmax(-1).max(-1)
            predicted += [setup.label_names[int(p)] if int(p) < len(setup.label_names) else f"output {int(p)}" for p in pred]
            confidence += conf.tolist()
            correct += (pred == labels).tolist()
            continue
        logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != IGNORE
        logp = logits.log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        guess = logits.argmax(-1)
        for row in range(labels.shape[0]):
            keep = mask[row]
            predicted.append(display(setup.tokenizer.decode(guess[row][keep].tolist())))
            confidence.append(float(logp[row][keep].mean().exp()) if keep.any() else float("nan"))
            correct.append(bool((guess[row][keep] == labels[row][keep]).all()))
    return Predictions(predicted, np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool))

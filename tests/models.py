"""Small models covering every supported layer kind, and checkpoint factories."""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
from torch import nn

from tracin import Checkpoint

# The device the numeric tests score on: TRACIN_TEST_DEVICE=cuda runs them against the float64
# reference on a GPU (the reference itself always runs on the CPU).
DEVICE = os.environ.get("TRACIN_TEST_DEVICE", "cpu")


class MLP(nn.Module):
    """Linear layers with biases and a non-linearity after the last layer."""

    def __init__(self, d_in: int = 12, hidden: int = 16, classes: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return torch.tanh(self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))) * 3


class CNN(nn.Module):
    """Conv2d with stride/padding, BatchNorm (eval), in-place ReLU, grouped and dilated convs."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect", bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 6, (2, 3), stride=(1, 2), padding="valid")
        self.fc = nn.Linear(6 * 3 * 2, classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class SeqModel(nn.Module):
    """Embedding (with padding_idx, tokens repeated), Linear over tokens, LayerNorm, pooled head."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, tokens):
        h = self.norm(torch.relu(self.proj(self.emb(tokens))))
        return self.head(h.mean(1))


class Conv1dModel(nn.Module):
    """Conv1d with 'same' padding, dilation, groups; BatchNorm1d; PReLU; Linear head."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2)
        self.bn = nn.BatchNorm1d(6)
        self.act = nn.PReLU()
        self.conv2 = nn.Conv1d(6, 4, 2, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4 * 6, classes)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.bn(self.conv(x)))).flatten(1))


def random_sets(n_train: int, n_test: int, d: int, classes: int, seed: int):
    """Gaussian inputs [n, d] with random labels as (train, test) TensorDatasets."""
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.randn(n_train, d, generator=g), torch.randint(0, classes, (n_train,), generator=g))
    test = TensorDataset(torch.randn(n_test, d, generator=g), torch.randint(0, classes, (n_test,), generator=g))
    return train, test


def perturbed_checkpoints(model: nn.Module, lrs: List[float], seed: int = 0, scale: float = 0.3) -> Tuple[List[Checkpoint], List[Tuple[dict, float]]]:
    """Checkpoints at random perturbations of the model's weights (running stats included)."""
    gen = torch.Generator().manual_seed(seed)
    ckpts, raw = [], []
    for i, lr in enumerate(lrs):
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=gen, dtype=v.dtype) * scale
                state[k] = (v + noise).abs() + 0.5 if "running_var" in k else v + noise
            else:
                state[k] = v.clone()
        ckpts.append(Checkpoint(state, learning_rate=lr, name=f"ckpt{i}"))
        raw.append((state, lr))
    return ckpts, raw


class CountingDataset(torch.utils.data.Dataset):
    """A map-style dataset (batched by a DataLoader, not by slicing, as image folders are) that
    counts the examples read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]

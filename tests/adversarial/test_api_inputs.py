"""Hostile and broken inputs through the Python API: each is one TracInError naming the thing and the fix."""
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, TensorDataset

from helpers import MLP
from tracin import Checkpoint, CheckpointError, DataError, TracIn, TracInError


@pytest.fixture
def scorer():
    model = MLP()
    return TracIn(model, [Checkpoint(model.state_dict(), learning_rate=0.1)], layers="last", device="cpu", progress=False)


def data(n=8, dtype=torch.float32, labels=None):
    return TensorDataset(torch.randn(n, 12, dtype=dtype), torch.randint(0, 5, (n,)) if labels is None else labels)


class Lying(IterableDataset):
    """Yields ``real`` examples but claims ``claimed``."""

    def __init__(self, real, claimed):
        self.real, self.claimed = real, claimed

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        return iter([(torch.randn(12, generator=g), torch.tensor(i % 5)) for i in range(self.real)])

    def __len__(self):
        return self.claimed


@pytest.mark.parametrize("real, claimed, match", [(6, 9, "yielded 6 examples but its length says 9"),
                                                   (9, 6, "yielded more examples than its length")])
def test_an_iterable_dataset_whose_length_lies(scorer, real, claimed, match):
    with pytest.raises(DataError, match=match):
        scorer.self_influence(Lying(real, claimed))


def test_a_dtype_clash_between_model_and_data(scorer):
    with pytest.raises(DataError, match="parameters are torch.float32 but the batch's inputs are torch.float64"):
        scorer.self_influence(data(dtype=torch.float64))


@pytest.mark.parametrize("labels, match", [(torch.rand(8), "integer class indices, got torch.float32"),
                                           (torch.zeros(8, 5, dtype=torch.long), "1-D tensor")])
def test_labels_that_are_not_class_indices(scorer, labels, match):
    with pytest.raises(DataError, match=match):
        scorer.self_influence(data(labels=labels))


@pytest.mark.parametrize("top_k", [True, 0, 2.5, "3"])
def test_top_k_must_be_a_positive_integer(scorer, top_k):
    with pytest.raises(TracInError, match="top_k must be a positive integer"):
        scorer.influence(data(), data(2), top_k=top_k)


@pytest.mark.parametrize("given, what", [(None, "NoneType"), ((torch.randn(4, 12), torch.zeros(4)), "tuple"),
                                         (torch.randn(4, 12), "Tensor")])
def test_something_that_is_not_a_dataset(scorer, given, what):
    with pytest.raises(DataError, match=f"is a {what}, not a torch Dataset or DataLoader; wrap tensors as TensorDataset"):
        scorer.influence(data(), given, top_k=2)


def test_loaders_that_drop_or_reorder_examples(scorer):
    with pytest.raises(DataError, match="drop_last=True"):
        scorer.self_influence(DataLoader(data(), batch_size=3, drop_last=True))
    shuffled = BatchSampler(RandomSampler(range(8)), batch_size=3, drop_last=False)
    with pytest.raises(DataError, match="shuffles or samples"):
        scorer.self_influence(DataLoader(data(), batch_sampler=shuffled))
    with pytest.raises(DataError, match="shuffles or samples"):
        scorer.self_influence(DataLoader(data(), batch_size=3, shuffle=True))


@pytest.mark.parametrize("rate, match", [(float("inf"), "invalid learning rate inf"), (float("nan"), "invalid learning rate nan"),
                                         ("fast", "learning rate is 'fast', not a number")])
def test_learning_rates_that_are_not_usable(rate, match):
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(MLP().state_dict(), learning_rate=rate)


def test_a_task_that_is_neither_a_task_nor_callable():
    model = MLP()
    with pytest.raises(TracInError, match="task must be a Task, an object with a loss"):
        TracIn(model, [Checkpoint(model.state_dict(), learning_rate=0.1)], task=42)


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.items = [{"x": torch.randn(4), "labels": torch.tensor(i % 3)} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_dict_batches_on_a_plain_model_and_the_margin_on_dicts():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    ckpts = [Checkpoint(model.state_dict(), learning_rate=0.1)]
    with pytest.raises(DataError, match=r"Dict batches are scored as Hugging Face inputs.*pass task="):
        TracIn(model, ckpts, device="cpu", progress=False).self_influence(_Dicts(4))
    task = lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["labels"], reduction="none")  # noqa: E731
    with pytest.raises(DataError, match="measurement='margin' reads \\(inputs, labels\\) batches, got a dict"):
        TracIn(model, ckpts, task=task, measurement="margin", device="cpu", progress=False).influence_matrix(_Dicts(4), _Dicts(2))


def test_kfac_statistics_that_overflow_are_one_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    ckpts = [Checkpoint(model.state_dict(), learning_rate=0.1)]
    huge = TensorDataset(torch.full((6, 4), 1e20), torch.zeros(6, dtype=torch.long))
    with pytest.raises(TracInError, match="The K-FAC statistics of layer '0' cannot be inverted"):
        TracIn(model, ckpts, device="cpu", progress=False).self_influence(huge)

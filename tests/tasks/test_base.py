"""Task: an abstract base, and the duck-typed and callable tasks the API accepts."""
import pytest
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tracin import Task, TracIn
from tracin.errors import DataError, TracInError
from tracin.tasks import as_task

from helpers import close, DEVICE, make_case, perturbed_checkpoints


class LossOnly:
    """Not a Task subclass: just a loss method, as docs/tasks.md allows."""

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


class CustomSizes(LossOnly):
    def __init__(self):
        self.seen = 0

    def on_checkpoint(self, model, index):
        self.seen += 1


def test_a_duck_typed_task_scores_like_the_default():
    model, train, test = make_case("mlp")
    ckpts, _ = perturbed_checkpoints(model, [0.1, 0.05])
    train, test = TensorDataset(*train), TensorDataset(*test)
    want = TracIn(model, ckpts, device=DEVICE, batch_size=8, progress=False).influence_matrix(train, test)
    got = TracIn(model, ckpts, task=LossOnly(), device=DEVICE, batch_size=8, progress=False).influence_matrix(train, test)
    assert close(got, want)
    task = CustomSizes()
    TracIn(model, ckpts, task=task, device=DEVICE, batch_size=8, progress=False).self_influence(train)
    assert task.seen >= 2  # its own on_checkpoint is called at every checkpoint


def test_task_is_abstract_and_anything_else_is_refused():
    with pytest.raises(TypeError, match="abstract"):
        Task()
    with pytest.raises(TracInError, match="task must be a Task, an object with a loss"):
        as_task(42)
    with pytest.raises(DataError, match="Cannot tell the batch size of a str batch"):
        as_task(LossOnly()).batch_size("text")

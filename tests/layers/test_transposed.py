"""ConvTranspose1d/2d: materialised per-example gradients from the unfolded output gradient, against float64
per-example references, with no per-example backward passes."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import DEVICE, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.tasks import ClassificationTask



class Decoder(nn.Module):
    """Transposed convolutions: stride, padding, output padding, dilation, groups, with and without bias."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(4, 4, (2, 3), stride=(1, 2), dilation=(2, 1), groups=2, bias=False)
        self.line = nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.up2(torch.relu(self.up1(x))))
        return self.head(torch.relu(self.line(h.mean(2))).mean(2))


@pytest.mark.parametrize("layers", ["all", "up2"])
def test_transposed_convolutions_match_the_reference_without_per_example_passes(layers):
    torch.manual_seed(0)
    model = Decoder()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(11, 2, 3, 4, generator=g), torch.randint(0, 3, (11,), generator=g)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers=layers, precondition="none", device=DEVICE, batch_size=4, progress=False)
    got = tr.influence_matrix(TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:]))
    modules = None if layers == "all" else [layers]
    want = task_reference_matrix(model, raw, modules, ClassificationTask(), list(zip(x[:8], y[:8])), list(zip(x[8:], y[8:])))
    assert rel_err(got, want) <= 1e-4
    kernels = {row["name"]: row["kernel"] for row in tr.scope()}
    assert all(kernels[n] == "materialize" for n in kernels if n.startswith(("up", "line")))

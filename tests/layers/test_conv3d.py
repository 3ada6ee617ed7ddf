"""Conv3d with its own kernels (ghost over unfolded voxel patches, materialised by a grouped weight-gradient
convolution) and K-FAC, against float64 per-example references."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import DEVICE, kfac_reference_matrix, perturbed_checkpoints, rel_err, task_reference_matrix
from tracin import TracIn
from tracin.tasks import ClassificationTask


class Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, padding_mode="replicate")
        self.conv2 = nn.Conv3d(4, 4, (2, 2, 3), dilation=(1, 1, 2), groups=2, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3, 4)))


def _case():
    torch.manual_seed(0)
    model = Volume()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 2, 4, 5, 7, generator=g), torch.randint(0, 3, (12,), generator=g)
    return model, (x[:9], y[:9]), (x[9:], y[9:])


@pytest.mark.parametrize("kernel", ["auto", "ghost", "materialize"])
def test_conv3d_kernels_match_the_reference(kernel):
    model, train, test = _case()
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers="all", precondition="none", device=DEVICE, batch_size=4, progress=False, kernel=kernel)
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    want = task_reference_matrix(model, raw, None, ClassificationTask(), list(zip(*train)), list(zip(*test)))
    assert rel_err(got, want) <= 1e-4
    assert all(row["kernel"] != "exact" for row in tr.scope())


def test_conv3d_under_the_default_kfac_matches_the_reference():
    model, train, test = _case()
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05], scale=0.1)
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=4, progress=False)
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert tr.preconditioner is not None  # the default keeps K-FAC: every layer has a Kronecker kernel
    want = kfac_reference_matrix(model, raw, ["conv1", "conv2", "head"], train, test)
    assert rel_err(got, want) <= 1e-4


"""measurement=: the test side's gradients of another quantity than the training loss, against the float64 reference."""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import DEVICE, make_case, perturbed_checkpoints, rel_err, task_per_example_grads
from tracin import TracIn, TracInError
from tracin.tasks import ClassificationTask
from tracin.tasks.classification import MarginMeasurement


def reference(model, raw, train, test, measurement):
    ref = copy.deepcopy(model).double().eval()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    items = lambda data: [(x.double(), y) for x, y in zip(*data)]  # noqa: E731
    total = 0
    for state, lr in raw:
        ref.load_state_dict({k: v.double() for k, v in state.items()})
        total = total + lr * task_per_example_grads(ref, names, measurement, items(test)) @ \
            task_per_example_grads(ref, names, ClassificationTask(), items(train)).T
    return total


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_the_margin_measurement_matches_the_reference(kind):
    model, train, test = make_case(kind)
    ckpts, raw = perturbed_checkpoints(model, [0.1, 0.05])
    tr = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=8, progress=False, measurement="margin", precondition="none")
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert rel_err(got, reference(model, raw, train, test, MarginMeasurement())) <= 1e-4
    plain = TracIn(model, ckpts, layers="all", device=DEVICE, batch_size=8, progress=False, precondition="none")
    assert not torch.allclose(got, plain.influence_matrix(TensorDataset(*train), TensorDataset(*test)))
    # self-influence stays the training loss's own
    assert torch.allclose(tr.self_influence(TensorDataset(*train)), plain.self_influence(TensorDataset(*train)))


def test_a_callable_measurement_and_a_bad_name():
    model, train, test = make_case("mlp")
    ckpts, raw = perturbed_checkpoints(model, [0.1])

    def logit_of_class_2(model, batch):
        return -model(batch[0])[:, 2]  # lower is better: raising class 2's logit

    class Logit2(ClassificationTask):
        def loss(self, model, batch):
            return logit_of_class_2(model, batch)

    tr = TracIn(model, ckpts, layers="all", device=DEVICE, progress=False, measurement=logit_of_class_2, precondition="none")
    got = tr.influence_matrix(TensorDataset(*train), TensorDataset(*test))
    assert rel_err(got, reference(model, raw, train, test, Logit2())) <= 1e-4
    with pytest.raises(TracInError, match="measurement='accuracy' is not one of loss, margin"):
        TracIn(model, ckpts, progress=False, measurement="accuracy", precondition="none")


def test_the_influence_command_takes_a_measurement(tmp_path):
    import json

    from helpers import make_image_folder
    from tracin.workflows.cli import main

    data = make_image_folder(tmp_path / "data", n_train=4, n_test=2)
    assert main(["train", "--data_dir", str(data), "--arch", "smallcnn", "--epochs", "1", "--checkpoint_dir", str(tmp_path / "ck"),
                 "--image_size", "12", "--quiet"]) == 0
    runs = {}
    for measurement in ("loss", "margin"):
        out = tmp_path / measurement
        assert main(["influence", "--data_dir", str(data), "--checkpoint_dir", str(tmp_path / "ck"), "--output_dir", str(out),
                     "--top_k", "2", "--measurement", measurement, "--quiet"]) == 0
        runs[measurement] = open(out / "top_k_influences.csv").read()
        assert json.loads((out / "manifest.json").read_text())["parameters"]["measurement"] == measurement
    assert runs["loss"] != runs["margin"]

"""Bring your own model: weights saved by a plain training loop under any names, scored by `tracin influence
--arch --model_path [--checkpoint_dir]`; Hugging Face Trainer folders and Lightning checkpoints discovered."""
import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from helpers import make_image_folder, MLP
from tracin import Checkpoint, TracIn
from tracin.checkpoints import weights_for
from tracin.workflows.cli import main


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """A resnet18 trained by a plain loop, its weights saved three ways under arbitrary names."""
    root = tmp_path_factory.mktemp("own")
    data = make_image_folder(root / "data", n_train=4, n_test=2)
    from tracin.workflows.image.folders import ImageDataset, image_transform, scan_split
    from tracin.workflows.image.folders import IMAGENET_MEAN, IMAGENET_STD

    split, classes = scan_split(data, "train")
    loader = torch.utils.data.DataLoader(ImageDataset(split, image_transform(32, (IMAGENET_MEAN, IMAGENET_STD))), batch_size=6)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ck = root / "weights"
    ck.mkdir()
    for epoch in range(3):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if epoch == 0:
            torch.save(state, ck / "resnet_first_try.pth")  # a plain state dict
        elif epoch == 1:
            torch.save({"model_state_dict": state, "lr": 0.05, "note": "mine"}, ck / "middle.pt")  # a wrapper with its rate
        else:
            torch.save({f"module.{k}": v for k, v in state.items()}, ck / "zfinal_dp.pth")  # DataParallel names
    torch.save(model.state_dict(), root / "Resnet18_animals_val_0_97.pth")
    return root, data, ck


def _run(*args):
    return main(["influence", "--top_k", "3", "--quiet", "--image_size", "32", "--arch", "resnet18", *args])


def test_a_plain_state_dict_alone(user_run, tmp_path):
    root, data, _ = user_run
    out = tmp_path / "one"
    assert _run("--data_dir", str(data), "--model_path", str(root / "Resnet18_animals_val_0_97.pth"),
                "--learning_rate", "0.01", "--output_dir", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["learning_rate"], c["learning_rate_source"]) for c in manifest["checkpoints"]] == [(0.01, "given")]
    assert manifest["prediction_model"]["file"].endswith("Resnet18_animals_val_0_97.pth")
    assert manifest["scope"][0]["name"] == "fc"


def test_a_folder_of_weights_under_any_names(user_run, tmp_path):
    root, data, ck = user_run
    out = tmp_path / "all"
    assert _run("--data_dir", str(data), "--checkpoint_dir", str(ck), "--model_path", str(root / "Resnet18_animals_val_0_97.pth"),
                "--learning_rate", "0.01", "--output_dir", str(out), "--layers", "layer4.1.conv2,fc") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [(c["file"].rsplit("/", 1)[-1], c["learning_rate"], c["learning_rate_source"]) for c in manifest["checkpoints"]]
    assert rows == [("middle.pt", 0.05, "file"), ("resnet_first_try.pth", 0.01, "given"), ("zfinal_dp.pth", 0.01, "given")]
    found = Checkpoint.discover(ck, default_learning_rate=0.01)
    model = torchvision.models.resnet18(num_classes=3)
    assert all(weights_for(model, c).keys() == model.state_dict().keys() for c in found)  # prefixes stripped


def test_own_model_flags_without_arch_are_refused(user_run, tmp_path, capsys):
    root, data, _ = user_run
    code = main(["influence", "--data_dir", str(data), "--model_path", str(root / "Resnet18_animals_val_0_97.pth"),
                 "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--model_path describes a model you trained yourself; add --arch" in err


def test_a_user_builder_by_module_and_name(user_run, tmp_path, monkeypatch):
    root, data, _ = user_run
    (tmp_path / "mymodels.py").write_text("import torchvision\n\ndef net(num_classes):\n"
                                          "    return torchvision.models.resnet18(num_classes=num_classes)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["influence", "--data_dir", str(data), "--arch", "mymodels:net", "--image_size", "32", "--model_path",
                 str(root / "Resnet18_animals_val_0_97.pth"), "--learning_rate", "0.01", "--output_dir", str(tmp_path / "o"),
                 "--top_k", "2", "--quiet"]) == 0


def test_hugging_face_trainer_folders_and_lightning_checkpoints(tmp_path):
    model = MLP()
    trainer = tmp_path / "trainer"
    for step, lr in ((10, 0.004), (20, 0.002)):
        folder = trainer / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        history = [{"step": s, "learning_rate": r} for s, r in ((5, 0.005), (10, 0.004), (15, 0.003), (20, 0.002))]
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": [h for h in history if h["step"] <= step]}))
    found = Checkpoint.discover(trainer)
    assert [(c.name, c.step, c.learning_rate) for c in found] == [("checkpoint-10", 10, 0.004), ("checkpoint-20", 20, 0.002)]
    lightning = tmp_path / "lightning"
    lightning.mkdir()
    for epoch in (2, 1):
        torch.save({"epoch": epoch, "global_step": 10 * epoch, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1 / epoch, "params": [0]}]}]},
                   lightning / f"epoch={epoch}-step={10 * epoch}.ckpt")
    found = Checkpoint.discover(lightning)
    assert [(c.epoch, c.learning_rate) for c in found] == [(1, 0.1), (2, 0.05)]  # by the stored epoch
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    scores = TracIn(model, found, device="cpu", progress=False).self_influence(torch.utils.data.TensorDataset(x, y))
    assert scores.shape == (4,) and bool((scores > 0).all())


def test_a_timm_name_builds_through_timm_when_it_is_installed(monkeypatch):
    """A name torchvision does not know goes to timm (here a stand-in module with timm's two functions)."""
    import sys
    import types

    from tracin.workflows.image.models import build_model

    made = {}
    fake = types.ModuleType("timm")
    fake.list_models = lambda: ["convnext_atto"]

    def create_model(name, pretrained, num_classes):
        made.update(name=name, pretrained=pretrained)
        return torch.nn.Linear(4, num_classes)

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = build_model("convnext_atto", 3, 32)
    assert model.out_features == 3 and made == {"name": "convnext_atto", "pretrained": False}
    with pytest.raises(Exception, match="or, with timm installed, a timm model name"):
        build_model("no_such_net", 3, 32)

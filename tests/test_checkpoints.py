"""Checkpoint files: discovery order, learning rates, safe loading, mismatches."""
import pickle

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import MLP
from tracin import Checkpoint, CheckpointError, TracIn, save_checkpoint


def test_discover_natural_order_and_stored_learning_rates(tmp_path):
    model = MLP()
    for epoch, lr in [(10, 0.01), (2, 0.1), (1, 0.2)]:
        save_checkpoint(tmp_path / f"ckpt_{epoch}.pt", model.state_dict(), learning_rate=lr, epoch=epoch)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    found = Checkpoint.discover(tmp_path)
    assert [c.name for c in found] == ["ckpt_1.pt", "ckpt_2.pt", "ckpt_10.pt"]
    assert [c.learning_rate for c in found] == [0.2, 0.1, 0.01]
    assert [c.epoch for c in found] == [1, 2, 10]
    assert [c.learning_rate for c in Checkpoint.discover(tmp_path, learning_rate=0.5)] == [0.5] * 3


def test_safetensors_roundtrip(tmp_path):
    model = MLP()
    save_checkpoint(tmp_path / "a.safetensors", model.state_dict(), learning_rate=0.25, epoch=3)
    ckpt = Checkpoint(tmp_path / "a.safetensors")
    assert ckpt.learning_rate == 0.25 and ckpt.epoch == 3
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.state_dict()[k], v)


def test_bare_state_dict_file_needs_a_learning_rate(tmp_path):
    torch.save(MLP().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="no learning rate"):
        Checkpoint.discover(tmp_path)
    assert Checkpoint(tmp_path / "bare.pt", learning_rate=0.1).learning_rate == 0.1


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.discover(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="No checkpoint files"):
        Checkpoint.discover(tmp_path)


def test_corrupt_file(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"this is not a zip or pickle")
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(tmp_path / "bad.pt", learning_rate=0.1)


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_payload_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model_state_dict": MLP().state_dict(), "learning_rate": 0.1, "x": _Payload()}, f)
    torch.save({"model_state_dict": MLP().state_dict(), "learning_rate": 0.1, "x": _Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="needs pickled Python code to load"):
            Checkpoint(tmp_path / name)
    assert not (tmp_path / "PWNED").exists()


def test_mismatched_keys_are_named():
    model = MLP()
    state = dict(model.state_dict())
    state.pop("fc1.bias")
    state["extra.weight"] = torch.zeros(1)
    data = TensorDataset(torch.randn(4, 12), torch.randint(0, 5, (4,)))
    tr = TracIn(model, [Checkpoint(state, learning_rate=0.1, name="other-arch")], device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"other-arch does not match the model: missing keys fc1\.bias; unexpected keys extra\.weight"):
        tr.self_influence(data)


def test_mismatched_shapes_are_named():
    state = MLP(hidden=32).state_dict()
    tr = TracIn(MLP(), [Checkpoint(state, learning_rate=0.1)], device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="shapes: fc1.weight"):
        tr.self_influence(TensorDataset(torch.randn(4, 12), torch.randint(0, 5, (4,))))


def test_data_parallel_prefix_is_stripped():
    model = MLP()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(4, 12), torch.randint(0, 5, (4,)))
    a = TracIn(model, [Checkpoint(state, learning_rate=0.1)], device="cpu", progress=False).self_influence(data)
    b = TracIn(model, [Checkpoint(model.state_dict(), learning_rate=0.1)], device="cpu", progress=False).self_influence(data)
    assert torch.equal(a, b)


def test_model_untouched_after_a_failed_run():
    model = MLP()
    model.train()
    model.fc1.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(model.state_dict())
    bad.pop("head.bias")
    tr = TracIn(model, [Checkpoint(model.state_dict(), learning_rate=0.1), Checkpoint(bad, learning_rate=0.1)],
                layers="last", device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="does not match the model: missing keys"):
        tr.self_influence(TensorDataset(torch.randn(4, 12), torch.randint(0, 5, (4,))))
    assert model.training and not model.fc1.weight.requires_grad and model.fc2.weight.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Meta:  # a custom class inside a checkpoint: loadable only with trust
    def __init__(self):
        self.note = "custom"


def test_trusted_pickled_checkpoints_load(tmp_path):
    model = MLP()
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.1, "meta": Meta()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match="--trust_checkpoint"):
        Checkpoint(tmp_path / "custom.pt")
    with pytest.warns(UserWarning, match="runs any code"):
        ck = Checkpoint(tmp_path / "custom.pt", trust=True)
    assert ck.learning_rate == 0.1 and torch.equal(ck.state_dict()["fc1.weight"], model.fc1.weight)
    torch.save(model, tmp_path / "whole.pt")  # a whole pickled model
    with pytest.warns(UserWarning):
        whole = Checkpoint(tmp_path / "whole.pt", learning_rate=0.2, trust=True)
    assert set(whole.state_dict()) == set(model.state_dict())


def test_tied_weights_saved_once_load_into_both_names(tmp_path):
    """save_pretrained writes GPT-2's tied lm_head.weight once, as transformer.wte.weight; the model gets it under both."""
    transformers = pytest.importorskip("transformers")
    from tracin.checkpoints import weights_for

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    model.save_pretrained(tmp_path / "m")
    fresh = transformers.GPT2LMHeadModel(model.config)
    weights = weights_for(fresh, Checkpoint(tmp_path / "m" / "model.safetensors", learning_rate=0.1))
    assert torch.equal(weights["lm_head.weight"], model.transformer.wte.weight.detach())
    fresh.load_state_dict(weights)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()  # still tied


def test_save_pretrained_folders_are_checkpoints_in_natural_order(tmp_path):
    from safetensors.torch import save_file

    model = MLP(4, 3, 2)
    for epoch in (10, 2):
        (tmp_path / f"epoch_{epoch}").mkdir()
        save_file({k: v.contiguous() + epoch for k, v in model.state_dict().items()}, str(tmp_path / f"epoch_{epoch}" / "model.safetensors"))
    (tmp_path / "notes").mkdir()  # a folder without weights is not a checkpoint
    found = Checkpoint.discover(tmp_path, default_learning_rate=0.5)
    assert [c.name for c in found] == ["epoch_2", "epoch_10"] and all(c.learning_rate == 0.5 for c in found)

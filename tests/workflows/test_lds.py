"""The LDS evaluation (tracin.workflows.evaluation.lds): the score, the vmapped optimizers, the cache, the command."""
import numpy as np
import pytest
import torch

from helpers import close
from scipy.stats import spearmanr

from tracin.errors import TracInError
from tracin.workflows.cli import main
from tracin.workflows.evaluation import lds
from tracin.workflows.evaluation.lds import LDSSetting, _Stepper, lds_values

TINY = dict(subsets=6, seeds=1, epochs=2, n_test=5)


def test_lds_is_spearman_of_summed_scores_against_targets():
    g = torch.Generator().manual_seed(0)
    scores, masks, target = torch.randn(3, 10, generator=g), torch.rand(8, 10, generator=g) < 0.5, torch.randn(8, 3, generator=g)
    want = [spearmanr((masks.double() @ scores.double().T)[:, j], target[:, j]).statistic for j in range(3)]
    assert np.allclose(lds_values(scores, masks, target), want)
    perfect = lds_values(scores, masks, masks.double() @ scores.double().T)  # the target is the prediction: LDS 1
    assert np.allclose(perfect, 1.0)


@pytest.mark.parametrize("optimizer, torch_optimizer", [("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
                                                          ("adamw", lambda p: torch.optim.AdamW(p, lr=0.003))])
def test_the_stacked_optimizer_steps_as_torch_does(optimizer, torch_optimizer):
    setting = LDSSetting(optimizer=optimizer)
    weight = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    stacked = {"w": weight.detach().clone().unsqueeze(0)}
    opt, stepper = torch_optimizer([weight]), _Stepper(setting, stacked)
    for k in range(3):
        grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 + k))
        weight.grad = grad.clone()
        opt.step()
        stacked = stepper(stacked, {"w": grad.unsqueeze(0)})
    assert close(stacked["w"][0], weight.detach())


def test_evaluate_scores_methods_and_reuses_the_retrained_targets(tmp_path, monkeypatch):
    setting = LDSSetting(**TINY)
    rows = lds.evaluate(setting, {"default": {}, "plain": {"precondition": "none"}}, tmp_path, log=lambda _: None)
    assert [r.method for r in rows] == ["default", "plain"]
    assert all(-1 <= r.low <= r.lds <= r.high <= 1 and r.seconds > 0 for r in rows)
    assert len(list(tmp_path.glob("lds_digits_mlp_sgd_*.npz"))) == 1

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained although the targets are cached")

    monkeypatch.setattr(lds, "train_many", no_retraining)
    again = lds.evaluate(setting, {"default": {}}, tmp_path, log=lambda _: None)
    assert again[0].lds == rows[0].lds


def test_cnn_targets_on_mnist1d_shapes():
    setting = LDSSetting(data="mnist1d", model="cnn", **TINY)
    (x, y), (xt, yt) = lds.load_data(setting)
    assert x.shape == (4000, 1, 40) and xt.shape == (5, 1, 40) and y.dtype == torch.long
    digits_cnn = LDSSetting(data="digits", model="cnn", **TINY)
    masks, target = lds.targets(digits_cnn, lds.load_data(digits_cnn), log=lambda _: None)
    assert masks.shape == (6, 1200) and target.shape == (6, 5) and torch.isfinite(target).all()


def test_command_writes_the_table_and_refuses_unknown_methods(tmp_path, capsys):
    args = ["evaluate", "lds", "--output_dir", str(tmp_path), "--subsets", "6", "--seeds", "1", "--epochs", "2", "--n_test", "5", "--quiet"]
    assert main(args + ["--methods", "default", "kfac_last"]) == 0
    out = capsys.readouterr().out
    assert "| default |" in out and "| kfac_last |" in out
    assert (tmp_path / "lds.csv").read_text().splitlines()[0] == "method,lds,low,high,seconds"
    assert main(args + ["--methods", "trak"]) == 2
    err = capsys.readouterr().err
    assert "Unknown LDS method 'trak'; choose from default, plain" in err and "Traceback" not in err
    with pytest.raises(TracInError, match="subsets must be a positive integer"):
        LDSSetting(subsets=1)


def test_settings_and_caches_that_cannot_give_an_lds(tmp_path):
    from tracin.errors import TracInError
    from tracin.workflows.evaluation.lds import LDSSetting, _read_cache, load_data

    with pytest.raises(TracInError, match="--learning_rate must be a positive number, got -0.1"):
        LDSSetting(learning_rate=-0.1)
    with pytest.raises(TracInError, match="--n_test 100000 is more than the 597 test examples of digits"):
        load_data(LDSSetting(n_test=100000))
    said = []
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    assert _read_cache(garbage, (4, 10), (4, 3), said.append) is None and "cannot be read" in said[-1]
    shaped = tmp_path / "shaped.npz"
    np.savez(shaped, masks=np.ones((4, 9), dtype=bool), targets=np.zeros((4, 3)))
    assert _read_cache(shaped, (4, 10), (4, 3), said.append) is None and "not (4, 10) and (4, 3)" in said[-1]
    good = tmp_path / "good.npz"
    np.savez(good, masks=np.ones((4, 10), dtype=bool), targets=np.zeros((4, 3)))
    masks, target = _read_cache(good, (4, 10), (4, 3), said.append)
    assert masks.shape == (4, 10) and target.shape == (4, 3)

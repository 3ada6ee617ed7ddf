"""ScoringConfig: every run setting declared once, validated in one place, and the CLI flags built from it."""
import json

import pytest

from tracin import TracIn
from tracin.config import KERNELS, NORMALIZE, PRECISIONS, PRECONDITIONERS, PROJECTIONS, ScoringConfig, fields_with_flags
from tracin.errors import TracInError
from tracin.workflows.parser import build_parser, scoring_config

from helpers import MLP, perturbed_checkpoints


def test_defaults_round_trip_through_json_and_replace_validates():
    config = ScoringConfig()
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert config.replace(precision="bf16").precision == "bf16" and config.precision == "fp32"
    with pytest.raises(TracInError, match="normalize='l2' is not one of none, cosine, train"):
        config.replace(normalize="l2")
    with pytest.raises(TracInError, match="memory_budget must be a positive, finite number of bytes"):
        ScoringConfig(memory_budget=float("inf"))
    with pytest.raises(TracInError, match="layers=True is not a layer selection"):
        ScoringConfig(layers=True)


def test_a_callable_stratifier_is_named_in_to_dict():
    def by_parity(batch):
        return batch[1] % 2

    assert ScoringConfig(sample_rate=0.5, stratify_by=by_parity).to_dict()["stratify_by"] == "by_parity"


def test_the_facade_builds_the_config_from_its_keywords_or_takes_one():
    model = MLP()
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    tr = TracIn(model, ckpts, layers="last", precision="tf32", batch_size=7, progress=False)
    assert tr.config == ScoringConfig(layers="last", precision="tf32", batch_size=7, progress=False)
    given = ScoringConfig(layers=["fc1"], normalize="cosine")
    assert TracIn(model, ckpts, config=given).config is given


def test_cli_flags_come_from_the_config():
    flags = {flag: (name, meta) for name, flag, meta in fields_with_flags()}
    assert flags["--precision"][1]["choices"] == PRECISIONS and flags["--normalize"][1]["choices"] == NORMALIZE
    assert flags["--precondition"][1]["choices"] == PRECONDITIONERS and flags["--projection"][1]["choices"] == PROJECTIONS
    assert "kernel" not in {name for name, _ in flags.values()} and KERNELS[0] == "auto"
    args = build_parser().parse_args(["influence", "--data_dir", "d", "--checkpoint_dir", "c", "--output_dir", "o",
                                      "--use_projection", "--projection_type", "sparse", "--memory_budget", "0.5",
                                      "--precondition", "kfac", "--damping", "0.3", "--quiet"])
    config = scoring_config(args)
    assert (config.projection, config.projection_dim, config.memory_budget) == ("sparse", 1024, 2**29)
    assert (config.precondition, config.damping, config.progress, config.layers, config.batch_size) == ("kfac", 0.3, False, "last", 32)
    plain = scoring_config(build_parser().parse_args(["influence", "--data_dir", "d", "--checkpoint_dir", "c", "--output_dir", "o"]))
    assert plain.projection_dim is None and plain.memory_budget is None and plain.progress


def test_an_infinite_memory_budget_is_one_clear_line(capsys):
    from tracin.workflows.cli import main

    code = main(["influence", "--data_dir", "d", "--checkpoint_dir", "c", "--output_dir", "o", "--memory_budget", "inf"])
    err = capsys.readouterr().err
    assert code == 2 and "--memory-budget: must be a positive number of GiB, got 'inf'" in err and "Traceback" not in err


def test_the_facade_takes_its_settings_by_keyword_only_and_never_mixed_with_a_config():
    model = MLP()
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    with pytest.raises(TypeError):
        TracIn(model, ckpts, None, "cpu")  # task and device (and every setting) are keyword-only
    with pytest.raises(TracInError, match=r"either as config= or as keywords, not both \(layers= was passed"):
        TracIn(model, ckpts, config=ScoringConfig(), layers="last")
    with pytest.raises(TracInError, match="'projection_dims' is not a scoring setting; the settings are batch_size"):
        TracIn(model, ckpts, projection_dims=64)
    tr = TracIn(model, ckpts, device="cpu", layers="last", measurement="margin", progress=False)
    assert tr.config.layers == "last" and tr.config.measurement == "margin" and type(tr.measurement).__name__ == "MarginMeasurement"
    assert ScoringConfig(measurement=len).to_dict()["measurement"] == "len"
    with pytest.raises(TracInError, match="measurement='gap' is not one of loss, margin"):
        ScoringConfig(measurement="gap")


def test_every_pass_keeps_its_own_statistics():
    from torch.utils.data import TensorDataset
    import torch

    model = MLP()
    ckpts, _ = perturbed_checkpoints(model, [0.1])
    data = TensorDataset(torch.randn(6, 12), torch.randint(0, 5, (6,)))
    tr = TracIn(model, ckpts, device="cpu", progress=False, precondition="none")
    tr.self_influence(data)
    result = tr.influence(data, data, top_k=2)
    assert [p["pass"] for p in tr.passes] == ["self_influence", "influence"]
    assert result.stats is tr.passes[-1] and tr.last_stats is tr.passes[-1] and "seconds" in tr.passes[0] and tr.passes[1]["n_train"] == 6

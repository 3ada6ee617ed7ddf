"""The README's main command: the digits demo end to end, with its detection bar."""
import pytest
import csv
import json

from tracin.workflows.cli import main


@pytest.mark.slow
def test_demo_finds_flipped_labels(tmp_path, capsys):
    out = tmp_path / "demo"
    # --in_run: the same demo, its training also recording in-run TracIn
    assert main(["demo", "--output_dir", str(out), "--noise_rate", "0.1", "--seed", "0", "--quiet", "--in_run"]) == 0
    printed = capsys.readouterr().out
    assert "self-influence found" in printed and "report.html" in printed and "In-run self-influence" in printed
    metrics = json.loads((out / "mislabel_metrics.json").read_text())
    assert metrics["n_flipped"] == 144 and metrics["recall_at_inspected"]["20%"] >= 0.9
    assert metrics["roc_auc"] > 0.95
    assert metrics["in_run"]["roc_auc"] >= metrics["roc_auc"] - 0.01  # recorded while training, as good as the checkpoints'
    assert (out / "in_run_results" / "report.html").is_file()
    noise = list(csv.DictReader(open(out / "data" / "injected_noise.csv")))
    assert len(noise) == 144 and all(r["true_label"] != r["given_label"] for r in noise)
    assert all((out / "data" / r["file"]).parent.name == r["given_label"] for r in noise)
    assert (out / "results" / "report.html").stat().st_size > 10_000
    # the demo refuses to overwrite a previous run's data
    assert main(["demo", "--output_dir", str(out), "--quiet"]) == 2

"""tracin text: a Hugging Face model saved as the Trainer saves it and text files in, the result files and a report
that shows the texts out; readers for every data format; one-line errors for bad input."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import rel_err, task_reference_matrix, text_run
from tracin.tasks import HFTask
from tracin.workflows.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return text_run(tmp_path_factory.mktemp("text"), "sequence")


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    return text_run(tmp_path_factory.mktemp("lm"), "causal_lm", n_train=24, n_test=4, epochs=2)


def _args(run, out, *more):
    model, train, test, _ = run
    return ["text", "--model_dir", str(model), "--train", str(train), "--test", str(test), "--output_dir", str(out),
            "--quiet", *more]


@pytest.fixture(scope="module")
def scored(classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("text_out") / "results"
    assert main(_args(classifier, out, "--self_influence", "--top_k", "5")) == 0
    return out


def test_text_writes_the_influence_files_with_the_texts(classifier, scored):
    model, train, test, _ = classifier
    m = json.loads((scored / "manifest.json").read_text())
    assert m["command"] == "text" and m["data"]["modality"] == "text" and m["data"]["task"] == "sequence"
    assert [c["learning_rate"] for c in m["checkpoints"]] == [0.003] * 6  # from each checkpoint's trainer_state.json
    assert m["prediction_model"]["file"] == str((model / "model.safetensors").resolve())
    rows = list(csv.DictReader(open(scored / "top_k_influences.csv")))
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    for r in rows[:20]:
        assert r["train_text"] == texts[int(r["train_index"])] and r["train_file"] == f"train.jsonl:{int(r['train_index']) + 1}"
    ranked = list(csv.DictReader(open(scored / "self_influence.csv")))
    assert len(ranked) == len(texts) and {"text", "label", "predicted", "score", "rank"} <= set(ranked[0])


def test_the_report_shows_the_test_texts_and_their_proponents(scored):
    assert main(["report", "--results_dir", str(scored), "--quiet"]) == 0
    page = (scored / "report.html").read_text()
    rows = list(csv.DictReader(open(scored / "top_k_influences.csv")))
    assert rows[0]["test_text"] in page
    assert rows[0]["train_text"] in page  # a proponent of a shown test text, as text
    assert "Health score" in page and "Mislabel candidates" in page and "<script" not in page
    summary = json.loads((scored / "report_summary.json").read_text())
    assert "negative" not in summary["outputs"] and "top_influences" not in summary["outputs"]  # no image folders
    assert main(["report", "--results_dir", str(scored), "--quiet", "--html_tests", "2"]) == 0
    pages = sorted(scored.glob("report_tests_*.html"))
    shown = "".join(p.read_text() for p in pages) + (scored / "report.html").read_text()
    assert pages and all(r["test_text"] in shown for r in rows)  # every test text is reachable


def test_top_k_is_the_exact_top_k_of_the_padded_batches_matrix(classifier, scored):
    """The files' proponents are the argsort of the full matrix, and batches padded to their longest text score as
    one-text batches do (padding is masked)."""
    from tracin.workflows.text.job import TextJob, _set_up

    model, train, test, _ = classifier
    run = _set_up(TextJob(model, train, test, scored.parent / "unused", top_k=5, scoring=_quiet()))
    matrix = run.tr.influence_matrix(run.loader("train"), run.loader("test"))
    order = np.argsort(-matrix.numpy(), axis=1, kind="stable")[:, :5]
    assert (np.load(scored / "top_k_influences_indices.npy") == order).all()
    run.tr.config = run.tr.config.replace(batch_size=1)
    assert rel_err(run.tr.influence_matrix(run.loader("train"), run.loader("test")), matrix) <= 1e-4


def test_padded_batches_match_the_float64_reference_over_every_layer(classifier):
    from tracin.workflows.text.job import TextJob, _set_up

    model_dir, train, test, _ = classifier
    run = _set_up(TextJob(model_dir, train, test, model_dir.parent / "unused", scoring=_quiet(layers="all", precondition="none")))
    items = lambda split, n: [{k: torch.tensor(v) for k, v in run.splits[split].examples[i].items()} for i in range(n)]  # noqa: E731
    train_items, test_items = items("train", 12), items("test", 3)
    run.index = {"train": np.arange(12), "test": np.arange(3)}
    got = run.tr.influence_matrix(run.loader("train"), run.loader("test"))
    raw = [(c.state_dict(), c.learning_rate) for c in run.setup.checkpoints]
    want = task_reference_matrix(run.setup.model, raw, None, HFTask("sequence"), train_items, test_items)
    assert rel_err(got, want) <= 1e-4


def test_self_influence_ranks_the_flipped_labels_first(classifier, scored):
    from sklearn.metrics import roc_auc_score

    flipped = classifier[3]
    assert roc_auc_score(flipped, np.load(scored / "self_influence.npy")) >= 0.9  # the bar


def test_a_causal_language_model_on_prompts_and_completions(language_model, tmp_path):
    out = tmp_path / "lm"
    with pytest.warns(UserWarning, match="shares its weight with the token table"):  # GPT-2's tied head
        assert main(_args(language_model, out, "--prompt_field", "prompt", "--top_k", "3", "--self_influence")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["data"]["task"] == "causal_lm" and m["data"]["class_names"] == []
    assert [r["name"] for r in m["scope"]] == ["transformer.h.0.mlp.c_proj"] and m["scope"][0]["kernel"] != "exact"
    assert (out / "top_k_influences_values.npy").is_file() and (out / "self_influence.csv").is_file()
    rows = list(csv.DictReader(open(out / "predictions_test.csv")))
    assert rows[0]["label"].strip() in ("sports", "weather", "food")  # the completion
    assert main(["report", "--results_dir", str(out), "--quiet"]) == 0
    assert rows[0]["text"] in (out / "report.html").read_text()


def test_prompt_and_completion_fields_are_found_without_the_flag(language_model, tmp_path):
    with pytest.warns(UserWarning, match="the loss is on the completions"):
        assert main(_args(language_model, tmp_path / "lm", "--task", "causal_lm", "--top_k", "2")) == 0
    assert json.loads((tmp_path / "lm" / "manifest.json").read_text())["data"]["fields"]["prompt"] == "prompt"


def test_the_prompt_gets_no_loss_and_long_prompts_lose_their_beginning(language_model):
    from tracin.workflows.text.encode import IGNORE, TextFields, encode
    from tracin.workflows.text.records import read_records

    model_dir, train, _, _ = language_model
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    records = read_records(train, "train")
    whole = encode(records, TextFields(kind="causal_lm", prompt="prompt", completion="completion"), tok, None)
    first = whole.examples[0]
    n_completion = len(tok(records.rows[0]["completion"], add_special_tokens=False)["input_ids"])
    assert first["labels"][:-n_completion] == [IGNORE] * (len(first["input_ids"]) - n_completion)
    assert first["labels"][-n_completion:] == first["input_ids"][-n_completion:] and whole.truncated == 0
    cut = encode(records, TextFields(kind="causal_lm", prompt="prompt", completion="completion", max_length=4), tok, None)
    assert cut.truncated == len(records.rows)
    assert all(len(e["input_ids"]) == 4 and e["labels"][-1] != IGNORE for e in cut.examples)  # the completion stays


def test_truncation_is_counted_in_the_manifest(classifier, tmp_path):
    assert main(_args(classifier, tmp_path / "o", "--max_length", "5", "--top_k", "2")) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["data"]["truncated"]["train"] > 0 and m["data"]["max_length"] == 5


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "json", "datasets"])
def test_every_data_format_reads_the_same_rows(classifier, tmp_path, fmt):
    from tracin.workflows.text.records import read_records

    rows = [json.loads(line) for line in classifier[1].read_text().splitlines()]
    path = tmp_path / f"train.{fmt}"
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as handle:
            w = csv.DictWriter(handle, fieldnames=list(rows[0]), dialect="excel-tab" if fmt == "tsv" else "excel")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    assert read_records(path, "train").rows == rows


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_naming_the_fix(classifier, tmp_path, capsys):
    model, train, test, _ = classifier
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "holds no examples" in _err(capsys, _args((model, empty, test, None), tmp_path / "o"))
    err = _err(capsys, _args(classifier, tmp_path / "o", "--text_field", "sentence"))
    assert "no field 'sentence' (--text_field)" in err and "text, label, true_label" in err
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "goal match", "label": "politics"}) + "\n")
    err = _err(capsys, _args((model, odd, test, None), tmp_path / "o"))
    assert "'politics'" in err and "sports, weather, food" in err
    bare = tmp_path / "bare"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "checkpoint-*"))
    assert "has no tokenizer" in _err(capsys, _args((bare, train, test, None), tmp_path / "o"))
    assert "--prompt_field" in _err(capsys, _args(classifier, tmp_path / "o", "--prompt_field", "text"))
    assert "does not exist" in _err(capsys, _args((model, tmp_path / "none.jsonl", test, None), tmp_path / "o"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "goal", "label": "sports"}\n{not json\n')
    assert "bad.jsonl:2 is not valid JSON" in _err(capsys, _args((model, bad, test, None), tmp_path / "o"))


def _quiet(**settings):
    from tracin.config import ScoringConfig

    return ScoringConfig(**{"layers": "last", "batch_size": 16, "progress": False, **settings})


@pytest.mark.slow
def test_the_readme_text_example_finds_the_flipped_labels(tmp_path):
    """examples/text_classification.py (transformers.Trainer, checkpoint-N/ folders, tokenizer saved with them), then
    tracin text --self_influence and tracin report, as the README runs them."""
    import subprocess
    import sys
    from pathlib import Path

    from sklearn.metrics import roc_auc_score

    pytest.importorskip("accelerate")
    example = Path(__file__).resolve().parents[2] / "examples" / "text_classification.py"
    subprocess.run([sys.executable, str(example), "--output_dir", str(tmp_path)], check=True, capture_output=True, text=True)
    out = tmp_path / "results"
    assert main(["text", "--model_dir", str(tmp_path / "model"), "--train", str(tmp_path / "train.jsonl"), "--test",
                 str(tmp_path / "test.jsonl"), "--output_dir", str(out), "--self_influence", "--quiet"]) == 0
    assert main(["report", "--results_dir", str(out), "--quiet"]) == 0
    auc = roc_auc_score(np.load(tmp_path / "flipped.npy"), np.load(out / "self_influence.npy"))
    assert auc >= 0.9
    first = list(csv.DictReader(open(out / "top_k_influences.csv")))[0]
    page = (out / "report.html").read_text()
    assert first["test_text"] in page and first["train_text"] in page


def test_a_trainer_output_folder_as_checkpoint_dir_sums_its_checkpoint_folders(classifier, tmp_path):
    model = classifier[0]
    assert main(_args(classifier, tmp_path / "o", "--checkpoint_dir", str(model), "--top_k", "2")) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [c["step"] for c in m["checkpoints"]] == sorted(c["step"] for c in m["checkpoints"]) and len(m["checkpoints"]) == 6


def test_label_names_meet_a_config_that_never_named_its_classes(classifier, tmp_path):
    model = tmp_path / "generic"
    shutil.copytree(classifier[0], model, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((model / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(3)}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="numbered in sorted order: food=0, sports=1, weather=2"):
        assert main(_args((model, *classifier[1:]), tmp_path / "o", "--top_k", "2")) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["data"]["class_names"] == ["food", "sports", "weather"]

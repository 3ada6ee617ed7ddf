"""``tracin train --in_run O``: in-run TracIn recorded while the image classifier trains, written as the result files of
``tracin influence --self_influence`` so that ``tracin report --results_dir O`` reads them.

Self-influence is recorded over the output layer's bias (its last layer's parameters when it has no bias), as
``--self_influence`` scores it; influence of every training image on every test image over the last layer, K-FAC
preconditioned in-run as ``tracin influence`` preconditions by default (:class:`tracin.engine.inrun.InRunConfig`), with
the test images' gradients taken every ``--in_run_query_every`` steps (once per epoch by default) in eval mode on the
plain images. Both sum the optimizer's learning rate times the gradients of every step the training image was in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from ...checkpoints import Checkpoint, weights_for
from ...engine.inrun import InRun
from ...errors import TracInError
from ...tasks.classification import predict_proba
from ..results_dir import ResultsDir, RunRecord, Scored, job_parameters, write_self_influence, write_top_k
from .folders import ImageDataset
from .training_data import ImageTraining, TrainingData


TOP_K = 100  # proponents and opponents kept per test image, as tracin influence keeps by default


def in_run_recorder(model: nn.Module, opt: torch.optim.Optimizer, data: TrainingData, training: ImageTraining) -> InRun:
    """The recorder of a ``tracin train --in_run`` run, before its first step."""
    if training.in_run_query_every < 0:
        raise TracInError(f"--in_run_query_every must be 0 (once per epoch) or more steps, got {training.in_run_query_every}.")
    out = Path(training.in_run)  # type: ignore[arg-type]
    if out.exists() and not out.is_dir():
        raise TracInError(f"--in_run {out} is a file; give a folder for the in-run results.")
    every = training.in_run_query_every or max(1, len(data.steps))
    queries = ImageDataset(data.test_split, data.plain)
    common = dict(queries=queries, layers="last", query_every=every, top_k=min(TOP_K, len(data.fit)),
                  query_batch_size=max(training.batch_size, 64))
    tries = [{"self_influence_layers": "output_bias", "precondition": "kfac"}, {"precondition": "kfac"},
             {"precondition": "none"}]  # no output bias: the last layer's; K-FAC cannot cover it: plain
    for extra in tries:
        try:
            recorder = InRun(model, opt, len(data.train_split.paths), **common, **extra)
            break
        except TracInError:
            if extra is tries[-1]:
                raise
    return recorder


def write_in_run(recorder: InRun, data: TrainingData, training: ImageTraining, best_model: Path,
                 seconds: float) -> Dict[str, Any]:
    """The result files and, last, the manifest of the in-run record (``seconds`` of training), in ``training.in_run``."""
    recorder.remove()
    fit = np.asarray(data.fit)
    result = recorder.result(fit.tolist())  # the training images trained on; top-k as the recorder keeps it
    assert result.proponents is not None, "the test images are queried at the first step"
    tables = _tables(recorder.model, data, best_model, recorder.device)
    out = ResultsDir(Path(training.in_run))  # type: ignore[arg-type]
    with out:
        write_top_k(out, result, tables["train"], tables["test"])
        assert result.self_influence is not None
        write_self_influence(out, result.self_influence.numpy(), tables["train"])
        accuracy = {split: float(t.correct.mean()) for split, t in tables.items()}
        record = {"data_dir": str(Path(data.data_dir).resolve()),
                  "class_names": data.classes, "arch": training.arch, "image_size": training.image_size,
                  "n_train_total": len(data.train_split.paths), "n_test_total": len(data.test_split.paths),
                  "n_train": len(fit), "n_test": len(data.test_split.paths), "accuracy": accuracy,
                  "skipped_files": [{"file": f, "reason": r} for f, r in data.train_split.skipped + data.test_split.skipped]}
        extra = {"prediction_model": {"file": str(Path(best_model).resolve())}, "in_run": recorder.describe()}
        return out.finish("train --in_run", recorder, RunRecord(job_parameters(training), record,
                                                                 {"training_s": seconds}, recorder.describe(), [], extra))


def _tables(model: nn.Module, data: TrainingData, best_model: Path, device: torch.device) -> Dict[str, Scored]:
    """Both splits' images as the result tables name them, with best_model.pt's predictions."""
    model.load_state_dict(weights_for(model, Checkpoint(best_model)))
    tables = {}
    for split, folder, idx in (("train", data.train_split, np.asarray(data.fit)),
                               ("test", data.test_split, np.arange(len(data.test_split.paths)))):
        probs = predict_proba(model, Subset(ImageDataset(folder, data.plain), idx.tolist()), device, 64)
        conf, pred = probs.max(1)
        labels = np.asarray([folder.labels[i] for i in idx.tolist()])
        tables[split] = Scored(idx, [str(folder.paths[i]) for i in idx.tolist()], [data.classes[c] for c in labels],
                               [data.classes[int(p)] for p in pred], conf.numpy(), labels == pred.numpy())
    return tables

"""The ``tracin text`` job: a user's Hugging Face model and text files in, the result files of ``tracin influence``
out (every table also carrying the texts), ready for ``tracin report``."""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from torch.utils.data import DataLoader, Subset

from ...api import TracIn
from ...checkpoints import weights_for
from ...config import ScoringConfig
from ...engine.resume import reset
from ...engine.scope import parameterised_modules, resolve_layers
from ...layers.exact import ExactHandler
from ...layers.tied import TiedHandler
from ...errors import TracInError
from ...io import file_sha256
from ...results import InfluenceResult
from ...tasks.hf import HFTask
from .. import results_dir as names
from ..results_dir import ResultsDir, RunRecord, Scored, job_parameters, seeded_subset, write_self_influence, write_top_k
from .encode import Encoded, Examples, LabelSet, PadBatch, TextFields, encode
from .model import TextModel, load_text_model
from .predict import predict
from .records import read_records


@dataclass
class TextJob:
    """A ``tracin text`` run: the model and data, which fields hold what, what to write, the scoring settings."""

    model_dir: Path
    train: Path
    test: Path
    output_dir: Path
    checkpoint_dir: Optional[Path] = None
    task: str = "auto"  # auto | sequence | causal_lm
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    prompt_field: Optional[str] = None
    completion_field: str = "completion"
    max_length: int = 512
    top_k: int = 10
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    self_influence: bool = False
    learning_rate: Optional[float] = None  # for checkpoints that store none
    device: str = "auto"
    trust_checkpoint: bool = False
    overwrite: bool = False
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(layers="last", batch_size=16))


@dataclass
class _Text:
    """One text run as it goes."""

    job: TextJob
    setup: TextModel
    fields: TextFields
    splits: Dict[str, Encoded]
    where: Dict[str, list]  # split -> every example's file:line
    index: Dict[str, np.ndarray]  # split -> the scored examples' positions
    tr: TracIn
    out: ResultsDir
    timings: Dict[str, float] = field(default_factory=dict)

    def loader(self, split: str) -> DataLoader:
        data = Subset(Examples(self.splits[split].examples), self.index[split].tolist())
        return DataLoader(data, batch_size=self.tr.config.batch_size, shuffle=False, collate_fn=PadBatch(_pad_id(self.setup)))


def run_text(job: TextJob) -> Dict[str, Any]:
    """Score top-k proponents/opponents of every test text (and self-influence of every training text); write the
    result files and, last, ``manifest.json``, which is returned."""
    t_start = time.perf_counter()
    run = _set_up(job)
    run.timings["setup_s"] = time.perf_counter() - t_start
    hashes = [file_sha256(Path(c.source)) for c in run.setup.checkpoints]
    with run.out:
        result = _score(run, hashes)
        run.timings["influence_s"] = time.perf_counter() - t_start - run.timings["setup_s"]
        tables = {split: _scored(run, split) for split in ("train", "test")}
        write_top_k(run.out, result, tables["train"], tables["test"])
        if result.self_influence is not None:
            write_self_influence(run.out, result.self_influence.numpy(), tables["train"])
        run.timings["total_s"] = time.perf_counter() - t_start
        manifest = _write_manifest(run, result, tables, hashes)
    reset(run.out.progress)
    return manifest


def _set_up(job: TextJob) -> _Text:
    out = Path(job.output_dir)
    if out.exists() and not out.is_dir():
        raise TracInError(f"--output_dir {out} is a file; give a folder (new or holding tracin results).")
    setup = load_text_model(job.model_dir, job.checkpoint_dir, job.task, job.learning_rate, job.trust_checkpoint)
    records = {"train": read_records(job.train, "train"), "test": read_records(job.test, "test")}
    fields = _fields(job, setup, records["train"].fields)
    labels = None
    if setup.kind == "sequence":
        labels = LabelSet(setup.label_names).named_for([v for r in records.values() for v in r.column(fields.label, "--label_field")])
        setup.label_names = labels.names
    splits = {split: encode(r, fields, setup.tokenizer, labels) for split, r in records.items()}
    where = {split: r.where for split, r in records.items()}
    seed = job.scoring.seed
    index = {"train": seeded_subset(len(where["train"]), job.train_subset, seed, "train", "texts"),
             "test": seeded_subset(len(where["test"]), job.test_subset, seed + 1, "test", "texts")}
    if job.top_k > len(index["train"]):
        raise TracInError(f"--top_k {job.top_k} is larger than the training set ({len(index['train'])} texts); use --top_k "
                          f"{len(index['train'])} or less.")
    tr = TracIn(setup.model, setup.checkpoints, task=HFTask(setup.kind), device=job.device, config=_scoring(job, setup))
    if job.overwrite:
        reset(out / names.PROGRESS)
    run = _Text(job, setup, fields, splits, where, index, tr, ResultsDir(out, keep_partial=(out / names.PROGRESS).exists()))
    if job.scoring.progress:
        print(f"Scoring {len(index['train'])} training x {len(index['test'])} test texts with {type(setup.model).__name__} "
              f"({setup.kind}) over {len(setup.checkpoints)} checkpoint(s), {len(tr.handlers)} layer(s), "
              f"{tr.num_parameters:,} parameters in scope.", file=sys.stderr)
    return run


def _scoring(job: TextJob, setup: TextModel) -> ScoringConfig:
    """The job's settings, except that ``--layers last`` on a model whose output layer shares its weight with the
    token table (GPT-2's tied head: its per-example gradients are the whole table, [V, d] numbers per text) takes the
    last layer with a kernel of its own instead, with a warning naming it."""
    if job.scoring.layers != "last" or not all(isinstance(h, (ExactHandler, TiedHandler)) for h in resolve_layers(setup.model, "last")):
        return job.scoring
    for name, _, _ in reversed(parameterised_modules(setup.model)):
        handlers = resolve_layers(setup.model, [name]) if name else []
        if handlers and all(h.kronecker and not isinstance(h, ExactHandler) for h in handlers):
            warnings.warn(f"The model's output layer shares its weight with the token table (tied), so each text's gradient "
                          f"there is the whole table (vocabulary x width numbers); scoring {name!r}, the last layer with a "
                          "kernel of its own (--layers names others, the tied table included).", stacklevel=2)
            return job.scoring.replace(layers=[name])
    return job.scoring


def _fields(job: TextJob, setup: TextModel, found: List[str]) -> TextFields:
    """The fields and the longest sequence, checked against the task and the training data's ``found`` fields: a
    language model's data holding a "prompt" and the completion field but no --text_field is read as prompts and
    completions; a --max_length beyond the model's position table is lowered to it (with a warning)."""
    if job.max_length < 1:
        raise TracInError(f"--max_length must be at least 1, got {job.max_length}.")
    if job.prompt_field and setup.kind != "causal_lm":
        raise TracInError("--prompt_field describes a causal language model's data, but the model is a sequence classifier; "
                          "give --text_field and --label_field, or --task causal_lm with a language model.")
    prompt = job.prompt_field
    if setup.kind == "causal_lm" and prompt is None and job.text_field not in found and {"prompt", job.completion_field} <= set(found):
        prompt = "prompt"
        warnings.warn(f"The data has no {job.text_field!r} field but 'prompt' and {job.completion_field!r}: the loss is on "
                      "the completions (as with --prompt_field prompt).", stacklevel=2)
    limit = job.max_length
    if setup.max_positions and limit > setup.max_positions:
        if job.max_length != TextJob.max_length:
            warnings.warn(f"--max_length {limit} is longer than the model takes ({setup.max_positions} positions); "
                          f"sequences are cut to {setup.max_positions} tokens.", stacklevel=2)
        limit = setup.max_positions
    return TextFields(kind=setup.kind, text=job.text_field, text_pair=job.text_pair_field, label=job.label_field,
                      prompt=prompt, completion=job.completion_field, max_length=limit)


def _pad_id(setup: TextModel) -> int:
    tok = setup.tokenizer
    for value in (tok.pad_token_id, tok.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _score(run: _Text, hashes: list) -> InfluenceResult:
    """Top-k (and self-influence) of the scored texts, resumable: keyed by the job, the checkpoints and the data."""
    job = run.job
    volatile = ("overwrite", "device", "progress", "memory_budget", "num_workers")
    key = {"parameters": {k: str(v) for k, v in job_parameters(job).items() if k not in volatile}, "checkpoints": hashes,
           "data": [_digest(job.train), _digest(job.test)]}
    result = run.tr.influence(run.loader("train"), run.loader("test"), top_k=job.top_k, resume_dir=run.out.progress,
                              resume_key=key, keep_progress=True)
    if job.self_influence:
        result.self_influence = _detector(run).self_influence(run.loader("train"))
    return result


def _digest(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    return ";".join(f"{p.name}:{file_sha256(p)}" for p in sorted(path.iterdir()) if p.is_file())


def _detector(run: _Text) -> TracIn:
    """Self-influence as ``tracin influence`` scores it by default: K-FAC over the output layer's bias, unprojected;
    where the output layer has no bias, its whole last layer; where K-FAC cannot cover that (a language model's head
    tied to its input embedding), the plain inner product over it."""
    base = run.tr.config.replace(projection_dim=None, normalize="none", exclude=())
    tries = [base.replace(layers="output_bias", precondition="kfac"), base.replace(layers="last", precondition="kfac"),
             base.replace(layers="last", precondition="none")]
    for config in tries:
        try:
            return TracIn(run.setup.model, run.setup.checkpoints, task=run.tr.task, device=run.job.device, config=config)
        except TracInError:
            if config is tries[-1]:
                raise
    raise AssertionError("unreachable")


def _scored(run: _Text, split: str) -> Scored:
    """The scored texts of ``split`` as the tables name them, with the prediction model's outputs."""
    setup, encoded, idx = run.setup, run.splits[split], run.index[split]
    setup.model.load_state_dict(weights_for(setup.model, setup.prediction))
    made = predict(setup, run.loader(split), run.tr.device)
    return Scored(idx, [run.where[split][i] for i in idx.tolist()], [encoded.target[i] for i in idx.tolist()],
                  made.predicted, made.confidence, made.correct, [encoded.shown[i] for i in idx.tolist()])


def _write_manifest(run: _Text, result: InfluenceResult, tables: Dict[str, Scored], hashes: list) -> Dict[str, Any]:
    job, setup = run.job, run.setup
    accuracy = {split: float(np.mean(t.correct)) if len(t.correct) else float("nan") for split, t in tables.items()}
    data = {"modality": "text", "task": setup.kind, "model_dir": str(Path(job.model_dir).resolve()),
            "data_dir": str(Path(job.train).resolve().parent), "train_file": str(Path(job.train).resolve()),
            "test_file": str(Path(job.test).resolve()), "class_names": setup.label_names, "arch": type(setup.model).__name__,
            "n_train_total": len(run.where["train"]), "n_test_total": len(run.where["test"]),
            "n_train": len(run.index["train"]), "n_test": len(run.index["test"]), "accuracy": accuracy,
            "max_length": run.fields.max_length, "truncated": {s: e.truncated for s, e in run.splits.items()},
            "fields": {k: v for k, v in vars(run.fields).items() if k not in ("kind", "max_length")}, "skipped_files": []}
    same = setup.prediction is setup.checkpoints[-1]  # the last checkpoint's weights: already hashed
    prediction = {"file": str(Path(setup.prediction.source).resolve()),
                  "sha256": hashes[-1] if same else file_sha256(Path(setup.prediction.source))}
    return run.out.finish("text", run.tr, RunRecord(job_parameters(job), data, run.timings, result.stats, hashes,
                                                   {"prediction_model": prediction}))

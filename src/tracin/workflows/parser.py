"""The ``tracin`` command line's parser: one sub-command each, the scoring flags generated from
:class:`tracin.config.ScoringConfig`, and the namespace turned back into a config."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from dataclasses import fields
from typing import Any, List, Sequence, Type, TypeVar, Union

from ..config import LAYER_WORDS, ScoringConfig, fields_with_flags
from ..errors import TracInError
from ..version import __version__

T = TypeVar("T")


# the help of flags that several commands share, where a command does not give its own
COMMON_HELP = {
    "--data_dir": "image folder with train/<class>/ and test/<class>/ sub-folders",
    "--output_dir": "folder for the results (created; a rerun replaces what it held)",
    "--checkpoint_dir": "folder of checkpoints",
    "--results_dir": "a results folder written by tracin influence",
    "--top_k": "proponents and opponents kept per test example",
    "--epochs": "training epochs",
    "--learning_rate": "SGD or AdamW learning rate",
    "--batch_size": "examples per step",
    "--image_size": "images are resized to this square size",
    "--seed": "random seed (data order, initialisation, noise)",
    "--seeds": "random seeds, one run each",
    "--device": "auto (cuda, then mps, then cpu) or a torch device",
    "--quiet": "no progress bars",
    "--noise_rate": "share of training labels flipped",
    "--noise": "uniform: to any other class; asymmetric: by --flip",
    "--n_test": "test examples scored",
    "--compute_self_influence": "rank every training pair by self-influence",
    "--compute_influence": "proponents and opponents of --num_test_samples test pairs",
    "--projection_dims": "projection sizes to compare with the exact scores",
    "--sample_rates": "training-set sampling rates to compare with the exact scores",
    "--action": "remove the suspects, or relabel them with the model's prediction",
}


OLD_SPELLINGS = {"--projection": ["--projection_type"]}  # flags renamed to the setting's own name, still accepted


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--some_flag``, its dashed twin ``--some-flag`` and any older spelling; the formatter adds each default to
    the help."""
    names = [n for flag in [name, *OLD_SPELLINGS.get(name, [])] for n in [flag] + ([flag.replace("_", "-")] if "_" in flag else [])]
    kwargs.setdefault("help", COMMON_HELP.get(name, name.lstrip("-").replace("_", " ")))
    parser.add_argument(*names, **kwargs)


def parse_layers(text: str) -> Union[str, int, List[str]]:
    """'last' | 'all' | 'output_bias' | an int N | comma-separated module or parameter names or glob patterns."""
    if text in LAYER_WORDS:
        return text
    if text.isdigit():
        return int(text)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--layers needs last, all, output_bias, a number or module names")
    return names


def gib_to_bytes(text: str) -> int:
    """--memory_budget's GiB as bytes."""
    try:
        gib = float(text)
    except ValueError:
        gib = float("nan")
    if not (gib > 0 and math.isfinite(gib)):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text!r}")
    return int(gib * 2**30)


AUGMENT_HELP = ("none | crop | flip | crop_flip: random shifts and/or mirrors of the training images while training "
                "(influence always reads the plain images)")
LR_SCHEDULE_HELP = "constant | cosine (per epoch, from --learning_rate towards 0)"
ARCH_HELP = "smallcnn or any torchvision classification model: resnet18, resnet50, vit_b_16, efficientnet_b0, ..."
# how each scoring setting's flag parses (the rest are strings); names, help and choices come from ScoringConfig
FLAG_TYPES = {"layers": parse_layers, "exclude": lambda text: [t.strip() for t in text.split(",") if t.strip()], "batch_size": int, "num_workers": int, "seed": int, "projection_dim": int,
              "sample_rate": float, "damping": float, "memory_budget": gib_to_bytes}


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line (what is wrong, and where the flags are listed), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"tracin: error: {message} (see '{self.prog} --help').\n")


class _Formatter(argparse.HelpFormatter):
    """--help shows each flag's default once: not where the help already says it, nor for switches or unset flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _scoring_flags(parser: argparse.ArgumentParser, names: Sequence[str], **defaults: Any) -> None:
    """Add the flags of the scoring settings ``names`` as :class:`tracin.config.ScoringConfig` declares them
    (flag, help, choices, default), with per-command ``defaults``; ``stratify_by_choices=`` narrows --stratify_by."""
    stratify_choices = defaults.pop("stratify_by_choices", None)
    for name, flag, meta in fields_with_flags():
        if name not in names:
            continue
        choices = list(meta["choices"]) if meta["choices"] else (stratify_choices if name == "stratify_by" else None)
        _add(parser, flag, dest=name, type=FLAG_TYPES.get(name, str), default=defaults.get(name, meta["default"]),
             choices=choices, help=meta["help"])


def _run_flags(parser: argparse.ArgumentParser, trust: str = "allow checkpoints that need pickled code (runs code from the file)") -> None:
    """The flags every command that reads checkpoints shares: device, trust, quiet."""
    _add(parser, "--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device")
    _add(parser, "--trust_checkpoint", action="store_true", help=trust)
    _add(parser, "--quiet", action="store_true", help="no progress bars")


def _projection_flags(parser: argparse.ArgumentParser, dim: int) -> None:
    _add(parser, "--use_projection", action="store_true",
         help=f"project per-example gradients (approximate, unbiased) to --projection_dim dimensions per layer ({dim} if not given)")
    _scoring_flags(parser, ["projection_dim", "projection"])
    parser.set_defaults(projection_default=dim)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tracin", description="TracIn training-data influence for PyTorch models.",
                                formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"tracin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _influence_parser, _text_parser, _index_parser, _audit_parser, _report_parser,
                _ranking_parser, _kge_parser, _evaluate_parser, _demo_parser):
        add(sub)
    return p


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train an image classifier on an image folder, saving checkpoints", formatter_class=_Formatter)
    _add(t, "--data_dir", type=Path, required=True, help="folder with train/<class>/ and test/<class>/")
    _add(t, "--arch", default="resnet18", help=ARCH_HELP)
    _add(t, "--epochs", type=int, default=10)
    _add(t, "--save_every", type=int, default=1, help="save a checkpoint every K epochs (and after the last)")
    _add(t, "--checkpoint_dir", type=Path, required=True)
    _add(t, "--learning_rate", type=float, default=0.01)
    _add(t, "--batch_size", type=int, default=32)
    _add(t, "--pretrained", type=Path, help="local weights file to start from (nothing is downloaded)")
    _add(t, "--image_size", type=int, default=224)
    _add(t, "--augment", default="none", help=AUGMENT_HELP)
    _add(t, "--lr_schedule", default="constant", help=LR_SCHEDULE_HELP)
    _add(t, "--val_fraction", type=float, default=0.0,
         help="share of each class held out (not trained on, not scored) to choose best_model.pt by validation accuracy; "
              "0: best_model.pt is the last epoch's (the test set never chooses)")
    _add(t, "--optimizer", choices=["sgd", "adamw"], default="sgd",
         help="sgd (momentum 0.9) or adamw; with adamw every checkpoint also stores the optimizer state")
    _add(t, "--seed", type=int, default=0)
    _add(t, "--in_run", type=Path, metavar="O",
         help="also record TracIn while training (every step the image was in) into results folder O: self-influence "
              "of every training image and the test images' top-k proponents/opponents, as tracin influence "
              "--self_influence writes them (tracin report --results_dir O reads them)")
    _add(t, "--in_run_query_every", type=int, default=0,
         help="with --in_run: steps between the test images' gradients (0: once per epoch)")
    _add(t, "--device", default="auto")
    _add(t, "--quiet", action="store_true", help="no progress bars")


def _influence_parser(sub) -> None:
    i = sub.add_parser("influence", help="top-k proponents/opponents (and self-influence) for an image folder", formatter_class=_Formatter)
    _add(i, "--data_dir", type=Path, required=True)
    _add(i, "--checkpoint_dir", type=Path, help="checkpoints of 'tracin train'; with --arch: every weights file in it, any name")
    _add(i, "--output_dir", type=Path, required=True)
    _own_model_flags(i)
    _add(i, "--top_k", type=int, default=100)
    _add(i, "--train_subset", type=int, help="score a seeded random subset of N training images")
    _add(i, "--test_subset", type=int, help="score a seeded random subset of M test images")
    _add(i, "--self_influence", action="store_true", help="also compute self-influence of every training image")
    _add(i, "--self_influence_layers", choices=["output_bias", "same"], default="output_bias",
         help="output_bias: K-FAC over the output layer's bias, the best mislabel detector measured (docs/quality.md); "
              "same: the influence scope and settings, in the same pass")
    _add(i, "--full_matrix", action="store_true", help="also write influence_matrix.npy [n_test, n_train] (disk-backed, in tiles)")
    _add(i, "--overwrite", action="store_true", help="discard an interrupted run's progress instead of resuming it")
    _add(i, "--summed_loss", action="store_true",
         help="with --self_influence: also rank training images by their loss summed over the checkpoints")
    _scoring_flags(i, INFLUENCE_SETTINGS + ["sample_rate", "stratify_by"], layers="last", batch_size=32,
                   stratify_by_choices=["label"])
    _projection_flags(i, 1024)
    _run_flags(i)


def _text_parser(sub) -> None:
    t = sub.add_parser("text", help="top-k proponents/opponents (and self-influence) for a Hugging Face text model and "
                                    "text files", formatter_class=_Formatter)
    _add(t, "--model_dir", type=Path, required=True,
         help="the model's folder (save_pretrained or a Trainer's output_dir): config, tokenizer, and its final weights "
              "(the predictions reported) and/or checkpoint-N/ folders")
    _add(t, "--checkpoint_dir", type=Path, help="the checkpoints to sum over: checkpoint-N/ or save_pretrained folders, or "
                                                "weights files (default: the checkpoint-N/ folders in --model_dir, else "
                                                "the model alone)")
    _add(t, "--train", type=Path, required=True, help="training texts: .jsonl, .json, .csv, .tsv, .parquet or a datasets "
                                                      "save_to_disk folder")
    _add(t, "--test", type=Path, required=True, help="test texts to explain, same formats")
    _add(t, "--output_dir", type=Path, required=True)
    _add(t, "--task", choices=["auto", "sequence", "causal_lm"], default="auto",
         help="sequence: a classifier's loss on --label_field; causal_lm: a language model's loss on the completion "
              "(or the whole text); auto: from the model's architecture")
    _add(t, "--text_field", default="text", help="the field holding the text")
    _add(t, "--text_pair_field", help="sequence: a second text (a sentence pair)")
    _add(t, "--label_field", default="label", help="sequence: the field holding the label (a class name or number)")
    _add(t, "--prompt_field", help="causal_lm: the prompt (its tokens get no loss); without it the whole --text_field "
                                   "is the loss")
    _add(t, "--completion_field", default="completion", help="causal_lm with --prompt_field: the completion")
    _add(t, "--max_length", type=int, default=512, help="tokens per sequence; longer ones are cut (counted in the manifest)")
    _add(t, "--top_k", type=int, default=10)
    _add(t, "--train_subset", type=int, help="score a seeded random subset of N training texts")
    _add(t, "--test_subset", type=int, help="score a seeded random subset of M test texts")
    _add(t, "--self_influence", action="store_true", help="also rank every training text by self-influence (K-FAC over "
                                                          "the output layer's bias): mislabelled or odd texts first")
    _add(t, "--learning_rate", type=float, help="the learning rate of checkpoints that log none")
    _add(t, "--overwrite", action="store_true", help="discard an interrupted run's progress instead of resuming it")
    _scoring_flags(t, INFLUENCE_SETTINGS, layers="last", batch_size=16)
    _projection_flags(t, 1024)
    _run_flags(t)


INFLUENCE_SETTINGS = ["layers", "exclude", "batch_size", "seed", "num_workers", "precision", "normalize", "precondition",
                      "damping", "measurement", "memory_budget"]


def _index_parser(sub) -> None:
    ix = sub.add_parser("index", help="a gradient index of the training images: built once, queried many times",
                        formatter_class=_Formatter)
    ixs = ix.add_subparsers(dest="index_command", required=True)
    b = ixs.add_parser("build", help="write every training image's gradient vector (resumable: run it again to finish)",
                       formatter_class=_Formatter)
    _add(b, "--data_dir", type=Path, required=True)
    _add(b, "--checkpoint_dir", type=Path, help="checkpoints of 'tracin train'; with --arch: every weights file in it, any name")
    _add(b, "--index_dir", type=Path, required=True, help="folder for the index (a rerun finishes an interrupted build)")
    _add(b, "--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
         help="storage of the vectors (16-bit halves the disk and the reading; scores are summed in float32)")
    _own_model_flags(b)
    _scoring_flags(b, INFLUENCE_SETTINGS, layers="last", batch_size=32)
    _projection_flags(b, 1024)
    _run_flags(b)
    q = ixs.add_parser("query", help="top-k proponents/opponents of the test images from an index, as tracin influence "
                                     "writes them", formatter_class=_Formatter)
    _add(q, "--index_dir", type=Path, required=True, help="an index written by tracin index build (its settings are used)")
    _add(q, "--data_dir", type=Path, required=True, help="the image folder the index was built from")
    _add(q, "--checkpoint_dir", type=Path, help="the checkpoints the index was built with")
    _add(q, "--output_dir", type=Path, required=True)
    _own_model_flags(q)
    _add(q, "--top_k", type=int, default=100)
    _add(q, "--test_subset", type=int, help="score a seeded random subset of M test images")
    _add(q, "--self_influence", action="store_true", help="also write the self-influence the index stores (its layers "
                                                          "and settings)")
    _add(q, "--ann_probes", type=int, help="approximate search instead of the exact one: probe N lists of a FAISS "
                                            "inverted-file index (pip install -e '.[ann]'; built once in --index_dir)")
    _add(q, "--overwrite", action="store_true", help="replace the results in --output_dir")
    _run_flags(q)
    info = ixs.add_parser("info", help="what an index holds: rows, parts, completeness, settings, size",
                          formatter_class=_Formatter)
    _add(info, "--index_dir", type=Path, required=True, help="an index written by tracin index build")


def _own_model_flags(parser: argparse.ArgumentParser) -> None:
    """A model trained outside 'tracin train': its architecture, weights and preprocessing."""
    _add(parser, "--arch", help=f"a model you trained yourself: {ARCH_HELP}, or module:callable building it")
    _add(parser, "--model_path", type=Path, help="with --arch: its weights file (a state dict or a common wrapper); the model "
                                                 "whose predictions are reported, and the one checkpoint without --checkpoint_dir")
    _add(parser, "--learning_rate", type=float, help="with --arch: the learning rate of weights files that store none")
    _add(parser, "--image_size", type=int, default=224, help="with --arch: the input size the model was trained on (must match training)")
    _add(parser, "--num_classes", type=int, help="with --arch: the model's outputs (default: the number of class folders)")
    _add(parser, "--mean", help="with --arch: the normalisation mean used in training, one number or one per channel, e.g. "
                                "0.5 or 0.485,0.456,0.406 (default: ImageNet's; must match training)")
    _add(parser, "--std", help="with --arch: the normalisation std used in training, one number or one per channel, e.g. "
                               "0.5 or 0.229,0.224,0.225 (default: ImageNet's; must match training)")


def own_model(a: argparse.Namespace):
    """The :class:`OwnModel` of the parsed flags, or None for checkpoints of 'tracin train'."""
    from .image.setup import PICKLED, OwnModel, parse_triple

    arch = a.arch
    if arch is None and a.model_path is not None and a.trust_checkpoint:
        arch = PICKLED  # a whole pickled model: the file gives the architecture
    if arch is None:
        mine = [f for f in ("model_path", "learning_rate", "num_classes", "mean", "std") if getattr(a, f) is not None]
        if mine:
            raise TracInError(f"--{mine[0]} describes a model you trained yourself; add --arch (its architecture), or "
                              "--trust_checkpoint when --model_path holds the whole pickled model.")
        if a.checkpoint_dir is None:
            raise TracInError("Give --checkpoint_dir (checkpoints of 'tracin train'), or --arch with --model_path or "
                              "--checkpoint_dir for a model you trained yourself.")
        return None
    return OwnModel(arch=arch, model_path=a.model_path, learning_rate=a.learning_rate, image_size=a.image_size,
                    num_classes=a.num_classes, mean=parse_triple(a.mean) if a.mean else None,
                    std=parse_triple(a.std) if a.std else None)


def _audit_parser(sub) -> None:
    au = sub.add_parser("audit", help="speed and agreement of fast configurations against the exact scores", formatter_class=_Formatter)
    _add(au, "--data_dir", type=Path, required=True)
    _add(au, "--checkpoint_dir", type=Path, help="checkpoints of 'tracin train'; with --arch: every weights file in it, any name")
    _own_model_flags(au)
    _add(au, "--n_test", type=int, default=20, help="test images to compare on")
    _add(au, "--projection_dims", type=int, nargs="*", default=[256, 1024])
    _add(au, "--sample_rates", type=float, nargs="*", default=[0.5])
    _add(au, "--top", type=int, default=10, help="k of the top-k overlap")
    _add(au, "--output", type=Path, help="also write the table as JSON here")
    _scoring_flags(au, ["layers", "batch_size", "seed", "projection", "precondition"], layers="last", batch_size=32)
    _run_flags(au)


def _report_parser(sub) -> None:
    r = sub.add_parser("report", help="dashboard, class summaries, image folders, mispredictions, HTML report", formatter_class=_Formatter)
    _add(r, "--results_dir", type=Path, required=True)
    _add(r, "--top_n", type=int, default=10, help="helpful/harmful images per class")
    _add(r, "--html_tests", type=int, default=100, help="test images shown with their proponents in report.html")
    _add(r, "--gradcam", type=int, default=0, metavar="N", help="Grad-CAM overlays for the first N test images (pip install -e '.[gradcam]')")
    _add(r, "--quiet", action="store_true", help="no progress lines")


def _ranking_parser(sub) -> None:
    rk = sub.add_parser("ranking", help="self-influence and influence for a pairwise ranking model", formatter_class=_Formatter)
    _add(rk, "--pairs_train", type=Path, required=True, help="training pairs (.csv or .npz; see the README)")
    _add(rk, "--pairs_test", type=Path, help="test pairs (needed with --compute_influence)")
    _add(rk, "--checkpoint_dir", type=Path, required=True)
    _add(rk, "--checkpoint_prefix", default="model_epoch_", help="checkpoint file names start with this")
    _add(rk, "--output_dir", type=Path, required=True)
    _add(rk, "--compute_self_influence", action="store_true")
    _add(rk, "--compute_influence", action="store_true")
    _add(rk, "--num_test_samples", type=int, default=5, help="seeded sample of test pairs to explain")
    _add(rk, "--loss_type", choices=["standard", "ghm"], help="standard: MarginRankingLoss; ghm: GHM ranking loss "
                                                               "(default: as the checkpoints store it, else standard)")
    _add(rk, "--margin", type=float, help="MarginRankingLoss margin (default: as the checkpoints store it, else 0)")
    _add(rk, "--ghm_bins", type=int, help="GHM histogram bins (default: as stored, else 10)")
    _add(rk, "--ghm_alpha", type=float, help="GHM weight exponent, 1: GHM-C, 0: plain logistic loss (default: as stored, else 1)")
    _scoring_flags(rk, ["layers", "exclude", "batch_size", "seed"], batch_size=256, seed=42)
    _run_flags(rk)


def _kge_parser(sub) -> None:
    kg = sub.add_parser("kge", help="influence of training triples on a PyKEEN knowledge-graph model's test triples", formatter_class=_Formatter)
    _add(kg, "--model_path", type=Path, required=True, help="a checkpoint file, a folder of them, or a pickled PyKEEN model")
    _add(kg, "--train", type=Path, required=True, help="training triples, head<TAB>relation<TAB>tail labels (.tsv/.txt, .gz ok)")
    _add(kg, "--test", type=Path, required=True, help="test triples, same format")
    _add(kg, "--entity_to_id", type=Path, required=True, help="PyKEEN's entity_to_id.tsv(.gz)")
    _add(kg, "--relation_to_id", type=Path, required=True, help="PyKEEN's relation_to_id.tsv(.gz)")
    _add(kg, "--output", type=Path, required=True, help="output folder")
    _add(kg, "--mode", choices=["single", "batch"], default="batch", help="single: one test triple per pass (least memory)")
    _add(kg, "--test_indices", type=int, nargs="+", help="test triples to explain (default: all)")
    _add(kg, "--top_k", type=int, default=10)
    _add(kg, "--self_influence", action="store_true", help="also rank every training triple by self-influence")
    _add(kg, "--direction", choices=["tail", "both"], default="tail", help="both: add the head side (models with inverse triples)")
    _add(kg, "--label_smoothing", type=float, default=0.0, help="as the model was trained")
    _add(kg, "--learning_rate", type=float, help="learning rate of checkpoints that store none")
    _scoring_flags(kg, ["layers", "exclude", "batch_size", "seed", "sample_rate", "stratify_by"], batch_size=64,
                   stratify_by_choices=["relation", "head", "tail"])
    _projection_flags(kg, 256)
    _run_flags(kg, trust="allow a whole pickled model (runs code from the file)")


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="measure attribution quality: mislabel detection, data cleaning, LDS", formatter_class=_Formatter)
    evs = ev.add_subparsers(dest="evaluation", required=True)
    em = evs.add_parser("mislabel", help="recall and ROC AUC of flipped-label detection against loss and cleanlab baselines",
                        formatter_class=_Formatter)
    ec = evs.add_parser("cleaning", help="remove or relabel the top suspects, retrain, compare test accuracy", formatter_class=_Formatter)
    for e in (em, ec):
        _add(e, "--data", default="digits", help="digits (embedded), shapes (generated) or an image folder with train/ and test/")
        _add(e, "--output_dir", type=Path, required=True)
        _add(e, "--noise_rate", type=float, default=0.1)
        _add(e, "--noise", choices=["uniform", "asymmetric"], default="uniform")
        _add(e, "--flip", help="asymmetric map source:target,... by class name (default: digits 2:7,3:8,5:6,6:5,7:1; else pair flips)")
        _add(e, "--seeds", type=int, nargs="+", default=[0])
        _add(e, "--arch", default="smallcnn", help=ARCH_HELP)
        _add(e, "--epochs", type=int, default=12)
        _add(e, "--save_every", type=int, default=1, help="a checkpoint every K epochs (every epoch detects best: docs/quality.md)")
        _add(e, "--learning_rate", type=float, default=0.02)
        _add(e, "--batch_size", type=int, default=32)
        _add(e, "--image_size", type=int, default=16)
        _add(e, "--augment", default="none", help=AUGMENT_HELP)
        _add(e, "--lr_schedule", default="constant", help=LR_SCHEDULE_HELP)
        _scoring_flags(e, ["layers", "precondition"], layers="last")
        _add(e, "--device", default="auto")
        _add(e, "--quiet", action="store_true")
    _add(em, "--cv_folds", type=int, default=5, help="folds of the cross-validated cleanlab baseline")
    _add(em, "--no_cleanlab", action="store_true", help="skip the cleanlab baseline (K more trainings per seed)")
    _add(ec, "--fraction", type=float, default=0.1, help="share of the training set to remove or relabel")
    _add(ec, "--action", choices=["remove", "relabel"], default="remove")
    _lds_parser(evs)


def _lds_parser(evs) -> None:
    el = evs.add_parser("lds", help="linear datamodeling score: retrain on random halves, correlate with summed scores",
                        formatter_class=_Formatter)
    _add(el, "--data", default="digits", choices=["digits", "mnist1d"], help="digits (scikit-learn) or mnist1d (generated offline)")
    _add(el, "--model", default="mlp", choices=["mlp", "cnn"], help="an MLP or a small CNN without normalisation layers")
    _add(el, "--optimizer", default="sgd", choices=["sgd", "adamw"], help="sgd: momentum 0.9; adamw: torch's defaults")
    _add(el, "--epochs", type=int, default=20)
    _add(el, "--learning_rate", type=float, help="default: 0.05 (sgd), 0.003 (adamw)")
    _add(el, "--subsets", type=int, default=100, help="random halves of the training set, each retrained")
    _add(el, "--seeds", type=int, default=3, help="retrainings per half, averaged")
    _add(el, "--n_test", type=int, default=100)
    _add(el, "--methods", nargs="+", default=["default", "plain"],
         help="method presets to score (default: tracin's defaults; plain: precondition none; kfac_last, cosine, margin, final)")
    _add(el, "--output_dir", type=Path, required=True, help="where the table (lds.csv) and the retraining cache go")
    _add(el, "--quiet", action="store_true")


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the whole workflow on scikit-learn's digits with injected label noise", formatter_class=_Formatter)
    _add(d, "--output_dir", type=Path, required=True)
    _add(d, "--noise_rate", type=float, default=0.1)
    _add(d, "--seed", type=int, default=0)
    _add(d, "--in_run", action="store_true", help="also record in-run TracIn while training (tracin train --in_run) into "
                                                  "O/in_run_results, with its own report and detection figures")
    _add(d, "--device", default="auto")
    _add(d, "--quiet", action="store_true")


def job_from_args(job_type: Type[T], a: argparse.Namespace, **given: Any) -> T:
    """A job dataclass filled from the parsed flags: each field from the flag of its own name (so a job setting is
    named once, by its field), ``given`` for the rest (the scoring config, an own model), the field's default when the
    command has no such flag."""
    values = {f.name: getattr(a, f.name) for f in fields(job_type)  # type: ignore[arg-type]
              if f.name not in given and hasattr(a, f.name)}
    return job_type(**values, **given)


def scoring_config(a: argparse.Namespace) -> ScoringConfig:
    """The :class:`ScoringConfig` of a parsed scoring command: every setting it has a flag for, the rest default.
    A flag that does nothing without another is refused rather than ignored."""
    settings = {name: getattr(a, name) for name, _, _ in fields_with_flags() if hasattr(a, name)}
    if hasattr(a, "use_projection"):
        if not a.use_projection and a.projection_dim is not None:
            raise TracInError("--projection_dim only applies with --use_projection; add --use_projection or drop --projection_dim.")
        settings["projection_dim"] = (a.projection_dim or a.projection_default) if a.use_projection else None
    if getattr(a, "stratify_by", None) is not None and getattr(a, "sample_rate", None) is None:
        raise TracInError("--stratify_by only applies with --sample_rate; add --sample_rate or drop --stratify_by.")
    return ScoringConfig(progress=not a.quiet, **settings)

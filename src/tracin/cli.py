"""The ``tracin`` command line: train, influence, audit, report, demo, ranking, kge.

User errors print one line, ``tracin: error: ...``, and exit with code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Union

from .errors import TracInError


def _add(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add ``--some_flag`` and its dashed twin ``--some-flag``."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    parser.add_argument(*names, **kwargs)


def parse_layers(text: str) -> Union[str, int, List[str]]:
    """'last' | 'all' | 'output_bias' | an int N | comma-separated module or parameter names or glob patterns."""
    if text in ("last", "all", "output_bias"):
        return text
    if text.isdigit():
        return int(text)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--layers needs last, all, output_bias, a number or module names")
    return names


AUGMENT_HELP = ("none | crop | flip | crop_flip: random shifts and/or mirrors of the training images while training "
                "(influence always reads the plain images)")
LR_SCHEDULE_HELP = "constant | cosine (per epoch, from --learning_rate towards 0)"


def _add_run_flags(parser: argparse.ArgumentParser, batch_size: int, seed: int, trust: str) -> None:
    """The flags every scoring command shares: layers, batch size, device, seed, trust, quiet."""
    _add(parser, "--layers", type=parse_layers, default="all", help="last | all | output_bias | N | comma-separated module or parameter names")
    _add(parser, "--batch_size", type=int, default=batch_size)
    _add(parser, "--device", default="auto")
    _add(parser, "--seed", type=int, default=seed)
    _add(parser, "--trust_checkpoint", action="store_true", help=trust)
    _add(parser, "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tracin", description="TracIn training-data influence for PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an image classifier on an image folder, saving checkpoints")
    _add(t, "--data_dir", type=Path, required=True, help="folder with train/<class>/ and test/<class>/")
    _add(t, "--arch", choices=["resnet18", "resnet50", "smallcnn"], default="resnet18")
    _add(t, "--epochs", type=int, default=10)
    _add(t, "--save_every", type=int, default=1, help="save a checkpoint every K epochs (and after the last)")
    _add(t, "--checkpoint_dir", type=Path, required=True)
    _add(t, "--learning_rate", type=float, default=0.01)
    _add(t, "--batch_size", type=int, default=32)
    _add(t, "--pretrained", type=Path, help="local weights file to start from (nothing is downloaded)")
    _add(t, "--image_size", type=int, default=224)
    _add(t, "--augment", default="none", help=AUGMENT_HELP)
    _add(t, "--lr_schedule", default="constant", help=LR_SCHEDULE_HELP)
    _add(t, "--seed", type=int, default=0)
    _add(t, "--device", default="auto")
    _add(t, "--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("influence", help="top-k proponents/opponents (and self-influence) for an image folder")
    _add(i, "--data_dir", type=Path, required=True)
    _add(i, "--checkpoint_dir", type=Path, required=True)
    _add(i, "--output_dir", type=Path, required=True)
    _add(i, "--top_k", type=int, default=100)
    _add(i, "--batch_size", type=int, default=32)
    _add(i, "--train_subset", type=int, help="score a seeded random subset of N training images")
    _add(i, "--test_subset", type=int, help="score a seeded random subset of M test images")
    _add(i, "--layers", type=parse_layers, default="last", help="last | all | output_bias | N | comma-separated module or parameter names")
    _add(i, "--self_influence", action="store_true", help="also compute self-influence of every training image")
    _add(i, "--device", default="auto")
    _add(i, "--seed", type=int, default=0)
    _add(i, "--memory_budget", type=float, help="working memory in GiB (default: from free memory)")
    _add(i, "--num_workers", type=int, default=0, help="image-decoding worker processes")
    _add(i, "--use_projection", action="store_true", help="project per-example gradients (approximate, unbiased)")
    _add(i, "--projection_dim", type=int, default=1024, help="dimensions per layer with --use_projection")
    _add(i, "--projection_type", choices=["gaussian", "rademacher", "sparse"], default="gaussian")
    _add(i, "--sample_rate", type=float, help="score a seeded random fraction of the training set (approximate)")
    _add(i, "--stratify_by", choices=["label"], help="sample each class at --sample_rate")
    _add(i, "--full_matrix", action="store_true", help="also write influence_matrix.npy [n_test, n_train] (disk-backed, in tiles)")
    _add(i, "--trust_checkpoint", action="store_true", help="allow checkpoints that need pickled code (runs code from the file)")
    _add(i, "--overwrite", action="store_true", help="discard an interrupted run's progress instead of resuming it")
    _add(i, "--precision", choices=["fp32", "tf32", "bf16", "fp16"], default="fp32",
         help="fp32: exact (TF32 off while scoring); tf32: TF32 tensor cores on NVIDIA GPUs; bf16/fp16: autocast (all approximate, faster on GPUs)")
    _add(i, "--normalize", choices=["none", "cosine", "train"], default="none",
         help="cosine: unit-length gradients per checkpoint; train: unit-length training gradients")
    _add(i, "--precondition", choices=["none", "kfac"], default="none",
         help="kfac: precondition gradients with a K-FAC inverse Fisher fitted per checkpoint (Linear/Conv layers; exact)")
    _add(i, "--damping", type=float, default=0.1, help="K-FAC damping, a fraction of each factor's mean eigenvalue")
    _add(i, "--summed_loss", action="store_true",
         help="with --self_influence: also rank training images by their loss summed over the checkpoints")

    au = sub.add_parser("audit", help="speed and agreement of fast configurations against the exact scores")
    _add(au, "--data_dir", type=Path, required=True)
    _add(au, "--checkpoint_dir", type=Path, required=True)
    _add(au, "--n_test", type=int, default=20, help="test images to compare on")
    _add(au, "--layers", type=parse_layers, default="last")
    _add(au, "--projection_dims", type=int, nargs="*", default=[256, 1024])
    _add(au, "--projection_type", choices=["gaussian", "rademacher", "sparse"], default="gaussian")
    _add(au, "--sample_rates", type=float, nargs="*", default=[0.5])
    _add(au, "--top", type=int, default=10, help="k of the top-k overlap")
    _add(au, "--batch_size", type=int, default=32)
    _add(au, "--device", default="auto")
    _add(au, "--seed", type=int, default=0)
    _add(au, "--output", type=Path, help="also write the table as JSON here")
    _add(au, "--trust_checkpoint", action="store_true", help="allow checkpoints that need pickled code")
    _add(i, "--quiet", action="store_true")

    r = sub.add_parser("report", help="dashboard, class summaries, image folders, mispredictions, HTML report")
    _add(r, "--results_dir", type=Path, required=True)
    _add(r, "--top_n", type=int, default=10, help="helpful/harmful images per class")
    _add(r, "--html_tests", type=int, default=100, help="test images shown with their proponents in report.html")
    _add(r, "--gradcam", type=int, default=0, metavar="N", help="Grad-CAM overlays for the first N test images (pip install 'tracin[gradcam]')")

    rk = sub.add_parser("ranking", help="self-influence and influence for a pairwise ranking model")
    _add(rk, "--pairs_train", type=Path, required=True, help="training pairs (.csv or .npz; see the README)")
    _add(rk, "--pairs_test", type=Path, help="test pairs (needed with --compute_influence)")
    _add(rk, "--checkpoint_dir", type=Path, required=True)
    _add(rk, "--checkpoint_prefix", default="model_epoch_", help="checkpoint file names start with this")
    _add(rk, "--output_dir", type=Path, required=True)
    _add(rk, "--compute_self_influence", action="store_true")
    _add(rk, "--compute_influence", action="store_true")
    _add(rk, "--num_test_samples", type=int, default=5, help="seeded sample of test pairs to explain")
    _add(rk, "--loss_type", choices=["standard", "ghm"], default="standard", help="standard: MarginRankingLoss; ghm: GHM ranking loss")
    _add(rk, "--margin", type=float, default=0.0)
    _add(rk, "--ghm_bins", type=int, default=10)
    _add(rk, "--ghm_alpha", type=float, default=1.0, help="GHM weight exponent (1: GHM-C, 0: plain logistic loss)")
    _add_run_flags(rk, batch_size=256, seed=42, trust="allow checkpoints that need pickled code")

    kg = sub.add_parser("kge", help="influence of training triples on a PyKEEN knowledge-graph model's test triples")
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
    _add(kg, "--sample_rate", type=float, help="score a seeded random fraction of the training triples (approximate)")
    _add(kg, "--stratify_by", choices=["relation", "head", "tail"], help="sample each relation/head/tail at --sample_rate")
    _add(kg, "--use_projection", action="store_true", help="project per-example gradients (approximate, unbiased)")
    _add(kg, "--projection_dim", type=int, default=256)
    _add(kg, "--projection_type", choices=["gaussian", "rademacher", "sparse"], default="gaussian")
    _add(kg, "--direction", choices=["tail", "both"], default="tail", help="both: add the head side (models with inverse triples)")
    _add(kg, "--label_smoothing", type=float, default=0.0, help="as the model was trained")
    _add(kg, "--learning_rate", type=float, help="learning rate of checkpoints that store none")
    _add_run_flags(kg, batch_size=64, seed=0, trust="allow a whole pickled model (runs code from the file)")

    ev = sub.add_parser("evaluate", help="measure attribution quality: mislabel detection, data cleaning")
    evs = ev.add_subparsers(dest="evaluation", required=True)
    em = evs.add_parser("mislabel", help="recall and ROC AUC of flipped-label detection against loss and cleanlab baselines")
    ec = evs.add_parser("cleaning", help="remove or relabel the top suspects, retrain, compare test accuracy")
    for e in (em, ec):
        _add(e, "--data", default="digits", help="digits (embedded), shapes (generated) or an image folder with train/ and test/")
        _add(e, "--output_dir", type=Path, required=True)
        _add(e, "--noise_rate", type=float, default=0.1)
        _add(e, "--noise", choices=["uniform", "asymmetric"], default="uniform")
        _add(e, "--flip", help="asymmetric map source:target,... by class name (default: digits 2:7,3:8,5:6,6:5,7:1; else pair flips)")
        _add(e, "--seeds", type=int, nargs="+", default=[0])
        _add(e, "--arch", choices=["resnet18", "resnet50", "smallcnn"], default="smallcnn")
        _add(e, "--epochs", type=int, default=12)
        _add(e, "--save_every", type=int, default=1, help="a checkpoint every K epochs (every epoch detects best: docs/quality.md)")
        _add(e, "--learning_rate", type=float, default=0.02)
        _add(e, "--batch_size", type=int, default=32)
        _add(e, "--image_size", type=int, default=16)
        _add(e, "--augment", default="none", help=AUGMENT_HELP)
        _add(e, "--lr_schedule", default="constant", help=LR_SCHEDULE_HELP)
        _add(e, "--layers", type=parse_layers, default="last",
             help="layers of the self-influence ranking (mislabel also reports all layers, output_bias and last with K-FAC)")
        _add(e, "--precondition", choices=["none", "kfac"], default="none", help="preconditioning of that self-influence ranking")
        _add(e, "--device", default="auto")
        _add(e, "--quiet", action="store_true")
    _add(em, "--cv_folds", type=int, default=5, help="folds of the cross-validated cleanlab baseline")
    _add(em, "--no_cleanlab", action="store_true", help="skip the cleanlab baseline (K more trainings per seed)")
    _add(ec, "--fraction", type=float, default=0.1, help="share of the training set to remove or relabel")
    _add(ec, "--action", choices=["remove", "relabel"], default="remove")

    d = sub.add_parser("demo", help="the whole workflow on scikit-learn's digits with injected label noise")
    _add(d, "--output_dir", type=Path, required=True)
    _add(d, "--noise_rate", type=float, default=0.1)
    _add(d, "--seed", type=int, default=0)
    _add(d, "--device", default="auto")
    _add(d, "--quiet", action="store_true")
    return p


def _train(a) -> None:
    from .device import resolve_device
    from .train import train_image_classifier

    s = train_image_classifier(a.data_dir, a.arch, a.epochs, a.save_every, a.checkpoint_dir, a.learning_rate, a.batch_size,
                               a.pretrained, a.image_size, a.seed, resolve_device(a.device), progress=not a.quiet,
                               augment=a.augment, lr_schedule=a.lr_schedule)
    print(f"Saved {len(s.checkpoints)} checkpoints to {a.checkpoint_dir}; best test accuracy {s.best_test_accuracy:.1%} "
          f"({s.best_model.name}); log {s.log_csv}, curve {s.curve_png}.")


def _influence(a) -> None:
    from .image_influence import InfluenceJob, run_influence

    if a.memory_budget is not None and not a.memory_budget > 0:
        raise TracInError(f"--memory_budget must be a positive number of GiB, got {a.memory_budget}.")
    budget = int(a.memory_budget * 2**30) if a.memory_budget else None
    m = run_influence(InfluenceJob(a.data_dir, a.checkpoint_dir, a.output_dir, a.top_k, a.batch_size, a.train_subset,
                                   a.test_subset, a.layers, a.self_influence, a.device, a.seed, budget, not a.quiet,
                                   a.num_workers, a.projection_dim if a.use_projection else None, a.projection_type,
                                   a.sample_rate, a.stratify_by, a.trust_checkpoint, a.full_matrix, a.overwrite,
                                   a.precision, a.normalize, a.summed_loss, a.precondition, a.damping))
    if m is None:  # a torchrun rank other than 0: rank 0 reports
        return
    skipped = len(m["data"]["skipped_files"])
    print(f"Scored {m['data']['n_train']} training x {m['data']['n_test']} test images over {len(m['checkpoints'])} checkpoints, "
          f"{len(m['scope'])} layers ({m['num_parameters']:,} parameters) in {m['timings']['influence_s']:.1f}s on {m['device']}."
          + (f" Skipped {skipped} unreadable images (listed in the manifest)." if skipped else ""))
    print(f"Results in {a.output_dir}; next: tracin report --results_dir {a.output_dir}")


def _audit(a) -> None:
    from .audit import audit, format_table
    from .image_influence import image_setup
    from .outputs import write_json

    s = image_setup(a.data_dir, a.checkpoint_dir, a.trust_checkpoint)
    configs = {f"projection {d} {a.projection_type}": {"projection_dim": d, "projection": a.projection_type} for d in a.projection_dims}
    configs.update({f"sample {r:g}": {"sample_rate": r} for r in a.sample_rates})
    rows = audit(s.model, s.checkpoints, s.train, s.test, configs, n_test=a.n_test, top=a.top, seed=a.seed,
                 layers=a.layers, device=a.device, batch_size=a.batch_size, progress=False)
    print(f"Audit on {min(a.n_test, len(s.test))} test images x {len(s.train)} training images, layers={a.layers}:")
    print(format_table(rows, a.top))
    if a.output:
        write_json(a.output, rows)


def _report(a) -> None:
    from .analysis.report import build_report

    s = build_report(a.results_dir, a.top_n, a.html_tests, a.gradcam)
    print(f"Health score {s['health_score']:.1f}% ({s['band']}); error-propagation rate {s['error_propagation_rate']:.1%}.")
    print(f"Report: {s['report']}")


def _ranking(a) -> None:
    from .ranking_job import RankingJob, run_ranking

    if a.compute_influence and a.pairs_test is None:
        raise TracInError("--compute_influence needs --pairs_test, the pairs to explain.")
    m = run_ranking(RankingJob(a.pairs_train, a.pairs_test, a.checkpoint_dir, a.output_dir, a.checkpoint_prefix,
                               a.compute_self_influence, a.compute_influence, a.num_test_samples, a.loss_type, a.margin,
                               a.ghm_bins, a.ghm_alpha, a.layers, a.batch_size, a.device, a.seed, a.trust_checkpoint, not a.quiet))
    print(f"Scored {m['data']['n_train']} training pairs over {len(m['checkpoints'])} checkpoints in "
          f"{m['timings']['total_s']:.1f}s; wrote {', '.join(m['outputs'])} to {a.output_dir}.")


def _kge(a) -> None:
    from .kge_job import KGEJob, run_kge

    m = run_kge(KGEJob(a.model_path, a.train, a.test, a.entity_to_id, a.relation_to_id, a.output, a.mode, a.test_indices,
                       a.top_k, a.sample_rate, a.stratify_by, a.projection_dim if a.use_projection else None, a.projection_type,
                       a.self_influence, a.direction, a.label_smoothing, a.learning_rate, a.layers, a.batch_size, a.device,
                       a.seed, a.trust_checkpoint, not a.quiet))
    d = m["data"]
    print(f"Explained {len(d['test_indices'])} test triples with the top {a.top_k} of {d['n_train']} training triples over "
          f"{len(m['checkpoints'])} checkpoints ({d['model_class']}, {m['num_parameters']:,} parameters) in "
          f"{m['timings']['total_s']:.1f}s; results in {a.output} (kge_influence.json).")


def _evaluate(a) -> None:
    from .data.noise import parse_flip_map
    from .evaluation.common import Training

    training = Training(a.arch, a.epochs, a.save_every, a.learning_rate, a.batch_size, a.image_size, a.device, a.layers,
                        a.augment, a.lr_schedule, a.precondition)
    flips = parse_flip_map(a.flip) if a.flip else None
    if a.evaluation == "mislabel":
        from .evaluation.mislabel import format_summary, run_mislabel

        r = run_mislabel(a.data, a.output_dir, a.noise_rate, a.seeds, a.noise, flips, training, a.cv_folds, not a.no_cleanlab,
                         progress=not a.quiet)
        print(format_summary(r))
        print(f"Per seed, checkpoint study and {r['plot']} in {a.output_dir}.")
    else:
        from .evaluation.cleaning import format_cleaning, run_cleaning

        r = run_cleaning(a.data, a.output_dir, a.noise_rate, a.seeds, a.noise, flips, training, a.fraction, a.action,
                         progress=not a.quiet)
        print(format_cleaning(r))
        print(f"Details in {a.output_dir / 'cleaning_evaluation.json'}.")


def _demo(a) -> None:
    from .demo import run_demo

    m = run_demo(a.output_dir, a.noise_rate, a.seed, a.device, progress=not a.quiet)
    r = m["recall_at_inspected"]
    print(f"Flipped {m['n_flipped']} of {m['n_train']} training labels; self-influence found {r['10%']:.0%} of them in its top 10% "
          f"and {r['20%']:.0%} in its top 20% (ROC AUC {m['roc_auc']:.3f}). Test accuracy {m['best_test_accuracy']:.1%}; "
          f"{m['seconds']:.0f}s in all.")
    print(f"Report: {m['report']}  Metrics: {Path(a.output_dir) / 'mislabel_metrics.json'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = warnings.formatwarning
    warnings.formatwarning = lambda msg, *rest, **kw: f"tracin: warning: {msg}\n"
    try:
        {"train": _train, "influence": _influence, "audit": _audit, "report": _report, "demo": _demo,
         "ranking": _ranking, "kge": _kge, "evaluate": _evaluate}[args.command](args)
    except TracInError as exc:
        print(f"tracin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tracin: interrupted; results of this command are incomplete (no manifest was written).", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())

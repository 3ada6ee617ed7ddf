"""The ``tracin`` command line: train, influence, text, index, audit, report, demo, ranking, kge, evaluate.

User errors print one line, ``tracin: error: ...``, and exit with code 2 (no traceback).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from ..errors import TracInError
from .parser import build_parser, job_from_args, own_model, scoring_config


def _train(a) -> None:
    from ..device import resolve_device
    from .image.train import ImageTraining, train_image_classifier

    training = job_from_args(ImageTraining, a)
    s = train_image_classifier(a.data_dir, a.checkpoint_dir, training, resolve_device(a.device), progress=not a.quiet)
    chosen = "by validation accuracy" if a.val_fraction > 0 else "the last epoch"
    print(f"Saved {len(s.checkpoints)} checkpoints to {a.checkpoint_dir}; {s.best_model.name} ({chosen}) has test accuracy "
          f"{s.best_test_accuracy:.1%}; log {s.log_csv}, curve {s.curve_png}.")
    if a.in_run is not None:
        print(f"In-run TracIn (every training step) in {a.in_run}; next: tracin report --results_dir {a.in_run}")


def count(n: int, noun: str) -> str:
    """'1 checkpoint', '3 checkpoints'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _influence(a) -> None:
    from .image.influence import InfluenceJob, run_influence

    if a.summed_loss and not a.self_influence:
        raise TracInError("--summed_loss ranks training images beside their self-influence; add --self_influence or drop "
                          "--summed_loss.")
    m = run_influence(job_from_args(InfluenceJob, a, own=own_model(a), scoring=scoring_config(a)))
    if m is None:  # a torchrun rank other than 0: rank 0 reports
        return
    skipped = len(m["data"]["skipped_files"])
    print(f"Scored {m['data']['n_train']} training x {m['data']['n_test']} test images over {count(len(m['checkpoints']), 'checkpoint')}, "
          f"{count(len(m['scope']), 'layer')} ({m['num_parameters']:,} parameters) in {m['timings']['influence_s']:.1f}s on {m['device']}."
          + (f" Skipped {skipped} unreadable images (listed in the manifest)." if skipped else ""))
    accuracy = m["data"]["accuracy"]
    print(f"The final model gets {accuracy['test']:.1%} of the scored test images and {accuracy['train']:.1%} of the scored "
          "training images right.")
    print(f"Results in {a.output_dir}; next: tracin report --results_dir {a.output_dir}")


def _text(a) -> None:
    from .text.job import TextJob, run_text

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its notes on configs built without weights are not the user's concern here
    except ImportError:  # run_text says what to install
        pass
    m = run_text(job_from_args(TextJob, a, scoring=scoring_config(a)))
    d = m["data"]
    cut = sum(d["truncated"].values())
    print(f"Scored {d['n_train']} training x {d['n_test']} test texts ({d['task']}, {d['arch']}) over "
          f"{count(len(m['checkpoints']), 'checkpoint')}, {count(len(m['scope']), 'layer')} ({m['num_parameters']:,} parameters) in "
          f"{m['timings']['influence_s']:.1f}s on {m['device']}."
          + (f" {count(cut, 'text')} longer than {d['max_length']} tokens were cut (listed in the manifest)." if cut else ""))
    print(f"The model gets {d['accuracy']['test']:.1%} of the scored test texts and {d['accuracy']['train']:.1%} of the "
          f"training texts right.")
    print(f"Results in {a.output_dir}; next: tracin report --results_dir {a.output_dir}")


def _index(a) -> None:
    {"build": _index_build, "query": _index_query, "info": _index_info}[a.index_command](a)


def _index_build(a) -> None:
    from .image.index_job import IndexBuildJob, build_image_index

    s = build_image_index(job_from_args(IndexBuildJob, a, own=own_model(a), scoring=scoring_config(a)))
    if s is None:  # a torchrun rank other than 0
        return
    print(f"Indexed {s['rows']} training images over {count(s['checkpoints'], 'checkpoint')} and "
          f"{count(s['layers'], 'layer')} in {s['seconds']:.1f}s: {count(s['shards'], 'shard')}, {s['dtype']}, "
          f"{s['bytes'] / max(1, s['rows']):,.0f} bytes per image. Next: tracin index query --index_dir {a.index_dir} "
          f"--data_dir {a.data_dir} ... --output_dir O")


def _index_query(a) -> None:
    from .image.index_job import index_settings
    from .image.influence import InfluenceJob, run_influence

    scoring = index_settings(a.index_dir).replace(progress=not a.quiet)
    m = run_influence(job_from_args(InfluenceJob, a, own=own_model(a), scoring=scoring))
    if m is None:
        return
    print(f"Scored {m['data']['n_test']} test images against the index's {m['data']['n_train']} training images in "
          f"{m['timings']['influence_s']:.1f}s on {m['device']}. Results in {a.output_dir}; next: tracin report "
          f"--results_dir {a.output_dir}")
    stats = m["engine"]
    if "ann_recall" in stats:
        print(f"Approximate search ({a.ann_probes} probes): recall@{a.top_k} {stats['ann_recall']:.1%} of the exact "
              f"proponents, measured on {stats['ann_recall_sample']} of the test images.")


def _index_info(a) -> None:
    import json

    from ..engine.index import GradientIndex

    s = GradientIndex.load(a.index_dir).summary()
    state = "complete" if not s["missing_shards"] else f"INCOMPLETE: {s['missing_shards']} of {s['shards']} shards missing"
    pre = s["precondition"]
    print(f"{a.index_dir}: {s['rows']:,} rows ({state}), {s['dtype']}"
          + (f", {s['width']:,} numbers per row" if s["width"] else "") + f", {s['bytes'] / 2**20:,.1f} MiB on disk.")
    print(f"Scores: {_scoring_words(pre, s['projection'])}, normalize {s['normalize']}, {count(s['checkpoints'], 'checkpoint')}, "
          f"{count(len(s['layers'] or []), 'layer')}" + (f"; K-FAC fitted on {s['fit_examples']:,} examples" if pre else "") + ".")
    for i, part in enumerate(s["parts"]):
        source = part.get("source")
        try:
            where = json.loads(source).get("data_dir", source) if source else "no note"
        except (ValueError, AttributeError):
            where = source
        print(f"Part {i + 1}: rows {part['first']:,}-{part['first'] + part['rows'] - 1:,} ({where}).")


def _scoring_words(precondition, projection) -> str:
    """'K-FAC (damping 0.1, 256 leading directions per layer)' or 'plain TracIn, projected (gaussian, dim 256)'."""
    if precondition:
        rank = f", {precondition['rank']} leading directions per layer" if precondition.get("rank") else ""
        return f"K-FAC (damping {precondition['damping']:g}{rank})"
    return "plain TracIn" + (f", projected ({projection['projection']}, dim {projection['projection_dim']})"
                             if projection else "")


def _audit(a) -> None:
    from ..io import write_json
    from .audit import audit, format_table
    from .image.setup import image_setup

    s = image_setup(a.data_dir, a.checkpoint_dir, a.trust_checkpoint, own_model(a))
    kind = f" {a.projection}" if a.precondition == "none" else ""  # under K-FAC: leading directions, no random kind
    configs = {f"projection {d}{kind}": {"projection_dim": d, "projection": a.projection} for d in a.projection_dims}
    configs.update({f"sample {r:g}": {"sample_rate": r} for r in a.sample_rates})
    rows = audit(s.model, s.checkpoints, s.train, s.test, configs, n_test=a.n_test, top=a.top, device=a.device,
                 config=scoring_config(a))
    print(f"Audit on {min(a.n_test, len(s.test))} test images x {len(s.train)} training images, layers={a.layers}:")
    print(format_table(rows, a.top))
    if a.output:
        write_json(a.output, rows)


def _report(a) -> None:
    from .analysis.report import build_report

    s = build_report(a.results_dir, a.top_n, a.html_tests, a.gradcam, progress=not a.quiet)
    print(f"Health score {s['health_score']:.1f}% ({s['band']}); error-propagation rate {s['error_propagation_rate']:.1%}.")
    print(f"Report: {s['report']}")


def _ranking(a) -> None:
    from .ranking_job import RankingJob, run_ranking

    if a.compute_influence and a.pairs_test is None:
        raise TracInError("--compute_influence needs --pairs_test, the pairs to explain.")
    m = run_ranking(job_from_args(RankingJob, a, scoring=scoring_config(a)))
    print(f"Scored {m['data']['n_train']} training pairs over {count(len(m['checkpoints']), 'checkpoint')} in "
          f"{m['timings']['total_s']:.1f}s; wrote {', '.join(m['outputs'])} to {a.output_dir}.")


def _kge(a) -> None:
    from .kge_job import KGEJob, run_kge

    m = run_kge(job_from_args(KGEJob, a, scoring=scoring_config(a)))
    d = m["data"]
    print(f"Explained {len(d['test_indices'])} test triples with the top {a.top_k} of {d['n_train']} training triples over "
          f"{len(m['checkpoints'])} checkpoints ({d['model_class']}, {m['num_parameters']:,} parameters) in "
          f"{m['timings']['total_s']:.1f}s; results in {a.output} (kge_influence.json).")


def _evaluate(a) -> None:
    if a.evaluation == "lds":
        from .evaluation.lds import LDSSetting, run_lds

        setting = job_from_args(LDSSetting, a)
        print(run_lds(setting, a.methods, a.output_dir, log=(lambda _: None) if a.quiet else print))
        return
    from .evaluation.common import Noise, Training
    from .image.noise import parse_flip_map

    training = Training(arch=a.arch, epochs=a.epochs, save_every=a.save_every, learning_rate=a.learning_rate,
                        batch_size=a.batch_size, image_size=a.image_size, device=a.device, layers=a.layers,
                        augment=a.augment, lr_schedule=a.lr_schedule, precondition=a.precondition)
    noise = Noise(data=a.data, rate=a.noise_rate, seeds=a.seeds, kind=a.noise, flip_map=parse_flip_map(a.flip) if a.flip else None)
    if a.evaluation == "mislabel":
        from .evaluation.mislabel import format_summary, run_mislabel

        r = run_mislabel(noise, a.output_dir, training, a.cv_folds, not a.no_cleanlab, progress=not a.quiet)
        print(format_summary(r))
        print(f"Per seed, checkpoint study and {r['plot']} in {a.output_dir}.")
    else:
        from .evaluation.cleaning import format_cleaning, run_cleaning

        r = run_cleaning(noise, a.output_dir, training, a.fraction, a.action, progress=not a.quiet)
        print(format_cleaning(r))
        print(f"Details in {a.output_dir / 'cleaning_evaluation.json'}.")


def _demo(a) -> None:
    from .demo import run_demo

    m = run_demo(a.output_dir, a.noise_rate, a.seed, a.device, progress=not a.quiet, in_run=a.in_run)
    r = m["recall_at_inspected"]
    best = {share: min(1.0, share * m["n_train"] / max(1, m["n_flipped"])) for share in (0.1, 0.2)}  # all of the top flipped
    print(f"Flipped {m['n_flipped']} of {m['n_train']} training labels; self-influence found {r['10%']:.0%} of them in its top 10% "
          f"(at most {best[0.1]:.0%} fit there) and {r['20%']:.0%} in its top 20% (at most {best[0.2]:.0%}); ROC AUC "
          f"{m['roc_auc']:.3f}. Test accuracy {m['best_test_accuracy']:.1%}; {m['seconds']:.0f}s in all.")
    if "in_run" in m:
        i = m["in_run"]
        print(f"In-run self-influence (recorded while training): {i['recall_at_inspected']['10%']:.0%} in its top 10%, "
              f"{i['recall_at_inspected']['20%']:.0%} in its top 20%; ROC AUC {i['roc_auc']:.3f}. Report: {i['report']}")
    print(f"Report: {m['report']}  Metrics: {Path(a.output_dir) / 'mislabel_metrics.json'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a flag's error (one line, printed): its exit code; --help and --version still exit
        if not exc.code:
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    previous = warnings.formatwarning
    warnings.formatwarning = lambda msg, *rest, **kw: f"tracin: warning: {msg}\n"
    try:
        {"train": _train, "influence": _influence, "text": _text, "index": _index, "audit": _audit, "report": _report, "demo": _demo,
         "ranking": _ranking, "kge": _kge, "evaluate": _evaluate}[args.command](args)
    except TracInError as exc:
        print(f"tracin: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (permissions, a full disk, a vanished file): one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"tracin: error: {exc.strerror or exc}{where}; check the path, its permissions and the free disk space.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tracin: interrupted; results of this command are incomplete (no manifest was written).", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tracin's default against the peers on the LDS harness of :mod:`tracin.workflows.evaluation.lds`: the same
retrained targets, the same attributed run (a checkpoint per epoch), every method in this process.

    python benchmarks/lds_peers.py --output_dir O                      # the four SGD settings
    python benchmarks/lds_peers.py --output_dir O --settings digits:mlp  # one

Peers, each run only when installed (``pip install -e '.[peers]'``: captum, traker, kronfluence, dattri), each with its
documented recipe for a classifier:

- Captum ``TracInCP`` over every checkpoint (learning rate from the checkpoint, per-example gradients per batch);
- TRAK (``traker``), the checkpoints as its ensemble, random projection to 512 dimensions, margin output;
- kronfluence EK-FAC on the final model, margin measurement, its heuristic damping (0.1 x mean eigenvalue);
- dattri's influence function on the final model, inverse Hessian-vector products by conjugate gradients (10
  iterations, its default), one row per regularisation 0.01 / 0.1 / 1 (the explicit Hessian inverse runs out of
  24 GiB on the digits MLP); read the best of them as an upper bound, chosen on the targets themselves. MLPs only:
  on the digits CNN its first regularisation had not finished after 7 minutes.

Prints one Markdown table per setting: LDS, 95% bootstrap interval, seconds, and the default's margin over the best
peer.
"""
import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tracin import TracIn
from tracin.tasks.classification import class_margin
from tracin.workflows.evaluation.lds import LDSRow, LDSRun, LDSSetting, format_row, prepare

SETTINGS = {"digits:mlp": LDSSetting(data="digits", model="mlp"), "mnist1d:mlp": LDSSetting(data="mnist1d", model="mlp"),
            "digits:cnn": LDSSetting(data="digits", model="cnn"), "mnist1d:cnn": LDSSetting(data="mnist1d", model="cnn")}


class Run:
    """The shared LDS run (:class:`LDSRun`) and a folder for the peers' files."""

    def __init__(self, lds: LDSRun, work_dir: Path):
        self.lds, self.work_dir = lds, work_dir
        self.setting, self.train, self.test = lds.setting, lds.train, lds.test
        self.model, self.checkpoints = lds.model, lds.checkpoints
        self.states = [c.source["model_state_dict"] for c in lds.checkpoints]


def run_tracin(run: Run, keywords: Dict) -> torch.Tensor:
    tr = TracIn(run.model, run.checkpoints, progress=False, batch_size=500, **keywords)
    return tr.influence_matrix(TensorDataset(*run.train), TensorDataset(*run.test))


def run_captum(run: Run) -> torch.Tensor:
    from captum.influence import TracInCP

    paths = []
    for i, state in enumerate(run.states):
        paths.append(str(run.work_dir / f"captum_{i}.pt"))
        torch.save({"model_state_dict": state, "learning_rate": run.setting.lr}, paths[-1])

    def load(model: nn.Module, path: str) -> float:
        payload = torch.load(path, weights_only=True)
        model.load_state_dict(payload["model_state_dict"])
        return payload["learning_rate"]

    captum = TracInCP(run.lds.model_at(-1), TensorDataset(*run.train), paths, load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=500, sample_wise_grads_per_batch=True)
    return captum.influence(run.test)


def run_trak(run: Run) -> torch.Tensor:
    from trak import TRAKer

    model = run.lds.model_at(-1)
    traker = TRAKer(model=model, task="image_classification", train_set_size=len(run.train[0]),
                    save_dir=str(run.work_dir / "trak"), device="cpu", proj_dim=512, use_half_precision=False,
                    logging_level=40)
    for model_id, state in enumerate(run.states):
        traker.load_checkpoint(state, model_id=model_id)
        for x, y in zip(run.train[0].split(500), run.train[1].split(500)):
            traker.featurize(batch=(x, y), num_samples=len(x))
    traker.finalize_features()
    for model_id, state in enumerate(run.states):
        traker.start_scoring_checkpoint(exp_name="lds", checkpoint=state, model_id=model_id, num_targets=len(run.test[0]))
        traker.score(batch=run.test, num_samples=len(run.test[0]))
    return torch.as_tensor(np.asarray(traker.finalize_scores(exp_name="lds"))).T


def run_kronfluence(run: Run) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -class_margin(model(x), y).sum()

    task = Classification()
    model = prepare_model(run.lds.model_at(-1), task)
    analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=str(run.work_dir / "kronfluence"))
    train, test = TensorDataset(*run.train), TensorDataset(*run.test)
    analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=500,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("lds", "ekfac", query_dataset=test, train_dataset=train, per_device_query_batch_size=100,
                                     per_device_train_batch_size=500, score_args=ScoreArguments(damping_factor=None),
                                     overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("lds")["all_modules"]


def run_dattri(run: Run, regularization: float) -> torch.Tensor:
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask

    model = run.lds.model_at(-1)

    def loss(params, data):
        x, y = data  # one example (vmapped per-example gradients) or a batch (the Hessian)
        if y.dim() == 0:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss_func=loss, model=model, checkpoints=run.states[-1])
    attributor = IFAttributorCG(task, device="cpu", regularization=regularization, max_iter=10)
    train, test = TensorDataset(*run.train), TensorDataset(*run.test)
    attributor.cache(DataLoader(train, batch_size=len(train)))
    # one training batch: dattri re-solves the test side's CG for every training batch
    return attributor.attribute(DataLoader(train, batch_size=len(train)), DataLoader(test, batch_size=len(test))).T


def peers(run: Run) -> Dict[str, Callable[[], Optional[torch.Tensor]]]:
    methods = {"Captum TracInCP": lambda: run_captum(run), "TRAK (checkpoint ensemble, 512)": lambda: run_trak(run),
               "kronfluence EK-FAC (final)": lambda: run_kronfluence(run)}
    for reg in (1e-2, 1e-1, 1.0) if run.setting.model == "mlp" else ():  # CG on a CNN: no answer in 7 minutes
        methods[f"dattri IF, CG (final, reg {reg:g})"] = lambda reg=reg: run_dattri(run, reg)
    return methods


def timed(run: Run, name: str, compute: Callable[[], Optional[torch.Tensor]]) -> Optional[LDSRow]:
    begin = time.perf_counter()
    try:
        scores = compute()
    except ImportError as missing:
        print(f"<!-- {name}: skipped ({missing.name} is not installed) -->")
        return None
    if scores is None:
        return None
    row = run.lds.row(name, scores.detach().float(), time.perf_counter() - begin)
    print("\n" + format_row(row), flush=True)
    return row


def compare(setting: LDSSetting, output_dir: Path) -> List[LDSRow]:
    with tempfile.TemporaryDirectory(dir=output_dir) as work:
        run = Run(prepare(setting, output_dir / "cache", log=lambda line: None), Path(work))
        run.lds.warm_up()
        ours = [timed(run, "tracin default", lambda: run_tracin(run, {})),
                timed(run, "tracin plain (precondition=none)", lambda: run_tracin(run, {"precondition": "none"}))]
        theirs = [timed(run, name, compute) for name, compute in peers(run).items()]
    rows = [r for r in ours + theirs if r is not None]
    best = max((r for r in theirs if r is not None), key=lambda r: r.lds, default=None)
    if best is not None:
        print(f"default - best peer ({best.method}): {ours[0].lds - best.lds:+.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for key in args.settings:
        setting = SETTINGS[key]
        print(f"\n## {setting.data}, {setting.model}, {setting.optimizer}\n| method | LDS | 95% interval | seconds |\n|---|---|---|---|")
        compare(setting, args.output_dir)


if __name__ == "__main__":
    main()

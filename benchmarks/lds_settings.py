"""The evidence behind tracin's defaults: the linear datamodeling score (LDS) of its configurations on four SGD
settings (digits and mnist1d, an MLP and a small CNN each) and two AdamW ones, through
:mod:`tracin.workflows.evaluation.lds` (the TRAK paper's protocol: 100 random halves x 3 seeds retrained with vmap).

    python benchmarks/lds_settings.py --output_dir O        # about 10 minutes on 2 CPU cores; retrainings cached in O

Prints one Markdown table per setting: LDS, its 95% bootstrap interval and the scoring seconds of each method, and
the default's time over plain TracIn's. The peers (Captum, TRAK, kronfluence, dattri) on the same work:
benchmarks/lds_peers.py; alternatives to K-FAC that were measured and not adopted: benchmarks/lds_preconditioners.py.
"""
import argparse
from pathlib import Path

import torch

from tracin.workflows.evaluation.lds import PRESETS, LDSSetting, evaluate, format_row

SETTINGS = [LDSSetting(data="digits", model="mlp"), LDSSetting(data="mnist1d", model="mlp"),
            LDSSetting(data="digits", model="cnn"), LDSSetting(data="mnist1d", model="cnn"),
            LDSSetting(data="digits", model="mlp", optimizer="adamw"), LDSSetting(data="digits", model="cnn", optimizer="adamw")]
METHODS = ["default", "plain", "kfac_last", "plain_last", "margin", "cosine", "final", "plain_final"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=list(PRESETS))
    a = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for setting in SETTINGS:
        print(f"\n## {setting.data}, {setting.model}, {setting.optimizer}\n| method | LDS | 95% interval | seconds |\n|---|---|---|---|")
        rows = evaluate(setting, {m: PRESETS[m] for m in a.methods}, a.output_dir, log=lambda line: None)
        for row in rows:
            print(format_row(row))
        by = {r.method: r for r in rows}
        if "default" in by and "plain" in by:
            print(f"default / plain time: {by['default'].seconds / by['plain'].seconds:.2f}x")


if __name__ == "__main__":
    main()

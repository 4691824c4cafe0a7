"""Markdown rows of the issue-23 scores from `raddino_jax.evaluate` reports (eval.json).

    python scripts/eval_table.py [--against random_init|baseline] NAME=EVAL_DIR [...]

Per report and finding label: kNN balanced accuracy (k=20) and probe AUROC (macro one-vs-rest
for multi-class labels) of the checkpoint against random init (or against --baseline's
checkpoint), each cell "other -> checkpoint [paired 95% interval of checkpoint - other]".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def scores(report: dict, label: str, against: str) -> tuple[str, str]:
    models = report["models"]
    diff = report["intervals"]["differences"][f"checkpoint_minus_{against}"]
    linear = models["checkpoint"]["linear"][label]
    auroc = "auroc" if "auroc" in linear else "auroc_macro_ovr"
    cells = []
    for path, read in (
        (
            f"knn/{label}/k20/balanced_accuracy",
            lambda m: m["knn"][label]["k20"]["balanced_accuracy"],
        ),
        (f"linear/{label}/{auroc}", lambda m: m["linear"][label][auroc]),
    ):
        low, high = diff[path]
        cells.append(
            f"{read(models[against]):.3f} -> {read(models['checkpoint']):.3f} "
            f"[{low:+.3f}, {high:+.3f}]"
        )
    return cells[0], cells[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="random_init", choices=["random_init", "baseline"])
    parser.add_argument("reports", nargs="+", help="NAME=EVAL_DIR (a folder with eval.json)")
    args = parser.parse_args(argv)
    other = "random init" if args.against == "random_init" else "start"
    print(
        f"| run | label | kNN bal. acc. (k=20) {other} -> trained [diff] "
        f"| probe AUROC {other} -> trained [diff] |"
    )
    print("|---|---|---|---|")
    for item in args.reports:
        name, folder = item.split("=", 1)
        with open(f"{folder}/eval.json") as f:
            report = json.load(f)
        for label in report["labels"]:
            knn, probe = scores(report, label, args.against)
            print(f"| {name} | {label} | {knn} | {probe} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

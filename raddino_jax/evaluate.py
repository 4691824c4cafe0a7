"""`python -m raddino_jax.evaluate`: frozen-feature evaluation of a checkpoint (recipe s10).

  python -m raddino_jax.evaluate --checkpoint PATH --data DATA_DIR/NAME --label F[,F...] \
      [--task all|knn[,linear,metadata,segmentation]] [--out DIR] [--baseline PATH] \
      [--bootstrap 1000] [--curve [--curve-tasks knn] [--curve-max-examples N]]

The teacher backbone of PATH (a parameter checkpoint or a training run directory) embeds every
image of the `data_prep` dataset DATA_DIR/NAME with the checkpoint's inference preprocessing
(resize shorter side, centre crop, normalise: the exported preprocessor_config.json). Then:
- knn: weighted kNN on L2-normalised CLS, T = 0.07, k in {10, 20, 100, 200}: accuracy and
  balanced accuracy per label (train -> test);
- linear: logistic regression on the concat of the last --n-last-blocks CLS tokens (+ mean patch
  token unless --no-avgpool), C chosen on val: AUROC / AUPRC for binary labels, accuracy /
  balanced accuracy (+ macro one-vs-rest AUROC) for multi-class labels;
- metadata: RAD-DINO's probes of patient sex (AUROC) and age (ridge: MAE, R^2) from the
  metadata data_prep stores (`sex`, `age_years`);
- segmentation: a linear probe on patch tokens against the lesion masks (Dice), with a CLS +
  position control (datasets with a `mask` feature; only examples with a known value of some
  --label, since records without a mask file carry an all-zero mask).
Labels equal to -1 / NaN / '' are unknown and dropped per label. Splits: the dataset's train /
val / test (data_prep splits by patient); a missing val or test split is carved out of train by
patient (patient_id, else the file), and overlaps between given splits are reported
(`eval/splits.py`).

The same report is produced for a random initialisation of the same architecture, for the
pixel reference (kNN and logistic probe on the raw 28x28 pixels: a supervised model with no
representation learning, so a reader sees how far the features get) and, with --baseline, for
another checkpoint (e.g. imported DINOv2 or RAD-DINO weights); eval.json holds every number and
the differences, eval.md a table of them (`eval/report.py`). Every kNN accuracy and probe AUROC
gets a 95% percentile-bootstrap interval over the test examples (--bootstrap resamples, seeded
by --seed, the same resamples for every model, so the intervals of differences are paired;
`eval/bootstrap.py`), in eval.json "intervals" and an eval.md table.

--curve (PATH a training run directory): the teacher of every kept checkpoint (keep enough with
config.keep_checkpoints), random init and the pixel reference are also scored on kNN accuracy
(k=20) and probe AUROC with their intervals; curve.json and curve.png (score vs training step,
bands = 95% intervals) are written next to eval.json. The driver lives in `eval/tasks.py`
(per-task glue, pixel reference, intervals, `run_evaluation`) and `eval/curve.py`; this module is
the CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from etils import epath

from raddino_jax.eval import bootstrap
from raddino_jax.eval.curve import curve_tasks, learning_curve
from raddino_jax.eval.linear import (
    COARSE_C_GRID,
    DEFAULT_C_GRID,
    FULL_C_GRID,
)
from raddino_jax.eval.report import write_curve, write_report
from raddino_jax.eval.tasks import (  # noqa: F401 (re-exported: the CLI's library entry points)
    TASKS,
    attach_intervals,
    evaluate_model,
    run_evaluation,
)

# --c-grid: the probes' C sweep by name
C_GRIDS = {"short": DEFAULT_C_GRID, "full": FULL_C_GRID, "coarse": COARSE_C_GRID}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m raddino_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="params checkpoint or training run")
    parser.add_argument("--data", required=True, help="DATA_DIR/NAME of a data_prep dataset")
    parser.add_argument("--label", required=True, help="label field(s), comma-separated")
    parser.add_argument(
        "--task", default="all", help=f"all, or one or more of {','.join(TASKS)}, comma-separated"
    )
    parser.add_argument("--out", default=None, help="output folder (default CHECKPOINT/eval)")
    parser.add_argument("--baseline", default=None, help="another checkpoint to compare with")
    parser.add_argument("--max-examples", type=int, default=None, help="per split")
    parser.add_argument("--n-last-blocks", type=int, default=1, help="CLS of the last N blocks")
    parser.add_argument("--no-avgpool", action="store_true", help="no mean patch token")
    parser.add_argument(
        "--c-grid",
        default="short",
        choices=list(C_GRIDS),
        help="C sweep: full = 10^linspace(-6,5,45) (recipe s10), short = every other value, "
        "coarse = every fourth (the demo's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random init and carved splits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--bootstrap", type=int, default=bootstrap.N_RESAMPLES, help="bootstrap resamples"
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also evaluate every kept checkpoint of the training run --checkpoint (kNN k=20 "
        "and probe AUROC, with bootstrap intervals) and write curve.json + curve.png",
    )
    parser.add_argument(
        "--curve-tasks",
        default="knn,linear",
        help="the curve's scores: knn, linear or both (knn alone needs no probe fit per step)",
    )
    parser.add_argument(
        "--curve-max-examples",
        type=int,
        default=None,
        help="per split, for the curve only (default: --max-examples)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    labels = [label.strip() for label in args.label.split(",") if label.strip()]
    tasks = list(TASKS) if args.task == "all" else [t.strip() for t in args.task.split(",")]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        print(
            f"error: --task {args.task!r}: choose all or from {', '.join(TASKS)}", file=sys.stderr
        )
        return 2
    try:  # checked before any model is evaluated
        curve_task_list = curve_tasks([t.strip() for t in args.curve_tasks.split(",") if t.strip()])
    except ValueError as err:
        print(f"error: --curve-tasks {args.curve_tasks!r}: {err}", file=sys.stderr)
        return 2
    try:
        options = dict(  # the feature and probe settings both reports share
            max_examples=args.max_examples,
            n_last_blocks=args.n_last_blocks,
            avgpool=not args.no_avgpool,
            c_grid=C_GRIDS[args.c_grid],
            seed=args.seed,
            batch_size=args.batch_size,
            n_resamples=args.bootstrap,
        )
        report = run_evaluation(
            args.checkpoint, args.data, labels, tasks, baseline=args.baseline, **options
        )
        curve = None
        if args.curve:
            curve_options = dict(options, tasks=curve_task_list)
            if args.curve_max_examples is not None:
                curve_options["max_examples"] = args.curve_max_examples
            curve = learning_curve(args.checkpoint, args.data, labels, **curve_options)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = args.out or str(epath.Path(args.checkpoint) / "eval")
    json_path, md_path = write_report(report, out)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if curve is not None:
        curve_json, curve_png = write_curve(curve, out)
        print(f"wrote {curve_json} and {curve_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

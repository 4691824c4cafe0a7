"""Build a tfds ArrayRecord dataset of radiographs from a folder or a CSV (recipe s8).

    python -m data_prep.build --input DIR_OR_CSV --output DATA_DIR --name NAME \
        [--size 518] [--bits 8] [--workers N] [--policy minmax] [--overwrite]
        [--runner=beam [--beam-options="--runner=DataflowRunner --project=P --region=R ..."]]

DIR: recursive scan for DICOM / PNG / JPEG files, all in split "train". CSV: a `path` column,
optional `split`, `patient_id`, `mask_path`, every other column a label. Bad files and exact
duplicates are listed in DATA_DIR/NAME/report.json, never fatal. A finished build with the same
options is reused; --overwrite rebuilds. The builder library is raddino_jax.data.builder (its
docstring has the details).

--runner=multiprocess (default) converts on --workers local processes. --runner=beam runs the
same conversion as an Apache Beam pipeline (needs `pip install -r requirements-beam.txt`; see
raddino_jax/data/builder/beam.py): without --beam-options it runs locally on --workers
processes; with them, on any Beam runner (Dataflow: --output on gs://). Same records and
report.json either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from raddino_jax.data.builder import RUNNERS, BuildOptions, build_dataset
from raddino_jax.data.dicom import COLOUR_POLICIES, MULTIFRAME_POLICIES, WINDOWING_POLICIES


def parse_args(argv: Sequence[str] | None = None) -> BuildOptions:
    """Parse the command line into BuildOptions."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", required=True, help="folder to scan, or a .csv file list")
    parser.add_argument("--output", required=True, help="tfds data_dir (local or gs://)")
    parser.add_argument("--name", required=True, help="dataset name (folder under --output)")
    parser.add_argument("--size", type=int, default=518, help="shorter side in px; 0 = keep")
    parser.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--policy", default="minmax", choices=WINDOWING_POLICIES)
    parser.add_argument(
        "--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH")
    )
    parser.add_argument("--multiframe", default="first", choices=MULTIFRAME_POLICIES)
    parser.add_argument("--colour", default="convert", choices=COLOUR_POLICIES)
    parser.add_argument("--source", default="", help="metadata source name (default: --name)")
    parser.add_argument("--overwrite", action="store_true", help="delete and rebuild")
    parser.add_argument(
        "--runner", default="multiprocess", choices=RUNNERS, help="where the conversion runs"
    )
    parser.add_argument(
        "--beam-options",
        default="",
        help="Beam pipeline options as one string (with --runner=beam); default: local, "
        "--workers processes",
    )
    args = parser.parse_args(argv)
    return BuildOptions(
        input=args.input,
        output=args.output,
        name=args.name,
        size=args.size,
        bits=args.bits,
        workers=max(1, args.workers),
        policy=args.policy,
        percentiles=tuple(args.percentiles),
        multiframe=args.multiframe,
        colour=args.colour,
        source=args.source,
        overwrite=args.overwrite,
        runner=args.runner,
        beam_options=args.beam_options,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: build, print the counts, return the report."""
    logging.basicConfig(level=logging.INFO)
    report = build_dataset(parse_args(argv))
    print(json.dumps({"counts": report["counts"], "splits": report["splits"]}))
    return report


if __name__ == "__main__":
    main()

"""Write the built-in sample data: real radiographs from `pydicom-data` plus chest phantoms.

    python -m data_prep.samples --output DIR [--n-phantoms 96] [--size 256] [--seed 0]
        [--split-fractions 0.7,0.15,0.15] [--acquisition standard|portable]

Writes, with no network access and byte-identical for a given seed:
    DIR/real/*.dcm                 real CR radiographs shipped by pydicom-data (MIT)
    DIR/LICENSE-pydicom-data.txt   where those came from, and their licence
    DIR/phantoms/*.dcm             synthetic chest radiographs
    DIR/phantoms/masks/*.png       lesion masks, 0/255 uint8, same grid as the DICOM pixels
    DIR/labels.csv                 path, split, patient_id, mask_path, nodule, effusion, sex,
                                   age, kind; paths relative to DIR
    DIR/samples.json               counts, seed, transfer syntaxes used and skipped

labels.csv is the input contract of data_prep.build. The package: `phantoms` (the chest
phantom and its findings), `phantom_dicom` (their DICOM files), `generate` (the sample set) and
`builtin` (the samples `config.data.builtin=True` trains on). It lives outside the runtime
package: only the command lines that honour data.builtin import it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from data_prep.samples.generate import generate_samples

__all__ = ["generate_samples", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="output folder (local or gs://)")
    parser.add_argument("--n-phantoms", type=int, default=96, help="number of phantom images")
    parser.add_argument("--size", type=int, default=256, help="smallest phantom image side")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed, same bytes")
    parser.add_argument(
        "--split-fractions",
        default="",
        help="train,val,test shares of the phantom patients (default 0.7,0.15,0.15); the demo's "
        "held-out evaluation uses 0.45,0.1,0.45 for a large test split",
    )
    parser.add_argument(
        "--acquisition",
        default="standard",
        choices=["standard", "portable"],
        help="how the phantoms are taken: standard (upright PA) or portable (bedside AP: "
        "poorer positioning, harder and noisier exposure; the continued-pretraining demo's "
        "shifted domain)",
    )
    args = parser.parse_args(argv)
    fractions = None
    if args.split_fractions:
        values = [float(v) for v in args.split_fractions.split(",")]
        if len(values) != 3:
            parser.error(f"--split-fractions needs train,val,test, got {args.split_fractions!r}")
        fractions = dict(zip(("train", "val", "test"), values, strict=True))
    summary = generate_samples(
        args.output, args.n_phantoms, args.size, args.seed, fractions, args.acquisition
    )
    print(json.dumps(summary, indent=2, sort_keys=True))

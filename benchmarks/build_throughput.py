"""Dataset build throughput: the multiprocess builder vs the Beam pipeline, same corpus, same run.

Both sides run the whole `data_prep.build` (scan, decode, window, resize to --size, PNG,
duplicate check, tfds ArrayRecord write, report.json) with the same number of worker processes:
a spawn pool for `--runner=multiprocess`, Beam's local FnApiRunner with that many SDK worker
processes for `--runner=beam`. Rounds alternate the order; the table shows the median. A third
figure times `convert_item` alone in this process on the first files (no pool, no writer): the
per-core ceiling a Beam/Dataflow worker process can reach.

Corpora:
  samples    the built-in samples (`data_prep.samples`: pydicom-data radiographs + phantoms)
  synthetic  N uncompressed 16-bit (12 bits stored) DICOMs of HEIGHT x WIDTH, distinct
             smooth-plus-noise content (no duplicates), generated with pydicom; kept in
             WORKDIR/synthetic_<N>_<H>x<W> for re-runs (about 15 MB a file at 3000 x 2500).

Printed: images/s and images/s per worker process of each runner, the Beam/multiprocess ratio,
the in-process ceiling, and the wall time for 882,775 images (RAD-DINO's corpus) on N Dataflow
workers at the measured per-process rate.

Run (niced, the machine is shared):
  nice .venv/bin/python benchmarks/build_throughput.py --corpus samples --workers 2
  nice .venv/bin/python benchmarks/build_throughput.py --corpus synthetic --files 200 --workers 2
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import tempfile
import time

import harness
import numpy as np

RAD_DINO_IMAGES = 882_775
DATAFLOW_WORKERS = (10, 50, 100)  # worker VMs for the wall-time arithmetic
VCPUS_PER_WORKER = 4  # n2-standard-4


def write_synthetic_dicoms(folder: pathlib.Path, files: int, height: int, width: int) -> None:
    """`files` distinct 16-bit DX DICOMs (12 bits stored, uncompressed) of height x width."""
    import cv2
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(files):
        path = folder / f"img{index:05d}.dcm"
        if path.exists():
            continue
        coarse = rng.uniform(400, 3600, size=(12, 10)).astype(np.float32)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        noise = rng.normal(0, 40, size=(height, width)).astype(np.float32)
        pixels = np.clip(smooth + noise, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientSex = f"P{index:05d}", "F" if index % 2 else "M"
        ds.Modality, ds.ViewPosition = "DX", "PA"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = height, width, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelSpacing = [0.139, 0.139]
        ds.PixelData = pixels.tobytes()
        ds.save_as(path, enforce_file_format=True)


def make_corpus(args: argparse.Namespace, workdir: pathlib.Path) -> tuple[str, int]:
    """(--input for the build, number of input files)."""
    if args.corpus == "samples":
        from data_prep.samples.generate import generate_samples

        folder = workdir / "samples"
        if not (folder / "labels.csv").exists():
            generate_samples(folder, n_phantoms=args.phantoms, seed=0)
        rows = (folder / "labels.csv").read_text().strip().splitlines()
        return str(folder / "labels.csv"), len(rows) - 1
    folder = workdir / f"synthetic_{args.files}_{args.height}x{args.width}"
    write_synthetic_dicoms(folder, args.files, args.height, args.width)
    return str(folder), args.files


def time_build(input_path: str, output: pathlib.Path, args, runner: str) -> tuple[float, dict]:
    """(wall seconds, report) of the whole build with `runner`."""
    from raddino_jax.data.builder import BuildOptions, build_dataset

    shutil.rmtree(output, ignore_errors=True)
    options = BuildOptions(input=input_path, output=str(output), name="bench", size=args.size,
                           workers=args.workers, runner=runner)  # fmt: skip
    start = time.perf_counter()
    report = build_dataset(options)
    return time.perf_counter() - start, report


def time_in_process(input_path: str, args, files: int) -> float:
    """Seconds per file of convert_item alone, in this process, on the first `files` inputs."""
    from raddino_jax.data.builder.convert import ConvertOptions, convert_item
    from raddino_jax.data.builder.inputs import discover_inputs
    from raddino_jax.data.dicom import DecodePolicy

    items, _, with_mask, _ = discover_inputs(input_path)
    options = ConvertOptions(
        size=args.size, bits=8, policy=DecodePolicy(source="bench"), with_mask=with_mask
    )
    convert_item((items[0], options))  # warm-up: imports, codec plugins
    chosen = items[:files]
    start = time.perf_counter()
    for item in chosen:
        convert_item((item, options))
    return (time.perf_counter() - start) / len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("samples", "synthetic"), default="samples")
    parser.add_argument("--files", type=int, default=200, help="synthetic corpus size")
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=2500)
    parser.add_argument("--phantoms", type=int, default=96, help="built-in samples: phantoms")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--in-process-files", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="alternating order; median")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "build_bench"))
    args = parser.parse_args()

    workdir = pathlib.Path(args.workdir)
    start = time.perf_counter()
    input_path, files = make_corpus(args, workdir)
    print(f"corpus {args.corpus}: {files} files in {input_path} "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    print(harness.machine_header())

    times: dict[str, list[float]] = {"multiprocess": [], "beam": []}
    counts = {}
    for round_index in range(args.rounds):
        order = ("multiprocess", "beam") if round_index % 2 == 0 else ("beam", "multiprocess")
        for runner in order:
            seconds, report = time_build(input_path, workdir / f"out_{runner}", args, runner)
            times[runner].append(seconds)
            counts[runner] = report["counts"]
            print(f"round {round_index}: {runner} {seconds:.1f} s, counts {report['counts']}")
    assert counts["beam"] == counts["multiprocess"], counts
    first = min(args.in_process_files, files)
    per_file = time_in_process(input_path, args, first)
    print(f"load average after: {os.getloadavg()}")

    rates = {runner: counts[runner]["found"] / statistics.median(t) for runner, t in times.items()}
    rows = [[runner, f"{statistics.median(t):.1f} ({', '.join(f'{x:.1f}' for x in t)})",
             f"{rates[runner]:.2f}", f"{rates[runner] / args.workers:.2f}"]
            for runner, t in times.items()]  # fmt: skip
    rows.append([f"convert_item in this process (first {first} files)", f"{per_file:.3f} s/file",
                 f"{1 / per_file:.2f}", f"{1 / per_file:.2f}"])  # fmt: skip
    header = [f"runner ({args.workers} processes)", f"wall s: median (all {args.rounds})",
              "images/s", "images/s per process"]  # fmt: skip
    print()
    print(harness.markdown_table(header, rows))
    print(f"\nbeam / multiprocess images/s: {rates['beam'] / rates['multiprocess']:.2f}")

    per_process = rates["beam"] / args.workers
    print(
        f"\n{RAD_DINO_IMAGES:,} images at the Beam rate of {per_process:.2f} images/s per "
        f"process (ceiling {1 / per_file:.2f}), one SDK process per vCPU, "
        f"{VCPUS_PER_WORKER} vCPUs per worker (n2-standard-4):"
    )
    for workers in DATAFLOW_WORKERS:
        processes = workers * VCPUS_PER_WORKER
        hours = RAD_DINO_IMAGES / (per_process * processes) / 3600
        ceiling = RAD_DINO_IMAGES * per_file / processes / 3600
        print(f"  {workers} workers ({processes} processes): {hours:.1f} h "
              f"(ceiling {ceiling:.1f} h)")  # fmt: skip


if __name__ == "__main__":
    main()

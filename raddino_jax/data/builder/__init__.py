"""The dataset builder: radiographs (a folder or a CSV) -> a tfds ArrayRecord dataset (recipe s8).

Command line: `python -m data_prep.build`; `data_prep.samples.builtin` calls `build_dataset` for
the built-in samples. Every DICOM / PNG / JPEG is decoded (`data.decode`) on a
spawn-safe process pool, resized so its shorter side is `size` (aspect kept), and stored as a
1-channel PNG with its metadata (schema: `data.records`). TensorFlow is not needed: tfds
receives the PNG bytes as they are. Results stream from the pool into the tfds writer in input
order, so the dataset is never held in memory.

Modules, in the order a build uses them:
  inputs.py   folder scan / CSV list -> InputItems (split, patient id, mask, typed labels)
  convert.py  one file -> one record (decode, resize, PNG, mask, labels), or a failure
  writer.py   the tfds builder and the in-order stream of accepted records into it
  dataset.py  BuildOptions, build_dataset (pool, retries, re-run check) and report.json
  beam.py     the same conversion as an Apache Beam pipeline (--runner=beam; optional extra)

Bad files never stop the build: each one is listed in DATA_DIR/NAME/report.json with a
machine-readable reason. Exact duplicates (same decoded pixels) keep the first occurrence in
input order; the others are listed with the file they duplicate. A split in which no file
converts is left out of the tfds dataset (tfds cannot store an empty split; the conversion runs
once more without it) and listed in `dropped_empty_splits`.

Re-running: if DATA_DIR/NAME already holds a finished build (dataset_info.json and report.json)
made with the same options, the build is skipped and the stored report returned; with different
options it stops with an error. `overwrite=True` deletes DATA_DIR/NAME and rebuilds.
"""

from raddino_jax.data.builder.dataset import RUNNERS, BuildOptions, build_dataset
from raddino_jax.data.builder.inputs import infer_label_type

__all__ = ["RUNNERS", "BuildOptions", "build_dataset", "infer_label_type"]

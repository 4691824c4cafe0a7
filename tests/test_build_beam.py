"""The Beam build (`data_prep.build --runner=beam`) against the multiprocess build.

Both builds convert the same hostile corpora (tests/test_build.py: duplicates, truncated /
empty / pixel-less / undecodable DICOMs, a non-DICOM, a CSV with labels, masks, missing files and
a split in which every file fails); the Beam one runs locally on Beam's FnApiRunner with 2 SDK
worker processes. They must give the same records (image bytes and every metadata feature, in
the same order) and the same report.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

beam = pytest.importorskip(
    "apache_beam", reason="Apache Beam is not installed: pip install -r requirements-beam.txt"
)

from test_build import SIZE, _write_csv_inputs, make_folder  # noqa: E402

from data_prep import build  # noqa: E402
from raddino_jax.data import builder, records  # noqa: E402
from raddino_jax.data.builder import beam as beam_build  # noqa: E402

TWO_LOCAL_WORKERS = (
    "--runner=FnApiRunner --direct_running_mode=multi_processing --direct_num_workers=2"
)


def _comparable(value):
    """A feature value as something `==` compares exactly (NaN equal to NaN, arrays by bytes)."""
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _records(data_dir: pathlib.Path, name: str, splits) -> dict[str, list[dict]]:
    out = {}
    for split in splits:
        source = records.open_split(data_dir, name, split)
        out[split] = [
            {key: _comparable(value) for key, value in source[index].items()}
            for index in range(len(source))
        ]
    return out


def _without_runner(report: dict) -> dict:
    options = {k: v for k, v in report["options"].items() if k not in ("runner", "output")}
    return {**report, "options": options}


def _build_both(tmp: pathlib.Path, input_path: pathlib.Path, **kwargs) -> tuple[dict, dict]:
    reports = {}
    for runner in ("multiprocess", "beam"):
        reports[runner] = builder.build_dataset(
            builder.BuildOptions(
                input=str(input_path),
                output=str(tmp / runner),
                name="corpus",
                size=SIZE,
                workers=2,
                runner=runner,
                beam_options=TWO_LOCAL_WORKERS if runner == "beam" else "",
                **kwargs,
            )
        )
    return reports["multiprocess"], reports["beam"]


def test_folder_corpus_same_records_and_report(tmp_path):
    make_folder(tmp_path / "in")
    local, beam_report = _build_both(tmp_path, tmp_path / "in", bits=16)
    assert beam_report["options"]["runner"] == "beam"
    assert _without_runner(beam_report) == _without_runner(local)
    assert beam_report["counts"] == {"found": 10, "converted": 4, "failed": 5, "duplicates": 1}
    assert beam_report["duplicates"] == [
        {"path": "b_chest_uncompressed.dcm", "duplicate_of": "a_chest_j2k.dcm"}
    ]
    beam_records = _records(tmp_path / "beam", "corpus", ["train"])
    assert beam_records == _records(tmp_path / "multiprocess", "corpus", ["train"])
    assert len(beam_records["train"]) == 4
    assert not (tmp_path / "beam" / "corpus" / beam_build.WORK_DIR).exists()


def test_csv_corpus_with_an_empty_split(tmp_path):
    """Labels (NaN blanks), masks, missing files, and a split dropped because all of it fails."""
    _write_csv_inputs(tmp_path / "in")
    local, beam_report = _build_both(tmp_path, tmp_path / "in" / "labels.csv", bits=8)
    assert _without_runner(beam_report) == _without_runner(local)
    assert beam_report["dropped_empty_splits"] == ["test"]
    assert beam_report["splits"] == {"train": 3, "test": 0, "validation": 2}
    splits = ["train", "validation"]
    beam_records = _records(tmp_path / "beam", "corpus", splits)
    assert beam_records == _records(tmp_path / "multiprocess", "corpus", splits)
    assert beam_records["train"][1]["score"] == "nan"  # a blank float label survives as NaN


def test_cli_flags_and_rerun(tmp_path):
    """--runner/--beam-options on the command line; a finished build is reused by either runner."""
    make_folder(tmp_path / "in")
    argv = [
        "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--name", "mixed",
        "--size", str(SIZE), "--workers", "2", "--runner=beam",
    ]  # fmt: skip
    report = build.main([*argv, f"--beam-options={TWO_LOCAL_WORKERS}"])
    assert report["counts"]["converted"] == 4 and report["options"]["runner"] == "beam"
    assert build.main(argv[:-1]) == report  # multiprocess re-run: same options, reused


def test_remote_runner_needs_a_shared_output(tmp_path):
    make_folder(tmp_path / "in")
    options = builder.BuildOptions(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"), name="x", runner="beam",
        beam_options="--runner=DataflowRunner --project=p --region=europe-west4",
    )  # fmt: skip
    with pytest.raises(ValueError, match="gs://"):
        builder.build_dataset(options)


def test_runner_options_are_checked():
    with pytest.raises(ValueError, match="runner"):
        builder.BuildOptions(input="in", output="out", name="x", runner="spark")
    with pytest.raises(ValueError, match="beam_options"):
        builder.BuildOptions(input="in", output="out", name="x", beam_options="--runner=X")
    local = beam_build.pipeline_options("", workers=3).get_all_options()
    assert local["runner"] == "FnApiRunner" and local["direct_num_workers"] == 3
    chosen = beam_build.pipeline_options("--runner=DataflowRunner --region=r", workers=3)
    assert chosen.get_all_options()["runner"] == "DataflowRunner"

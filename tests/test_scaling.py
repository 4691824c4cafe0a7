"""The data-scaling sweep: nested patient subsets, run layout, end to end with resume."""

import csv
import json

import numpy as np
import pytest

from raddino_jax import scaling
from raddino_jax.data import sources
from tests.tiny import build_tiny_dataset, tiny_run_config


def _records(n_patients: int = 60, per_patient: int = 3) -> list[dict]:
    return [
        {"patient_id": f"p{p}".encode(), "path": f"p{p}/{i}.png".encode(), "image": b""}
        for p in range(n_patients)
        for i in range(per_patient)
    ]


def test_patient_subsets_are_nested_patient_disjoint_and_deterministic():
    records = _records()
    kept = {}
    for fraction in (0.1, 0.25, 0.5, 1.0):
        subset = sources.patient_subset(records, fraction)
        kept[fraction] = set(subset.indices.tolist())
        patients = {records[i]["patient_id"] for i in kept[fraction]}
        # whole patients: every image of a kept patient is kept
        assert kept[fraction] == {i for i, r in enumerate(records) if r["patient_id"] in patients}
        assert np.array_equal(subset.indices, sources.patient_subset(records, fraction).indices)
        assert [subset[j] for j in range(len(subset))] == [records[i] for i in subset.indices]
    assert kept[0.1] <= kept[0.25] <= kept[0.5] <= kept[1.0] == set(range(len(records)))
    assert 0 < len(kept[0.1]) < len(kept[0.5]) < len(records)
    assert abs(len(kept[0.5]) / len(records) - 0.5) < 0.2
    with pytest.raises(ValueError, match="fraction"):
        sources.patient_subset(records, 0.0)


def test_sources_argument_and_mixture_runs(tmp_path):
    assert scaling.parse_sources("/d/a:0.8,/e/b:0.2") == (("a", "/d", 0.8), ("b", "/e", 0.2))
    assert scaling.parse_sources("/d/a,/e/b")[1] == ("b", "/e", "proportional")
    with pytest.raises(ValueError, match="DATA_DIR/NAME"):
        scaling.parse_sources("justaname")
    base = tiny_run_config(str(tmp_path), "x")
    base.data.dir, base.data.name = "", ""
    base.data.sources = (("a", "/d", 1.0), ("b", "/d", 1.0), ("c", "/d", 2.0))
    runs = scaling.run_configs(base, [0.5, 1.0], 7, mixtures=True)
    assert [name for name, _, _ in runs] == ["all", "without_a", "without_b", "without_c"]
    assert all(fraction == 1.0 and cfg.total_steps == 7 for _, fraction, cfg in runs)
    assert [s[0] for s in runs[2][2].data.sources] == ["a", "c"]
    plain = scaling.run_configs(base, [0.5, 1.0], 7, mixtures=False)
    assert [(n, f, c.data.fraction) for n, f, c in plain] == [
        ("fraction_0.5", 0.5, 0.5),
        ("fraction_1", 1.0, 1.0),
    ]


@pytest.mark.slow
def test_scaling_sweep_end_to_end_then_skips_finished_runs(tmp_path, monkeypatch, capsys):
    data_dir, name = build_tiny_dataset(tmp_path / "data")
    monkeypatch.setenv("RADDINO_TEST_DATA", f"{data_dir}/{name}")
    out = tmp_path / "sweep"
    scans = []  # each patient-subset scan of the training records
    real_subset = sources.patient_subset
    monkeypatch.setattr(
        sources, "patient_subset", lambda *a, **k: scans.append(a[1]) or real_subset(*a, **k)
    )
    argv = [
        "--config=tests/tiny_config.py",
        "--fractions=0.5,1.0",
        "--steps=2",
        f"--eval-data={data_dir}/{name}",
        "--label=nodule",
        f"--workdir={out}",
        "--task=knn,linear",
        "--bootstrap=50",
        "--config.checkpoint_every=2",
    ]
    assert scaling.main(argv) == 0
    for file in scaling.OUTPUTS:
        assert (out / file).stat().st_size > 0, file
    runs = json.loads((out / "scaling.json").read_text())["runs"]
    assert [r["run"] for r in runs] == ["fraction_0.5", "fraction_1"]
    assert 0 < runs[0]["images"] < runs[1]["images"]
    assert runs[0]["images_seen"] == runs[1]["images_seen"] == 2 * 16
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["run"] for r in table} >= {"fraction_0.5", "fraction_1", "random_init"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in table)
    for row in table:  # every kNN accuracy has a finite 95% interval around it
        value, low, high = (float(row[k]) for k in ("value", "ci_low", "ci_high"))
        assert np.isfinite([value, low, high]).all() and low <= value <= high, row
    assert scans == [0.5]  # one scan of the records per subset run (training and the count)

    # Re-running trains nothing: every run is finished.
    from raddino_jax.train import loop

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "train", no_training)
    capsys.readouterr()
    assert scaling.main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert json.loads((out / "scaling.json").read_text())["runs"] == runs

"""metrics.jsonl writer: O(1) work per record in both layouts, exact resume, readers."""

import json
import types

import numpy as np
import pytest
from etils import epath

from raddino_jax.train import metrics
from raddino_jax.train.metrics import MetricsWriter, read_metrics

LAYOUTS = [pytest.param(True, id="append"), pytest.param(False, id="parts")]


def _writer(workdir, append, part_lines=4):
    return MetricsWriter(workdir, tensorboard=False, append=append, part_lines=part_lines)


def _log(writer, steps):
    """A training record per step and an eval record every 5 steps (same step number)."""
    for step in steps:
        writer.write(step, {"loss": 1.0 / step})
        if step % 5 == 0:
            writer.write(step, {"knn/top1_k10": 0.5})


def test_layout_follows_the_filesystem(tmp_path):
    assert MetricsWriter(tmp_path, tensorboard=False).append
    assert not MetricsWriter("gs://bucket/run", enabled=False, tensorboard=False).append
    assert not metrics.can_append(epath.Path("s3://bucket/run"))


@pytest.mark.parametrize("append", LAYOUTS)
def test_records_round_trip_in_order(tmp_path, append):
    writer = _writer(tmp_path, append)
    _log(writer, range(1, 11))
    writer.write(11, {"loss": float("nan"), "lr": float("inf")})
    writer.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [*range(1, 6), 5, *range(6, 11), 10, 11]
    assert records[0] == {"step": 1, "loss": 1.0}
    assert records[-1] == {"step": 11, "loss": "nan", "lr": "inf"}  # strict JSON
    if append:
        assert not (tmp_path / metrics.PARTS_DIR).exists()
    else:  # 13 records in parts of 4
        parts = sorted(p.name for p in (tmp_path / metrics.PARTS_DIR).iterdir())
        assert parts == [f"part-00000{i}.jsonl" for i in range(4)]
        assert not (tmp_path / metrics.METRICS_FILE).exists()


def test_append_layout_opens_once_and_never_rewrites(tmp_path, monkeypatch):
    path_type = type(epath.Path(tmp_path))
    opened = []
    real_open = path_type.open

    def counting_open(self, mode="r", *args, **kwargs):
        opened.append(mode)
        return real_open(self, mode, *args, **kwargs)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a write reread or rewrote the file")

    monkeypatch.setattr(path_type, "open", counting_open)
    monkeypatch.setattr(path_type, "read_text", forbidden)
    monkeypatch.setattr(path_type, "write_text", forbidden)
    writer = _writer(tmp_path, True)
    _log(writer, range(1, 101))
    assert opened == ["a"]
    # durable before close: each record is flushed as it is written
    assert len((tmp_path / metrics.METRICS_FILE).read_bytes().splitlines()) == 120
    writer.close()


def test_part_layout_uploads_at_most_part_lines_per_write(tmp_path, monkeypatch):
    path_type = type(epath.Path(tmp_path))
    uploads = []
    real_write_text = path_type.write_text

    def counting_write_text(self, text, *args, **kwargs):
        uploads.append(text.count("\n"))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(path_type, "write_text", counting_write_text)
    writer = _writer(tmp_path, False, part_lines=10)
    _log(writer, range(1, 201))  # 240 records
    assert len(uploads) == 240 and max(uploads) == 10
    assert sum(uploads) == 24 * sum(range(1, 11))  # linear in the records, not quadratic
    assert len(read_metrics(tmp_path)) == 240


@pytest.mark.parametrize("append", LAYOUTS)
def test_resume_drops_records_past_the_restored_step(tmp_path, append):
    """Run to step 23, die, restore the step-17 checkpoint, run on: every step logged once."""
    first = _writer(tmp_path, append)
    _log(first, range(1, 24))
    del first  # killed: never closed
    resumed = _writer(tmp_path, append)
    resumed.truncate_after(17)
    assert [r["step"] for r in read_metrics(tmp_path)][-3:] == [15, 16, 17]
    _log(resumed, range(18, 31))
    resumed.close()
    records = read_metrics(tmp_path)
    losses = [r["step"] for r in records if "loss" in r]
    assert losses == list(range(1, 31))
    assert [r["step"] for r in records if "knn/top1_k10" in r] == [5, 10, 15, 20, 25, 30]
    assert all(r["loss"] == 1.0 / r["step"] for r in records if "loss" in r)


def test_part_layout_restart_leaves_earlier_parts_alone(tmp_path):
    first = _writer(tmp_path, False)
    _log(first, range(1, 7))  # 7 records: parts 0 (4) and 1 (3)
    first.close()
    parts = tmp_path / metrics.PARTS_DIR
    before = {p.name: p.read_text() for p in parts.iterdir()}
    resumed = _writer(tmp_path, False)
    resumed.truncate_after(6)  # nothing to drop
    _log(resumed, range(7, 9))
    resumed.close()
    after = {p.name: p.read_text() for p in parts.iterdir()}
    assert {k: after[k] for k in before} == before  # untouched, not refilled
    assert sorted(after) == [f"part-00000{i}.jsonl" for i in range(3)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 5, 6, 7, 8]


def test_truncate_empties_whole_parts_and_fresh_start_clears_stale_records(tmp_path):
    writer = _writer(tmp_path, False)
    _log(writer, range(1, 13))  # 14 records: parts 0-3
    writer.close()
    _writer(tmp_path, False).truncate_after(4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert len(list((tmp_path / metrics.PARTS_DIR).iterdir())) == 1
    _writer(tmp_path, False).truncate_after(0)  # a fresh run in an old workdir (step 0)
    assert read_metrics(tmp_path) == []


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    writer = _writer(tmp_path, True)
    _log(writer, range(1, 4))
    writer.close()
    path = tmp_path / metrics.METRICS_FILE
    path.write_text(path.read_text() + '{"step": 4, "lo')  # died mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    resumed = _writer(tmp_path, True)
    resumed.truncate_after(3)
    _log(resumed, [4])
    resumed.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_disabled_writer_touches_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.truncate_after(0)
    _log(writer, range(1, 6))
    writer.close()
    assert list(tmp_path.iterdir()) == []


def _step_log(source_names: tuple[str, ...]) -> metrics.StepLog:
    """A StepLog for its host counts only (nothing is written or timed)."""
    data = types.SimpleNamespace(source_names=source_names)
    return metrics.StepLog(None, None, None, None, 1, [None], data)


def test_host_counts_survive_a_resume_exactly():
    """Records skipped and images per source from the batches' host entries: a run stopped at
    a checkpoint and resumed from its `counters` ends with the counts of the whole stream, and
    the pending step holds the counts of its own batch, not of later ones."""
    rng = np.random.default_rng(0)
    hosts = [
        {"records_skipped": np.int64(k % 2), "source_ids": rng.integers(0, 3, 8).astype(np.int32)}
        for k in range(6)
    ]
    names = ("a", "b", "c")
    first = _step_log(names)
    for step, host in enumerate(hosts[:4], start=1):
        first.dispatched(step, {}, host)
    resumed = _step_log(names)
    resumed.restore_counters(first.counters())
    for step, host in enumerate(hosts[4:], start=5):
        resumed.dispatched(step, {}, host)
        if step == 5:
            step_five = resumed.pending
    ids = np.concatenate([h["source_ids"] for h in hosts])
    expected = np.bincount(ids, minlength=3)
    assert resumed.counters() == {
        "records_skipped": 3,
        **{f"images_seen/{n}": int(c) for n, c in zip(names, expected, strict=True)},
    }
    five = resumed.global_counts(step_five[2])  # read after step 6 was dispatched
    assert [five[f"images_seen/{n}"] for n in names] == np.bincount(ids[:40], minlength=3).tolist()
    single = _step_log(())
    single.dispatched(1, {}, {**hosts[1], "source_ids": np.zeros(8, np.int32)})
    assert single.counters() == {"records_skipped": 1}
    assert first.counters()["records_skipped"] == 2

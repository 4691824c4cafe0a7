"""The training driver end to end: exact resume, preemption, meshes, processes, guards, config."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from etils import epath

from raddino_jax import checkpoint
from raddino_jax import config as config_lib
from raddino_jax.data import pipeline as pipeline_lib
from raddino_jax.train import build as build_lib
from raddino_jax.train import loop
from raddino_jax.train import step as step_lib
from raddino_jax.train.metrics import NonFiniteError, read_metrics
from raddino_jax.train.preemption import preemption_check_due
from tests import faults
from tests.tiny import build_tiny_dataset, tiny_run_config
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_KEYS = (
    "loss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "teacher_entropy",
    "grad_norm/backbone",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("data"))


def _env(dataset, devices: int = 8) -> dict:
    env = dict(os.environ)
    env["RADDINO_TEST_DATA"] = "/".join(dataset)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO
    return env


def _command(workdir, *overrides, entry: str = "raddino_jax.main") -> list[str]:
    """The driver's command line; `entry="tests.faults"` accepts that module's fault flags."""
    return [
        sys.executable,
        "-m",
        entry,
        "--config=tests/tiny_config.py",
        f"--workdir={workdir}",
        *overrides,
    ]


def _run(dataset, workdir, *overrides, devices=8, check=True, entry="raddino_jax.main"):
    result = subprocess.run(
        _command(workdir, *overrides, entry=entry),
        env=_env(dataset, devices),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def _by_step(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(workdir) if "loss" in r}


def _assert_same_params(workdir_a, workdir_b, atol=0.0):
    for which in ("student", "teacher"):
        _, a = checkpoint.load_run_params(workdir_a, which)
        _, b = checkpoint.load_run_params(workdir_b, which)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(dataset, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(dataset, straight)
    kill_at_3 = ("--kill_after_checkpoint=3",)
    first = _run(dataset, killed, *kill_at_3, check=False, entry="tests.faults")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == [
        3
    ]
    second = _run(dataset, killed, *kill_at_3, entry="tests.faults")  # the same command again
    assert "resumed" in second.stdout
    a, b = _by_step(straight), _by_step(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in LOSS_KEYS:
            assert a[step][key] == b[step][key], (step, key)
    _assert_same_params(straight, killed)
    # the exporter reads a run directory (teacher by default, --which student)
    from raddino_jax.convert import __main__ as convert_cli

    for which in ("teacher", "student"):
        out = tmp_path / f"hf_{which}"
        argv = ["to-hf", "--checkpoint", str(straight), "--out", str(out), "--which", which]
        assert convert_cli.main([*argv, "--verify"]) == 0


@pytest.mark.slow
def test_resume_with_batches_prefetched_ahead_is_exact(dataset, tmp_path, monkeypatch):
    """Three global batches prefetched by the thread (data.device_prefetch=3) when the run
    dies after checkpoint 3: the checkpoint holds the iterator at the first batch step 4 uses,
    so the resumed run equals an uninterrupted one that prefetches nothing (0)."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    loop.train(tiny_run_config(*dataset, **{"data.device_prefetch": 0}), str(straight))
    ahead = tiny_run_config(*dataset, **{"data.device_prefetch": 3})
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.TrainCheckpointer, "save", faults.save_then_crash(3))
        with pytest.raises(faults.Crash):
            loop.train(ahead, str(crashed))
    assert not [t for t in threading.enumerate() if t.name == "device-prefetch"]
    loop.train(ahead, str(crashed))
    a, b = _by_step(straight), _by_step(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 3, 4, 5, 6):
        for key in LOSS_KEYS:
            assert a[step][key] == b[step][key], (step, key)
    _assert_same_params(straight, crashed)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_preemption_check_decision(processes):
    """One process checks every step; several only every N steps and on checkpoint steps, a
    function of the step and the config alone (so every process enters the all-gather)."""
    every, checkpoints = 10, {7, 14, 25}
    due = [
        s
        for s in range(1, 31)
        if preemption_check_due(s, every, processes, checkpoint_step=s in checkpoints)
    ]
    if processes == 1:
        assert due == list(range(1, 31))
    else:
        assert due == [7, 10, 14, 20, 25, 30]
        gaps = np.diff([0, *due])
        assert gaps.max() <= every  # a signal is honoured within N steps


@pytest.mark.slow
def test_sigterm_leaves_restorable_checkpoint_at_current_step(dataset, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        _command(
            workdir,
            "--config.total_steps=400",
            "--config.checkpoint_every=1000",
            "--config.optim.warmup_steps=10",
        ),
        env=_env(dataset),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = int(stderr.split("saved checkpoint at step ")[1].split()[0])
    assert 3 <= step < 400
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [step]
    spec, teacher = checkpoint.load_run_params(workdir, "teacher")
    assert jax.tree.leaves(teacher)[0].shape  # restorable (resuming is tested above)
    manager = checkpoint.TrainCheckpointer(workdir, 3)
    assert manager.latest_step() == step
    manager.close()


@pytest.mark.slow
def test_meshes_agree_and_checkpoint_moves_between_them(dataset, tmp_path):
    wide = tmp_path / "8x1x1"
    loop.train(tiny_run_config(*dataset, mesh={"data": 8, "fsdp": 1, "tensor": 1}), str(wide))
    fsdp = tmp_path / "2x4x1"
    loop.train(tiny_run_config(*dataset, mesh={"data": 2, "fsdp": 4, "tensor": 1}), str(fsdp))
    a, b = _by_step(wide), _by_step(fsdp)
    for step in range(1, 6):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
            np.testing.assert_allclose(a[step][key], b[step][key], atol=1e-5, rtol=1e-5)

    moved = tmp_path / "moved"
    shutil.copytree(wide, moved)
    shutil.rmtree(moved / "checkpoints" / "6")
    loop.train(tiny_run_config(*dataset, mesh={"data": 2, "fsdp": 4, "tensor": 1}), str(moved))
    c = _by_step(moved)
    for step in (4, 5, 6):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
            np.testing.assert_allclose(c[step][key], a[step][key], atol=1e-5, rtol=1e-5)
    _assert_same_params(wide, moved, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_both_and_resumes_on_other_counts(dataset, tmp_path):
    """1 process (steps 1-2) -> 2 processes, SIGTERM to process 1 alone: both save the same
    step S and exit, within preemption_check_every (3) steps -> 1 process (to S + 2):
    preempted capacity coming back larger, then smaller. The model state restores onto the new
    mesh; the data stream continues at the position the step implies (no image repeated or
    skipped)."""
    workdir = tmp_path / "two"
    first = _run(dataset, workdir, "--config.total_steps=2", "--config.checkpoint_every=2")
    assert "resumed" not in first.stdout
    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(
                workdir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--config.total_steps=400",
                "--config.checkpoint_every=2",
                "--config.preemption_check_every=3",
            ),
            env=_env(dataset, devices=4),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    while (
        time.time() < deadline
        and all(p.poll() is None for p in procs)
        and len(metrics.read_text().splitlines()) < 4  # 2 from the first run, 2 from these
    ):
        time.sleep(0.2)
    signalled_after = len(metrics.read_text().splitlines())
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=400) for p in procs]
    saved = []
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        saved.append(int(err.split("saved checkpoint at step ")[1].split()[0]))
    assert "8 cpu device(s), 2 process(es)" in outputs[0][0]
    assert "checkpoint 2 written by 1 process(es), this run has 2" in outputs[0][0]
    assert "continues at global position 32" in outputs[0][0]
    step = saved[0]
    assert saved == [step, step] and signalled_after - 1 <= step <= signalled_after + 3 + 1
    data = workdir / "checkpoints" / str(step) / "data"
    files = sorted(p.name for p in data.iterdir() if p.suffix == ".json")
    assert files == ["process_0-of-2.json", "process_1-of-2.json"], files
    # back to one process: resumes too
    end = step + 2
    last = _run(dataset, workdir, f"--config.total_steps={end}", "--config.checkpoint_every=2")
    assert f"checkpoint {step} written by 2 process(es), this run has 1" in last.stdout
    assert f"continues at global position {16 * step}" in last.stdout
    records = _by_step(workdir)
    assert sorted(records) == list(range(1, end + 1))
    assert [records[s]["images_seen"] for s in range(1, end + 1)] == [
        16 * s for s in range(1, end + 1)
    ]
    assert all(np.isfinite(records[s]["loss"]) for s in records)


def test_per_process_shards_are_disjoint(dataset):
    from raddino_jax.data import mixture, pipeline, sources

    source = sources.open_training_split(*dataset, "train")
    seen = []
    for index in range(2):
        records = pipeline.shard(mixture.record_stream(source, 0), index, 2)
        seen.append({bytes(records[i]["path"]) for i in range(len(source) // 2)})
    assert not seen[0] & seen[1]


def test_injected_nan_stops_and_keeps_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    """Also runs the periodic kNN evaluation (config.eval) and checks it is logged."""
    monkeypatch.setattr(step_lib, "train_step", faults.train_step_with_nan_loss(4))
    cfg = tiny_run_config(*dataset, **{"eval.every": 3, "eval.label": "nodule"})
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 5"):
        loop.train(cfg, str(tmp_path))
    manager = checkpoint.TrainCheckpointer(tmp_path, 3)
    assert manager.latest_step() == 3
    manager.close()
    records = read_metrics(tmp_path)
    assert max(r["step"] for r in records) == 4
    knn = [r for r in records if "knn/top1_k10" in r]
    assert [r["step"] for r in knn] == [3] and 0.0 <= knn[0]["knn/top1_k10"] <= 1.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"total_steps": 0}, "config.total_steps"),
        ({"batch_size": 12}, "config.batch_size"),
        ({"data.global_size": 50}, "config.data.global_size"),
        ({"data.local_size": 30}, "config.data.local_size"),
        ({"data.dir": "/nonexistent/dir"}, "config.data.dir"),
        ({"data.mask_group_size": 3}, "config.data.mask_group_size"),
        ({"model.arch": "vit_huge"}, "config.model.arch"),
        ({"ssl.centering": "median"}, "config.ssl.centering"),
        ({"init.checkpoint": "/no/such/weights.pth"}, "config.init.checkpoint"),
        ({"mesh": {"data": 3, "fsdp": 1, "tensor": 1}}, "config.mesh"),
        ({"eval.every": 5}, "config.eval.label"),
    ],
)
def test_bad_configs_fail_before_compiling(dataset, tmp_path, overrides, key):
    cfg = tiny_run_config(*dataset, **overrides)
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        loop.train(cfg, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_key_is_rejected_by_the_cli(dataset, tmp_path):
    result = _run(dataset, tmp_path, "--config.model.archh=vit_base", check=False)
    assert result.returncode != 0 and "archh" in result.stderr
    assert not epath.Path(tmp_path / "checkpoints").exists()


def _mixture_overrides(dataset) -> dict:
    data_dir, name = dataset
    return {
        "data.dir": "",
        "data.name": "",
        "data.sources": ((name, data_dir, 0.8), (name, data_dir, 0.2)),
    }


@pytest.mark.slow
def test_two_stages_over_a_mixture_compile_once_each_and_resume_after_sigkill(
    dataset, tmp_path, monkeypatch
):
    """56 -> 84 px globals (batch 16 -> 32) at step 4 over a 0.8/0.2 two-source mixture: one
    compile per stage, the analytic FLOPs of each stage in metrics.jsonl, per-source counts,
    and a SIGKILL after the checkpoint of step 4, exactly on the stage boundary (it holds
    stage 1's iterator; the resumed run switches to stage 2's), resumes exactly."""
    from raddino_jax.data import mixture, sources
    from raddino_jax.train import stages as stages_lib

    stage_overrides = {"stages": ((4, 84, 28, 32),), "checkpoint_every": 2}
    compiled = []
    real_compile = build_lib.compile_train_step

    def counting_compile(*args, **kwargs):
        compiled.append(real_compile(*args, **kwargs))
        return compiled[-1]

    monkeypatch.setattr(build_lib, "compile_train_step", counting_compile)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cfg = tiny_run_config(*dataset, **_mixture_overrides(dataset), **stage_overrides)
    loop.train(cfg, str(straight))
    assert len(compiled) == 2 and [fn._cache_size() for fn in compiled] == [1, 1]

    records = _by_step(straight)
    spec = build_lib.model_spec(cfg)
    table = stages_lib.stage_table(cfg)
    expected_flops = [build_lib.step_flops(s.config, spec, 8) / 1e12 for s in table]
    assert expected_flops[1] > 2 * expected_flops[0]  # more tokens, twice the batch
    # the true mixture draw: the source of each stream position the steps consumed
    stream = mixture.record_stream(sources.open_training_data(cfg, straight).records, cfg.seed)
    drawn = np.array([stream[i][mixture.SOURCE_FIELD] for i in range(16 * 4 + 32 * 2)])
    for step, record in records.items():
        stage = 0 if step <= 4 else 1
        assert record["stage"] == stage
        assert record["step_tflops"] == pytest.approx(expected_flops[stage], rel=1e-12)
        seen = 16 * min(step, 4) + 32 * max(step - 4, 0)
        assert record["images_seen"] == seen
        counts = np.bincount(drawn[:seen], minlength=2)
        assert [record["images_seen/tiny"], record["images_seen/tiny_2"]] == counts.tolist()

    data_dir, name = dataset
    argv = (
        "--config.data.dir=",
        "--config.data.name=",
        f"--config.data.sources=(('{name}','{data_dir}',0.8),('{name}','{data_dir}',0.2))",
        "--config.stages=((4,84,28,32),)",
        "--config.checkpoint_every=2",
        "--kill_after_checkpoint=4",
    )
    first = _run(dataset, killed, *argv, check=False, entry="tests.faults")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = _run(dataset, killed, *argv, entry="tests.faults")
    assert "resumed" in second.stdout and "stage 1" in second.stdout
    b = _by_step(killed)
    assert sorted(b) == sorted(records) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        for key in (*LOSS_KEYS, "step_tflops", "images_seen/tiny"):
            assert records[step][key] == b[step][key], (step, key)
    _assert_same_params(straight, killed)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"stages": ((0, 84, 28, 32),)}, "config.stages[0]"),
        ({"stages": ((3, 84, 28),)}, "config.stages[0]"),
        ({"stages": ((3, 80, 28, 32),)}, "config.stages[0]"),
        ({"stages": ((3, 84, 28, 32), (9, 84, 28, 32))}, "config.stages[1]"),
        ({"stages": ((3, 84, 28, 12),)}, "config.stages[0]"),
        ({"data.sources": (("tiny", "/tmp", 1.0),)}, "config.data.sources"),
        (
            {"data.dir": "", "data.name": "", "data.sources": (("x", "/nonexistent", 1.0),)},
            "config.data.sources[0]",
        ),
        (
            {"data.dir": "", "data.name": "", "data.sources": (("x", "/tmp", -1.0),)},
            "config.data.sources[0]",
        ),
        ({"data.fraction": 0.0}, "config.data.fraction"),
    ],
)
def test_bad_stages_and_sources_fail_before_compiling(dataset, tmp_path, overrides, key):
    import re

    cfg = tiny_run_config(*dataset, **overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(key)):
        loop.train(cfg, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


GRAM_OVERRIDES = (
    "--config.ssl.gram_weight=1.0",
    "--config.ssl.gram_start_step=2",
    "--config.ssl.gram_update_every=2",
)


def _gram_teacher(workdir, step: int) -> dict:
    import orbax.checkpoint as ocp

    from raddino_jax.models import abstract_params

    spec = checkpoint.load_spec(workdir)
    target = {"backbone": abstract_params(spec)["backbone"]}
    manager = ocp.CheckpointManager(
        (epath.Path(workdir) / checkpoint.CHECKPOINTS_DIR).resolve(),
        item_names=(checkpoint.GRAM_ITEM,),
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(gram_teacher=ocp.args.StandardRestore(target))
    )
    manager.close()
    return restored[checkpoint.GRAM_ITEM]


@pytest.mark.slow
def test_gram_anchoring_trains_and_resumes_exactly_after_sigkill(dataset, tmp_path):
    """Gram on from step 2, its teacher refreshed before steps 2 and 4: killed after checkpoint
    3 (between refreshes, so the resumed run needs the stored Gram teacher), resumed with the
    same command, identical to an uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(dataset, straight, *GRAM_OVERRIDES)
    kill_at_3 = (*GRAM_OVERRIDES, "--kill_after_checkpoint=3")
    first = _run(dataset, killed, *kill_at_3, check=False, entry="tests.faults")
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = _run(dataset, killed, *kill_at_3, entry="tests.faults")
    assert "resumed" in second.stdout
    a, b = _by_step(straight), _by_step(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a[1]["gram_loss"] == a[2]["gram_loss"] == 0.0  # metrics of steps 0 and 1
    assert all(a[step]["gram_loss"] > 0.0 for step in (3, 4, 5, 6))
    # MFU's analytic FLOPs count the Gram teacher's forward from the start step on
    cfg = tiny_run_config(
        *dataset,
        **{"ssl.gram_weight": 1.0, "ssl.gram_start_step": 2, "ssl.gram_update_every": 2},
    )
    spec = build_lib.model_spec(cfg)
    off, on = (build_lib.step_flops(cfg, spec, 8, gram_active=g) / 1e12 for g in (False, True))
    assert on > off
    assert [a[step]["step_tflops"] for step in range(1, 7)] == pytest.approx(
        [off, off, on, on, on, on], rel=1e-12
    )
    for step in (4, 5, 6):
        for key in (*LOSS_KEYS, "gram_loss"):
            assert a[step][key] == b[step][key], (step, key)
    _assert_same_params(straight, killed)
    for x, y in zip(
        jax.tree.leaves(_gram_teacher(straight, 6)),
        jax.tree.leaves(_gram_teacher(killed, 6)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# Faults a long run meets (issue 22): each injected through the driver
# ----------------------------------------------------------------------------------------------

BAD_RECORDS = (1, 5)  # record indices of the train split whose PNG bytes are destroyed


@pytest.fixture(scope="module")
def damaged_dataset(dataset, tmp_path_factory):
    """The tiny build with two train records whose image bytes no longer decode."""
    data_dir, name = dataset
    root = tmp_path_factory.mktemp("damaged") / "tfds"
    shutil.copytree(data_dir, root)
    (split_file,) = (root / name).glob("*/*-train.array_record-*")
    faults.corrupt_records(str(split_file), BAD_RECORDS)
    return str(root), name


def _tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment holds `tag` (the trainer's children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag.encode() in environ and state != "Z":
            pids.append(int(entry))
    return pids


def _shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def _wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _flip_bytes(step_dir) -> None:
    """Flips one bit in the middle of the largest array file of the step's teacher."""
    files = [p for p in (step_dir / "teacher").rglob("*") if p.is_file() and "/d/" in str(p)]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))


@pytest.mark.slow
def test_killed_mid_save_with_workers_then_damaged_checkpoint_and_bad_records(
    damaged_dataset, tmp_path
):
    """One run over a build with two undecodable records, with a Grain worker process, SIGKILLed
    while Orbax writes the checkpoint of step 4; then a bit flipped in step 3. The worker exits
    with the trainer and its shared memory goes; the restart skips the half-written step 4 and
    the damaged step 3 (set aside, with the reason), resumes from step 2 and retrains steps 3-4
    exactly as the first run did: losses and the `records_skipped` count identical."""
    workdir, tag = tmp_path / "run", f"raddino-fault-{os.getpid()}-{time.time_ns()}"
    argv = (
        "--config.total_steps=4",
        "--config.checkpoint_every=1",
        "--config.keep_checkpoints=2",
        "--config.data.max_bad_fraction=0.5",
        "--config.data.num_workers=1",  # the same in both runs: the iterator state holds it
    )
    env = {**_env(damaged_dataset), "RADDINO_FAULT_TAG": tag}
    shm_before = _shm_segments()
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        first = subprocess.Popen(
            _command(
                workdir,
                *argv,
                "--config.device_memory_gib=0.000001",  # the preflight's refusal, overridden
                "--config.allow_over_memory=true",
                "--kill_during_checkpoint=4",
                entry="tests.faults",
            ),
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=err,
        )
        assert first.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "err.txt").read_text()
    assert "allow_over_memory: running anyway" in (tmp_path / "out.txt").read_text()
    # nothing of the trainer keeps running, and its shared-memory batches are gone
    assert _wait_for(lambda: not _tagged_processes(tag)), _tagged_processes(tag)
    assert _wait_for(lambda: not (_shm_segments() - shm_before)), _shm_segments() - shm_before
    killed = _by_step(workdir)
    assert sorted(killed) == [1, 2, 3, 4]
    assert killed[4]["records_skipped"] >= len(BAD_RECORDS)  # 64 positions > one epoch

    _flip_bytes(workdir / "checkpoints" / "3")
    second = _run(damaged_dataset, workdir, *argv)
    assert "checkpoint step 3 skipped: DamagedCheckpoint" in second.stdout, second.stdout
    assert "resumed from" in second.stdout and "at step 2" in second.stdout
    assert (workdir / "damaged_checkpoints" / "3").is_dir()  # set aside, not deleted
    resumed = _by_step(workdir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in (*LOSS_KEYS, "records_skipped", "images_seen"):
            assert resumed[step][key] == killed[step][key], (step, key)


@pytest.mark.slow
def test_bad_records_over_the_allowed_fraction_stop_the_run(damaged_dataset, tmp_path):
    overrides = {"data.max_bad_fraction": 0.01, "model.depth": 1}  # one block: a faster compile
    cfg = tiny_run_config(*damaged_dataset, total_steps=2, **overrides)
    with pytest.raises(pipeline_lib.BadDataError, match=r"data\.max_bad_fraction"):
        loop.train(cfg, str(tmp_path))


@pytest.mark.slow
def test_memory_preflight_refuses_before_reading_data(dataset, tmp_path):
    """A capacity below the step's compiled peak: exit 4 after the compile, naming the peak,
    the capacity and the nearest layouts with their compiled peaks; no data was built."""
    result = _run(
        dataset,
        tmp_path,
        "--config.data.dir=",
        "--config.data.name=",
        "--config.data.builtin=true",
        "--config.device_memory_gib=0.001",
        "--config.model.depth=1",
        "--config.model.remat=full",  # one device, strongest remat: one candidate to compile
        devices=1,
        check=False,
    )
    assert result.returncode == 4, result.stderr[-3000:]
    assert "needs" in result.stderr and "config.device_memory_gib" in result.stderr
    assert "--config.batch_size=8 (8 images per device): " in result.stderr, result.stderr
    assert "MiB (fits)" in result.stderr or "MiB (over)" in result.stderr
    assert not (tmp_path / "builtin").exists() and not (tmp_path / "checkpoints").exists()


def test_nearest_layouts_of_the_memory_preflight():
    """The candidates the preflight compiles when a step is over: nearest first, bounded."""
    from raddino_jax.sweep import preflight

    cfg = tiny_run_config("/d", "x", batch_size=32, **{"model.remat": "none"})
    assert preflight.nearest_layouts(cfg, (4, 1, 1)) == [
        ("--config.model.remat=dots", (4, 1, 1), 32, "dots"),
        ("--config.batch_size=16 (4 images per device)", (4, 1, 1), 16, "none"),
        ("--config.mesh.data=1 --config.mesh.fsdp=4", (1, 4, 1), 32, "none"),
        ("all of the above", (1, 4, 1), 16, "full"),
    ]
    cfg.model.remat = "full"
    assert [c[0] for c in preflight.nearest_layouts(cfg, (1, 1, 1))] == [
        "--config.batch_size=16 (16 images per device)"
    ]


def test_empty_data_dir_is_an_error_naming_the_keys(tmp_path):
    """The command of a new user who gave no dataset: an error naming data.dir and
    data.builtin, before anything is built or compiled."""
    result = subprocess.run(
        [sys.executable, "-m", "raddino_jax.main", "--config=configs/vitb14.py"]
        + [f"--workdir={tmp_path}"],
        env=_env(("", "")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "config.data.dir" in result.stderr and "data.builtin=True" in result.stderr
    assert not (tmp_path / "builtin").exists()

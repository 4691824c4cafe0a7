"""The README's experiment commands (mixtures, scaling, stages, Gram) as a user runs them: each
exact command line parsed and validated, the same shapes end to end on the tiny model, and
the defects found in them (issue 21) pinned down."""

import csv
import json
import pathlib
import shlex

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from raddino_jax import config as config_lib
from raddino_jax import scaling
from raddino_jax.data import sources
from raddino_jax.eval import hook
from raddino_jax.ssl.schedules import lr_peak
from raddino_jax.train import build as build_lib
from raddino_jax.train import loop
from raddino_jax.train import stages as stages_lib
from raddino_jax.train import state as state_lib
from raddino_jax.train.metrics import read_metrics
from tests.tiny import tiny_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
README_PLACEHOLDER_DATA = "gs://B/tfds"
RENAMED_LABELS = {"nodule": "Nodule", "effusion": "Effusion"}  # the README's label names


def _build(root: pathlib.Path, name: str, seed: int) -> None:
    """A tiny dataset NAME under root/tfds from the built-in samples of `seed`, with the
    README's label columns (Nodule, Effusion)."""
    from data_prep.build import BuildOptions, build_dataset
    from data_prep.samples import generate_samples

    samples = root / f"samples_{name}"
    generate_samples(samples, n_phantoms=16, size=64, seed=seed)
    with open(samples / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    header = [RENAMED_LABELS.get(k, k) for k in rows[0]]
    with open(samples / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(row.values() for row in rows)
    build_dataset(
        BuildOptions(
            input=str(samples / "labels.csv"),
            output=str(root / "tfds"),
            name=name,
            size=64,
            workers=1,
        )
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> pathlib.Path:
    """root/tfds with two distinct datasets (cxr_a, cxr_b: different phantoms) and the
    README's names pointing at them: cxr, mimic, cxr_eval -> cxr_a; chexpert, nih -> cxr_b."""
    root = tmp_path_factory.mktemp("experiments")
    _build(root, "cxr_a", seed=0)
    _build(root, "cxr_b", seed=1)
    tfds_dir = root / "tfds"
    for alias, target in (("cxr", "cxr_a"), ("mimic", "cxr_a"), ("cxr_eval", "cxr_a")):
        (tfds_dir / alias).symlink_to(tfds_dir / target, target_is_directory=True)
    for alias in ("chexpert", "nih"):
        (tfds_dir / alias).symlink_to(tfds_dir / "cxr_b", target_is_directory=True)
    return tfds_dir


def readme_commands() -> list[list[str]]:
    """The command lines of the README's experiments section, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The paper's experiments as commands", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current:
            commands.append(shlex.split(current))
        current = ""
    return commands


def _localise(argv: list[str], data: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    """The README's placeholders pointed at local paths; everything else as written."""
    out = [arg.replace(README_PLACEHOLDER_DATA, str(data)) for arg in argv]
    return [f"--workdir={workdir}" if arg == "--workdir=DIR" else arg for arg in out]


def parse_main(argv: list[str]):
    """`python -m raddino_jax.main ARGS`'s config, parsed by the same absl config flag."""
    argv = ["raddino_jax.main", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=values, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "run directory", flag_values=values)
    values(argv)
    return values.config


def test_readme_experiment_commands_parse_and_validate_as_written(data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    commands = readme_commands()
    assert [c[:3] for c in commands] == [
        ["python", "-m", "raddino_jax.main"],
        ["python", "-m", "raddino_jax.scaling"],
        ["python", "-m", "raddino_jax.scaling"],
        ["python", "-m", "raddino_jax.main"],
        ["python", "-m", "raddino_jax.main"],
    ]
    configs = []
    for i, command in enumerate(commands):
        argv = _localise(command[3:], data, tmp_path / f"run{i}")
        if command[2] == "raddino_jax.main":
            config = parse_main(argv)
            # the checks the loop runs before it builds or compiles anything
            config_lib.validate(config, n_devices=8, process_count=1)
            configs.append(config)
        else:
            sweep = scaling.plan(*scaling.parse_args(argv))
            configs.append(sweep)
    mixture, fractions, mixtures, staged, gram = configs

    assert [s[0] for s in mixture.data.sources] == ["mimic", "chexpert", "nih"]

    assert [name for name, _, _ in fractions.runs] == [
        "fraction_0.1",
        "fraction_0.25",
        "fraction_0.5",
        "fraction_1",
    ]
    for _, _, config in fractions.runs:  # vitb14's 100k-step schedules scaled to 12,500 steps
        assert config.total_steps == 12_500
        assert config.optim.warmup_steps == 1_250
        assert config.optim.freeze_last_layer_steps == 156
        assert config.teacher.warmup_temperature_steps == 1_250
    assert fractions.schedule_changes["optim.warmup_steps"] == (10_000, 1_250)
    assert [name for name, _, _ in mixtures.runs] == ["all", "without_mimic", "without_nih"]

    table = stages_lib.stage_table(staged)
    assert [(s.start_step, s.end_step, s.global_size, s.batch_size) for s in table] == [
        (0, 90_000, 224, 2560),
        (90_000, 100_000, 518, 2560),
    ]
    assert build_lib.model_spec(table[1].config).backbone.img_size == 518  # DINOv2's weights

    objective = build_lib.objective_config(gram, 8)
    assert objective.gram_enabled and objective.gram_start_step < gram.total_steps


@pytest.mark.parametrize(
    "overrides, keys",
    [
        # the README's earlier stage example: it starts where vitb14's run ends
        (("--config.stages=((100000,518,98,256),)",), ("config.stages[0]", "total_steps=100000")),
        # the README's earlier Gram example: it would never turn on, yet fill every checkpoint
        (
            ("--config.ssl.gram_weight=2.0", "--config.ssl.gram_start_step=100000"),
            ("config.ssl.gram_start_step", "total_steps=100000"),
        ),
    ],
)
def test_earlier_readme_commands_are_refused_before_anything_is_built(
    tmp_path, monkeypatch, overrides, keys
):
    monkeypatch.chdir(REPO)
    # data.builtin: the data is fine (no data.dir is refused on its own, naming data.dir)
    config = parse_main(
        ["--config=configs/vitb14.py", f"--workdir={tmp_path}", "--config.data.builtin=True",
         *overrides]
    )  # fmt: skip
    with pytest.raises(config_lib.ConfigError) as err:
        loop.train(config, str(tmp_path))
    for key in keys:
        assert key in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


def test_scale_to_steps_scales_every_step_schedule(monkeypatch):
    """A short scaling run trains its last layer and finishes its warm-ups: every
    step-denominated schedule follows the run length, not only the lr warm-up."""
    monkeypatch.chdir(REPO)
    base = parse_main(
        [
            "--config=configs/vitb14.py",
            "--workdir=unused",
            "--config.ssl.gram_weight=2.0",
            "--config.ssl.gram_start_step=50000",
            "--config.ssl.gram_update_every=10000",
            "--config.data.global_size=224",
            "--config.stages=((90000,518,98,2560),)",
            "--config.data.builtin=True",  # any data: the schedules are what is checked
        ]
    )
    steps = 1000
    (_, _, config), *_ = scaling.run_configs(base, [1.0], steps, mixtures=False)
    schedules = build_lib.schedules(config)
    assert float(schedules.last_layer_lr(steps - 1)) > 0  # the last layer trains
    peak = lr_peak(config.optim.base_lr, config.batch_size)
    assert float(schedules.lr(config.optim.warmup_steps - 1)) == pytest.approx(peak)
    assert float(schedules.teacher_temperature(steps // 10)) == pytest.approx(0.07)
    ratio = steps / base.total_steps
    for key in stages_lib.STEP_SCHEDULE_KEYS:
        section, name = key.split(".")
        old = base[section][name]
        assert config[section][name] == (max(1, round(old * ratio)) if old else 0), key
    assert config.stages == ((900, 518, 98, 2560),)
    assert (config.ssl.gram_start_step, config.ssl.gram_update_every) == (500, 100)
    config_lib.validate(config, n_devices=8, process_count=1)

    shortened, changes = stages_lib.scale_to_steps(base, steps)
    assert stages_lib.describe_changes(changes).startswith("total_steps 100000 -> 1000")
    assert changes["optim.freeze_last_layer_steps"] == (1250, 12)
    assert shortened.ssl.gram_start_step == 500
    unchanged, none = stages_lib.scale_to_steps(base, base.total_steps)
    assert none == {} and unchanged.to_dict() == base.to_dict()
    off = stages_lib.scale_to_steps(config_lib.base_config(), 10)[0]
    assert off.ssl.gram_start_step == 0  # 0 (off / from the start) stays 0


def _fake_evaluation(*args, **kwargs) -> dict:
    return {"models": {"checkpoint": {"knn": {"x": {"k20": {"accuracy": 0.5}}}}, "random_init": {}}}


def test_scaling_counts_stage_images_and_reuses_only_the_same_run(data, tmp_path, monkeypatch):
    """images_seen follows the stages' batches; a finished run is reused only for the same
    steps, data and stages, and reports its own record."""
    from raddino_jax import evaluate

    trained = []
    monkeypatch.setattr(loop, "train", lambda config, workdir, **kw: trained.append(workdir))
    monkeypatch.setattr(evaluate, "run_evaluation", _fake_evaluation)
    config = tiny_run_config(str(data), "cxr_a", stages=((3, 84, 28, 32),))
    args = ("run", 1.0)
    kwargs = dict(eval_data="", labels=["x"], tasks=["knn"], max_examples=None, n_resamples=10)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = scaling.run_one(*args, config, run_dir, **kwargs)
    assert record["images_seen"] == 3 * 16 + 3 * 32
    assert record["steps"] == 6 and record["stages"] == [[3, 84, 28, 32]]
    assert scaling.run_one(*args, config, run_dir, **kwargs) == record  # the same run: reused
    assert len(trained) == 1
    for change in ({"total_steps": 8}, {"stages": ((4, 84, 28, 32),)}, {"data.name": "cxr_b"}):
        other = tiny_run_config(str(data), "cxr_a", stages=((3, 84, 28, 32),))
        for key, value in change.items():
            node, *path = other, *key.split(".")
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        with pytest.raises(ValueError, match="finished run of a different command"):
            scaling.run_one(*args, other, run_dir, **kwargs)
    assert len(trained) == 1


def test_patient_subset_reads_only_the_patient_ids(data, monkeypatch):
    """The subset scan takes patient_id / path out of the raw records: no record goes through
    the full tfds deserialisation (image bytes included), and the subset is the one the
    decoded records give."""
    from tensorflow_datasets.core.data_sources import base

    source = sources.open_training_split(str(data), "cxr_a", "train")
    expected = [
        i for i in range(len(source)) if sources.patient_rank(sources.subset_key(source[i])) < 0.5
    ]
    decoded = []
    real_getitem = base.BaseDataSource.__getitem__
    monkeypatch.setattr(
        base.BaseDataSource,
        "__getitem__",
        lambda self, key: decoded.append(key) or real_getitem(self, key),
    )
    subset = sources.patient_subset(source, 0.5)
    assert subset.indices.tolist() == expected and 0 < len(expected) < len(source)
    assert decoded == []


def test_periodic_knn_without_the_label_fails_at_startup(data, tmp_path, monkeypatch):
    """A mixture whose sources lack eval.label (or an eval.data without it) is refused before
    the train state is built, naming the key."""

    def no_state(*args, **kwargs):
        raise AssertionError("the train state was built before the eval label was checked")

    monkeypatch.setattr(state_lib, "create_state", no_state)
    mixture = {
        "data.dir": "",
        "data.name": "",
        "data.sources": (("mimic", str(data), 1.0), ("nih", str(data), 1.0)),
        "eval.every": 2,
    }
    for overrides, key in (
        ({"eval.label": "Pneumothorax"}, "config.eval.label"),
        ({"eval.label": "Effusion", "eval.data": f"{data}/absent"}, "config.eval.data"),
        ({"eval.label": "Effusion", "eval.eval_split": "holdout"}, "config.eval.label"),
    ):
        config = tiny_run_config(str(data), "x", **mixture, **overrides)
        with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
            loop.train(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    chosen = hook.eval_datasets(
        tiny_run_config(str(data), "x", **mixture, **{"eval.label": "Effusion"}),
        [("mimic", str(data), "mimic"), ("nih", str(data), "nih")],
    )
    assert [name for name, _, _ in chosen] == ["mimic", "nih"]


@pytest.mark.slow
def test_two_distinct_sources_with_workers_stages_and_per_source_knn(data, tmp_path, monkeypatch):
    """A mixture of two distinct datasets read by a Grain worker process, 56 px then 84 px
    globals with twice the batch from step 3, periodic kNN on each source: stage 2's batches
    have the new crop sizes, batch and masked-token buffer, and kNN runs per source at the
    current stage's size, which the metrics record."""
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (main parses them)
        flags.FLAGS.mark_as_parsed()
    batches = []
    real_compile = build_lib.compile_train_step

    def recording_compile(*args, **kwargs):
        step_fn = real_compile(*args, **kwargs)

        def step(state, batch, rng):
            batches.append(
                {
                    k: (v.shape, np.asarray(v) if k == "mask_valid" else None)
                    for k, v in batch.items()
                }
            )
            return step_fn(state, batch, rng)

        return step

    monkeypatch.setattr(build_lib, "compile_train_step", recording_compile)
    config = tiny_run_config(
        str(data),
        "x",
        **{
            "data.dir": "",
            "data.name": "",
            "data.sources": (("cxr_a", str(data), 1.0), ("cxr_b", str(data), 1.0)),
            "data.num_workers": 1,
            "stages": ((3, 84, 28, 32),),
            "total_steps": 4,
            "checkpoint_every": 4,
            "eval.every": 2,
            "eval.label": "Effusion",
            "eval.max_examples": 16,
        },
    )
    loop.train(config, str(tmp_path))
    shapes = [b["global_crops"][0] for b in batches]
    assert shapes == [(2, 16, 56, 56, 1)] * 3 + [(2, 32, 84, 84, 1)]
    assert batches[3]["local_crops"][0] == (2, 32, 28, 28, 1)
    assert batches[3]["masks"][0] == (2, 32, (84 // 14) ** 2)
    n_groups, upper = batches[3]["mask_indices"][0]
    assert n_groups == 32 // 2 and upper > batches[0]["mask_indices"][0][1]
    assert 0 < batches[3]["mask_valid"][1].sum() <= n_groups * upper

    records = read_metrics(tmp_path)
    knn = {r["step"]: r for r in records if "eval_image_size" in r}
    assert sorted(knn) == [2, 4]
    assert knn[2]["eval_image_size"] == 56 and knn[4]["eval_image_size"] == 84
    for record in knn.values():
        for source in ("cxr_a", "cxr_b"):
            assert 0.0 <= record[f"knn/top1_k10/{source}"] <= 1.0
    seen = {r["step"]: r for r in records if "images_seen" in r}
    assert seen[4]["images_seen/cxr_a"] + seen[4]["images_seen/cxr_b"] == 3 * 16 + 32
    assert seen[4]["images_seen/cxr_a"] > 0 and seen[4]["images_seen/cxr_b"] > 0


@pytest.mark.slow
def test_mixtures_sweep_end_to_end(data, tmp_path, monkeypatch, capsys):
    """`scaling --sources=A,B --mixtures`: the full mixture and each leave-one-out, trained,
    evaluated and tabulated; the scaled schedules are printed."""
    monkeypatch.setenv("RADDINO_TEST_DATA", f"{data}/cxr_a")
    out = tmp_path / "sweep"
    argv = [
        "--config=tests/tiny_config.py",
        f"--sources={data}/mimic,{data}/nih",
        "--mixtures",
        "--steps=3",
        f"--eval-data={data}/cxr_eval",
        "--label=Effusion",
        f"--workdir={out}",
        "--task=knn",
        "--bootstrap=20",
        "--config.checkpoint_every=3",
    ]
    monkeypatch.chdir(REPO)
    assert scaling.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 run(s) of 3 steps; step schedules scaled" in printed
    assert "total_steps 6 -> 3" in printed and "optim.warmup_steps 2 -> 1" in printed
    runs = json.loads((out / "scaling.json").read_text())["runs"]
    assert [r["run"] for r in runs] == ["all", "without_mimic", "without_nih"]
    sizes = {
        name: len(sources.open_training_split(str(data), name, "train"))
        for name in ("mimic", "nih")
    }
    assert [r["images"] for r in runs] == [
        sizes["mimic"] + sizes["nih"],
        sizes["nih"],
        sizes["mimic"],
    ]
    assert [[s[0] for s in r["sources"]] for r in runs] == [["mimic", "nih"], ["nih"], ["mimic"]]
    assert all(r["images_seen"] == 3 * 16 for r in runs)
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["run"] for r in table} == {"all", "without_mimic", "without_nih", "random_init"}
    for row in table:
        value, low, high = (float(row[k]) for k in ("value", "ci_low", "ci_high"))
        assert np.isfinite([value, low, high]).all() and low <= value <= high, row
    assert jax.device_count() == 8

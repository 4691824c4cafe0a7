"""Gram anchoring (DINOv3): the loss against a float64 NumPy reference, its gradient, the
objective's wiring, the Gram teacher's refresh inside the jitted step, and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from raddino_jax import checkpoint
from raddino_jax import config as config_lib
from raddino_jax.data import prefetch
from raddino_jax.data.layout import BATCH_KEYS
from raddino_jax.models import bind, init_params
from raddino_jax.parallel import sharding
from raddino_jax.parallel.mesh import make_mesh
from raddino_jax.ssl import gram
from raddino_jax.ssl.objective import ObjectiveConfig, _image_major, ssl_loss, to_input_channels
from raddino_jax.train import build as build_lib
from raddino_jax.train import state as train_state
from raddino_jax.train.step import compile_train_step, refresh_gram_teacher
from tests.tiny import set_dotted, tiny_dataset, tiny_optimizer, tiny_spec


def gram_loss_reference(student: np.ndarray, teacher: np.ndarray) -> float:
    """float64 transcription of dinov3/loss/gram_loss.py (apply_norm, img_level, no negative
    removal): F.normalize(x, dim=-1) (eps 1e-12), per-image X X^T, MSELoss (mean)."""

    def normalize(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    s, t = normalize(student), normalize(teacher)
    s_gram = s @ s.transpose(0, 2, 1)
    t_gram = t @ t.transpose(0, 2, 1)
    return float(np.mean((s_gram - t_gram) ** 2))


def _features(seed: int, shape=(3, 7, 5)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.1, 10.0, size=shape[:-1] + (1,))
    return x.astype(np.float32)


def test_gram_loss_matches_float64_reference():
    student, teacher = _features(0), _features(1)
    student[1, 2] = 0.0  # a zero patch: normalised by eps, as torch does (a zero row of S)
    got = float(jax.jit(gram.gram_loss)(student, teacher))
    want = gram_loss_reference(student, teacher)
    assert want > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Mean over B * N * N: independent of the batch size (two copies of the batch, same loss).
    doubled = gram.gram_loss(np.concatenate([student] * 2), np.concatenate([teacher] * 2))
    np.testing.assert_allclose(float(doubled), got, rtol=1e-6)
    # Scale-invariant per patch, and zero against itself.
    np.testing.assert_allclose(float(gram.gram_loss(3.0 * student, teacher)), got, rtol=1e-5)
    assert float(gram.gram_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-12)
    # bfloat16 features (the compute dtype on accelerators) are promoted to float32 first.
    bf16 = jnp.asarray(student, jnp.bfloat16)
    want_bf16 = gram_loss_reference(np.asarray(bf16.astype(jnp.float32)), teacher)
    np.testing.assert_allclose(float(gram.gram_loss(bf16, teacher)), want_bf16, rtol=1e-5)


def test_gram_loss_gradient_matches_finite_differences_of_the_reference():
    student, teacher = _features(2, (2, 5, 4)), _features(3, (2, 5, 4))
    grad_student, grad_teacher = jax.grad(gram.gram_loss, argnums=(0, 1))(student, teacher)
    np.testing.assert_array_equal(np.asarray(grad_teacher), 0.0)  # the target is a constant
    h = 1e-6
    x = student.astype(np.float64)
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (
            gram_loss_reference(plus, teacher) - gram_loss_reference(minus, teacher)
        ) / (2 * h)
    scale = np.abs(numeric).max()
    np.testing.assert_allclose(np.asarray(grad_student), numeric, rtol=1e-4, atol=1e-5 * scale)


def test_refresh_steps():
    steps = jnp.arange(12)
    every3 = np.asarray(gram.is_refresh_step(steps, 2, 3))
    assert np.flatnonzero(every3).tolist() == [2, 5, 8, 11]
    frozen = np.asarray(gram.is_refresh_step(steps, 4, 0))
    assert np.flatnonzero(frozen).tolist() == [4]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"ssl.gram_weight": -1.0}, "config.ssl.gram_weight"),
        ({"ssl.gram_start_step": -1}, "config.ssl.gram_start_step"),
        ({"ssl.gram_update_every": -5}, "config.ssl.gram_update_every"),
        ({"ssl.gram_teacher": "student"}, "config.ssl.gram_teacher"),
        ({"ssl.gram_teacher": "initial", "ssl.gram_update_every": 10}, "config.ssl.gram_teacher"),
    ],
)
def test_gram_config_errors_name_the_key(overrides, key):
    c = config_lib.base_config()
    assert c.ssl.gram_weight == 0.0  # off by default
    set_dotted(c, overrides)
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        build_lib.objective_config(c, n_devices=1)


@pytest.fixture(scope="module")
def host_batches():
    iterator = iter(tiny_dataset())
    return [next(iterator) for _ in range(6)]


def test_objective_adds_weighted_gram_of_masked_student_and_gram_teacher(host_batches):
    """The Gram term uses the student's normed patch tokens of the masked globals and the Gram
    teacher's of the unmasked globals (dinov3 ssl_meta_arch), weighted into the total."""
    spec = tiny_spec()
    student, teacher = init_params(spec, 0), init_params(spec, 1)
    gram_teacher = {"backbone": init_params(spec, 2)["backbone"]}
    batch = {k: jnp.asarray(host_batches[0][k]) for k in BATCH_KEYS}
    center = jnp.zeros((spec.dino_head.out_dim,), jnp.float32)
    key = jax.random.key(0)

    def make_loss(cfg):
        return jax.jit(
            lambda s, t, g, b, a: ssl_loss(
                s, t, center, center, b, key, 0.04, g, a, spec=spec, cfg=cfg
            )
        )

    losses = {w: make_loss(ObjectiveConfig(koleo_group_size=2, gram_weight=w)) for w in (0.0, 2.0)}
    results = {
        name: losses[weight](student, teacher, gram_teacher, batch, active)
        for name, weight, active in (("off", 0.0, False), ("before", 2.0, False), ("on", 2.0, True))
    }
    total_off, aux_off = results["off"]
    assert "gram_loss" not in aux_off
    total_before, aux_before = results["before"]
    assert float(aux_before["gram_loss"]) == 0.0 and float(total_before) == float(total_off)
    total_on, aux_on = results["on"]

    def patch_tokens(params, masks):
        model = bind(spec, params)
        crops = _image_major(to_input_channels(batch["global_crops"], spec.backbone.in_chans))
        return model.backbone(crops, masks)["x_norm_patchtokens"]

    masks = _image_major(batch["masks"])
    assert bool(masks.any())
    s_tokens = jax.jit(patch_tokens)(student, masks)
    t_tokens = jax.jit(lambda p: patch_tokens({**student, **p}, None))(gram_teacher)
    want = gram_loss_reference(np.asarray(s_tokens), np.asarray(t_tokens))
    np.testing.assert_allclose(float(aux_on["gram_loss"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total_on), float(total_off) + 2.0 * want, rtol=1e-5)


def _tree_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _run_steps(objective: ObjectiveConfig, host_batches, layout=(2, 4, 1)):
    """Run the compiled step over the batches; returns (state, per-step records of the teacher
    backbone before the step, the Gram teacher after it, and the metrics), step fn."""
    spec = tiny_spec()
    optimizer, schedules = tiny_optimizer(spec)
    mesh = make_mesh(layout, jax.devices()[: int(np.prod(layout))])
    state = train_state.create_state(spec, optimizer, mesh, seed=0, gram=True)
    _, shardings = train_state.abstract_state(spec, optimizer, mesh, gram=True)
    step = compile_train_step(
        mesh,
        shardings,
        BATCH_KEYS,
        spec=spec,
        objective=objective,
        optimizer=optimizer,
        schedules=schedules,
        pixel_stats=(0.5, 0.25),  # the tiny batches are float32: the step leaves them as given
    )
    records = []
    initial = jax.device_get(state.student["backbone"])
    for host in host_batches:
        batch = prefetch.to_global_batch(host, sharding.batch_shardings(host.keys(), mesh))
        teacher_before = jax.device_get(state.teacher["backbone"])  # the state is donated
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(0), state.step))
        records.append(
            (
                teacher_before,
                jax.device_get(state.gram_teacher["backbone"]),
                jax.device_get(metrics),
            )
        )
    return state, records, initial, step


def test_step_refreshes_ema_gram_teacher_and_adds_the_term_from_the_start_step(host_batches):
    """start 2, refresh every 3: the Gram teacher is the EMA teacher as it was before steps 2 and
    5, frozen in between; the total is DINO + iBOT + KoLeo + w * Gram from step 2 on; one
    compile; the Gram teacher is sharded like the backbone."""
    objective = ObjectiveConfig(
        koleo_group_size=2, gram_weight=2.0, gram_start_step=2, gram_update_every=3
    )
    state, records, initial, step = _run_steps(objective, host_batches)
    assert step._cache_size() == 1 and int(state.step) == 6
    qkv = ("backbone", "blocks", 0, "attn", "qkv", "kernel")
    gram_qkv, student_qkv = state.gram_teacher, state.student
    for key in qkv:
        gram_qkv, student_qkv = gram_qkv[key], student_qkv[key]
    assert (
        gram_qkv.sharding.spec
        == student_qkv.sharding.spec
        == jax.sharding.PartitionSpec(None, "fsdp")
    )

    teacher_before = [r[0] for r in records]
    gram_after = [r[1] for r in records]
    metrics = [r[2] for r in records]
    assert _tree_equal(gram_after[0], initial) and _tree_equal(gram_after[1], initial)
    assert _tree_equal(gram_after[2], teacher_before[2])  # refreshed at the start step
    assert not _tree_equal(teacher_before[2], initial)
    assert _tree_equal(gram_after[3], gram_after[2]) and _tree_equal(gram_after[4], gram_after[2])
    assert _tree_equal(gram_after[5], teacher_before[5])  # and again 3 steps later
    assert not _tree_equal(gram_after[5], gram_after[2])
    for i, m in enumerate(metrics):
        base = m["dino_loss"] + m["ibot_loss"] + 0.1 * m["koleo_loss"]
        if i < 2:
            assert m["gram_loss"] == 0.0
            np.testing.assert_allclose(m["loss"], base, rtol=1e-6)
        else:
            assert m["gram_loss"] > 0.0
            np.testing.assert_allclose(m["loss"], base + 2.0 * m["gram_loss"], rtol=1e-6)


def test_refresh_rule_of_each_gram_teacher():
    """ "ema" copies the teacher's backbone on refresh steps only; "initial" never changes."""
    spec = tiny_spec()
    optimizer, _ = tiny_optimizer(spec)
    state = train_state.new_state(init_params(spec, 0), optimizer, spec, gram=True)
    moved = jax.tree.map(lambda x: x + 1.0, state.teacher)
    ema = ObjectiveConfig(gram_weight=1.0, gram_start_step=4, gram_update_every=2)
    initial = ObjectiveConfig(gram_weight=1.0, gram_teacher="initial")
    refresh = jax.jit(refresh_gram_teacher, static_argnums=1)
    for step, copied in ((3, False), (4, True), (5, False), (6, True)):
        at = state.replace(step=jnp.asarray(step, jnp.int32), teacher=moved)
        want = {"backbone": moved["backbone"]} if copied else state.gram_teacher
        assert _tree_equal(refresh(at, ema), want), step
        assert _tree_equal(refresh(at, initial), state.gram_teacher), step
    off = ObjectiveConfig()
    assert refresh_gram_teacher(state.replace(gram_teacher=None), off) is None


def test_checkpoint_saves_and_restores_the_gram_teacher(tmp_path):
    spec = tiny_spec()
    optimizer, _ = tiny_optimizer(spec)
    mesh = make_mesh((8, 1, 1))
    iterator = iter(tiny_dataset())
    next(iterator)
    with_gram = train_state.create_state(spec, optimizer, mesh, seed=0, gram=True)
    marked = jax.tree.map(lambda x: x + 1.0, with_gram.gram_teacher)
    with_gram = with_gram.replace(step=jnp.asarray(3, jnp.int32), gram_teacher=marked)
    without = train_state.create_state(spec, optimizer, mesh, seed=0)
    assert len(jax.tree.leaves(with_gram)) > len(jax.tree.leaves(without))
    abstract_gram, _ = train_state.abstract_state(spec, optimizer, mesh, gram=True)
    abstract_plain, _ = train_state.abstract_state(spec, optimizer, mesh)

    saver = checkpoint.TrainCheckpointer(tmp_path / "gram", 3, async_save=False)
    saver.save(with_gram, iterator)
    assert saver.has_gram_teacher(3)
    restored = saver.restore(3, abstract_gram, iterator)
    assert _tree_equal(restored.gram_teacher, marked)
    assert restored.gram_teacher["backbone"]["pos_embed"].sharding.is_equivalent_to(
        abstract_gram.gram_teacher["backbone"]["pos_embed"].sharding, 3
    )
    # Gram off now: the stored Gram teacher is ignored and the state has its old leaves.
    plain = saver.restore(3, abstract_plain, iterator)
    assert plain.gram_teacher is None
    assert jax.tree.structure(plain) == jax.tree.structure(without)
    saver.close()

    # A checkpoint written with Gram off: refused, unless the first refresh is still ahead.
    old = checkpoint.TrainCheckpointer(tmp_path / "old", 3, async_save=False)
    old.save(without.replace(step=jnp.asarray(3, jnp.int32)), iterator)
    assert not old.has_gram_teacher(3)
    with pytest.raises(checkpoint.RestoreError, match=r"gram_start_step >= 3"):
        old.restore(3, abstract_gram, iterator)
    resumed = old.restore(3, abstract_gram, iterator, gram_teacher_from_teacher=True)
    assert _tree_equal(resumed.gram_teacher["backbone"], resumed.teacher["backbone"])
    old.close()

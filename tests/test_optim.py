"""Tests for raddino_jax.train.optim: per-parameter rules, clipping, AdamW math vs torch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from raddino_jax.train import optim

D, K, HIDDEN, BOTTLENECK, N_BLOCKS, GRID, REGISTERS = 8, 16, 12, 6, 2, 2, 2
DECAY = 0.9


def make_params(seed: int = 0, *, ibot_head: bool = False, swiglu: bool = False) -> dict:
    """A tiny student tree following the lead's path contract (2 blocks, D=8, K=16)."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    def dense(n_in, n_out):
        return {"kernel": arr(n_in, n_out), "bias": arr(n_out)}

    def norm():
        return {"scale": arr(D), "bias": arr(D)}

    def block():
        mlp = (
            {"w12": dense(D, 2 * HIDDEN), "w3": dense(HIDDEN, D)}
            if swiglu
            else {"fc1": dense(D, HIDDEN), "fc2": dense(HIDDEN, D)}
        )
        return {
            "norm1": norm(),
            "attn": {"qkv": dense(D, 3 * D), "proj": dense(D, D)},
            "ls1": {"gamma": arr(D)},
            "norm2": norm(),
            "mlp": mlp,
            "ls2": {"gamma": arr(D)},
        }

    def head():
        return {
            "mlp": {
                "0": dense(D, HIDDEN),
                "1": dense(HIDDEN, HIDDEN),
                "2": dense(HIDDEN, BOTTLENECK),
            },
            "last_layer": {"weight_v": arr(BOTTLENECK, K), "weight_g": arr(K)},
        }

    params = {
        "backbone": {
            "cls_token": arr(1, 1, D),
            "pos_embed": arr(1, 1 + GRID * GRID, D),
            "mask_token": arr(1, D),
            "register_tokens": arr(1, REGISTERS, D),
            "patch_embed": {"proj": {"kernel": arr(14, 14, 3, D), "bias": arr(D)}},
            "blocks": {str(i): block() for i in range(N_BLOCKS)},
            "norm": norm(),
        },
        "dino_head": head(),
    }
    if ibot_head:
        params["ibot_head"] = head()
    return params


def random_grads(params: dict, seed: int, scale: float = 1.0) -> dict:
    """Gradients with the structure of params: random sign, |g| in [0.5, 1.5] * scale.

    Bounded away from 0 so that even after clipping |g| >> Adam's eps, which makes
    mhat / (sqrt(vhat) + eps) equal sign(g) to ~1e-6 at the first step.
    """
    rng = np.random.default_rng(seed)

    def draw(p):
        values = rng.choice([-1.0, 1.0], size=p.shape) * rng.uniform(0.5, 1.5, size=p.shape)
        return jnp.asarray((scale * values).astype(np.float32))

    return jax.tree.map(draw, params)


def flat(tree) -> dict:
    """{path: leaf} for easy lookup."""
    return dict(zip(jax.tree.leaves(optim.param_paths(tree)), jax.tree.leaves(tree), strict=True))


def expected_lr_mult(path: str) -> float:
    """Recipe s4 lr multiplier written out by hand for the tiny tree (not via the regexes)."""
    embed = ("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed")
    if path.startswith("backbone/") and path.split("/")[1] in embed:
        mult = DECAY ** (N_BLOCKS + 1)
        return mult * 0.2 if "patch_embed" in path else mult
    if path.startswith("backbone/blocks/"):
        block = int(path.split("/")[2])
        return DECAY ** (N_BLOCKS - block)
    return 1.0


def expected_wd_mult(path: str) -> float:
    """Recipe s4 decay exemptions by hand: bias / norm / gamma leaves are exempt."""
    leaf = path.split("/")[-1]
    parents = path.split("/")[:-1]
    exempt = leaf in ("bias", "gamma") or any(p in ("norm", "norm1", "norm2") for p in parents)
    return 0.0 if exempt else 1.0


def build(params, cfg=None, lr=1e-2, last_lr=None, wd=0.0):
    """Optimizer with constant (or given) schedules; returns (tx, schedules kwargs)."""
    schedules = {
        "lr_schedule": optax.constant_schedule(lr) if not callable(lr) else lr,
        "last_layer_lr_schedule": (
            optax.constant_schedule(lr if last_lr is None else last_lr)
            if not callable(last_lr)
            else last_lr
        ),
        "wd_schedule": optax.constant_schedule(wd) if not callable(wd) else wd,
    }
    return optim.build_optimizer(params, cfg or optim.OptimizerConfig(), **schedules), schedules


def init_state(tx, params):
    """tx.init under jit (eager init compiles one tiny program per leaf shape: slow)."""
    return jax.jit(tx.init)(params)


def jitted_step(tx):
    """One jitted (params, state, grads) -> (params, state, updates) step."""

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


# --------------------------------------------------------------------------- rules as data


def test_param_paths_handles_dict_sequence_and_attr_keys():
    tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(2)}], "c": optax.ScaleByAdamState(1, 2, 3)}
    paths = optim.param_paths(tree)
    assert paths["a"][0] == "a/0"
    assert paths["a"][1]["b"] == "a/1/b"
    assert paths["c"].count == "c/count"
    assert paths["c"].mu == "c/mu"


def test_multipliers_reproduce_recipe_s4():
    params = make_params()
    lr_mult, wd_mult, last_layer = (
        flat(t) for t in optim.param_multipliers(params, optim.OptimizerConfig())
    )
    for path in flat(params):
        assert lr_mult[path] == pytest.approx(expected_lr_mult(path), rel=1e-12), path
        assert wd_mult[path] == expected_wd_mult(path), path
        assert last_layer[path] == ("last_layer" in path), path
    # Spot values named in the recipe.
    assert lr_mult["backbone/pos_embed"] == pytest.approx(0.729)
    assert lr_mult["backbone/patch_embed/proj/kernel"] == pytest.approx(0.729 * 0.2)
    assert lr_mult["backbone/blocks/0/attn/qkv/kernel"] == pytest.approx(0.81)
    assert lr_mult["backbone/blocks/1/ls2/gamma"] == pytest.approx(0.9)
    assert lr_mult["backbone/norm/scale"] == 1.0 and lr_mult["dino_head/mlp/0/kernel"] == 1.0
    for decayed in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert wd_mult[f"backbone/{decayed}"] == 1.0
    assert wd_mult["dino_head/last_layer/weight_g"] == 1.0
    assert wd_mult["backbone/blocks/0/ls1/gamma"] == 0.0
    assert wd_mult["backbone/norm/scale"] == 0.0
    # Leaves are static Python values.
    assert all(type(v) is float for v in lr_mult.values())
    assert all(type(v) is bool for v in last_layer.values())


def test_swiglu_and_separate_ibot_head_paths():
    params = make_params(ibot_head=True, swiglu=True)
    lr_mult, wd_mult, last_layer = (
        flat(t) for t in optim.param_multipliers(params, optim.OptimizerConfig())
    )
    assert lr_mult["backbone/blocks/0/mlp/w12/kernel"] == pytest.approx(0.81)
    assert wd_mult["backbone/blocks/1/mlp/w3/bias"] == 0.0
    assert lr_mult["ibot_head/mlp/2/kernel"] == 1.0
    assert (
        last_layer["ibot_head/last_layer/weight_v"] and last_layer["ibot_head/last_layer/weight_g"]
    )


def test_n_blocks_inference_and_validation():
    params = make_params()
    assert optim.infer_n_blocks(params) == N_BLOCKS
    explicit = flat(optim.param_multipliers(params, optim.OptimizerConfig(n_blocks=4))[0])
    assert explicit["backbone/blocks/1/attn/proj/bias"] == pytest.approx(DECAY**3)
    with pytest.raises(ValueError, match="n_blocks"):
        optim.param_multipliers(params, optim.OptimizerConfig(n_blocks=1))
    with pytest.raises(ValueError, match="invalid regex"):
        optim.OptimizerConfig(wd_mult_rules=(("(", 0.0),))
    with pytest.raises(ValueError, match="submodules"):
        build({"backbone": params["backbone"], "center": jnp.zeros(3)})


def test_custom_rules_first_match_wins_and_unmatched_reported():
    cfg = optim.OptimizerConfig(
        lr_mult_rules=((r"^dino_head/mlp/0/", 0.0), (r"^dino_head/", 0.5)),
        wd_mult_rules=((r"pos_embed", 0.0), (r"bias$", 0.0)),
        layerwise_decay=1.0,
    )
    params = make_params()
    lr_mult, wd_mult, _ = (flat(t) for t in optim.param_multipliers(params, cfg))
    assert lr_mult["dino_head/mlp/0/kernel"] == 0.0
    assert lr_mult["dino_head/mlp/1/kernel"] == 0.5
    assert lr_mult["backbone/patch_embed/proj/kernel"] == 1.0  # explicit rules replace defaults
    assert wd_mult["backbone/pos_embed"] == 0.0 and wd_mult["backbone/norm/scale"] == 1.0
    typo = dataclasses.replace(cfg, wd_mult_rules=((r"gama", 0.0),))
    assert optim.unmatched_rules(params, typo) == ["gama"]
    assert optim.unmatched_rules(params, optim.OptimizerConfig()) == []


# --------------------------------------------------------------------------- update math


def test_effective_lr_multiplier_at_first_step():
    """At Adam step 1 mhat/sqrt(vhat) = sign(g), so |update| = lr * multiplier exactly."""
    params = make_params()
    grads = random_grads(params, seed=1)
    lr = 1e-2
    tx, _ = build(params, lr=lr, wd=0.0)
    _, _, updates = jitted_step(tx)(params, init_state(tx, params), grads)
    for path, upd in flat(updates).items():
        upd, g = np.asarray(upd), np.asarray(flat(grads)[path])
        np.testing.assert_allclose(
            np.abs(upd), lr * expected_lr_mult(path), rtol=1e-5, err_msg=path
        )
        np.testing.assert_array_equal(np.sign(upd), -np.sign(g), err_msg=path)


def test_weight_decay_exemptions_are_exact():
    """Zero gradient, wd > 0: exempt leaves bit-identical, others shrink by lr*mult*wd*theta."""
    params = make_params()
    grads = jax.tree.map(jnp.zeros_like, params)
    lr, wd = 0.1, 0.05
    tx, _ = build(params, lr=lr, wd=wd)
    new_params, _, _ = jitted_step(tx)(params, init_state(tx, params), grads)
    for path, new in flat(new_params).items():
        old = np.asarray(flat(params)[path])
        if expected_wd_mult(path) == 0.0:
            np.testing.assert_array_equal(np.asarray(new), old, err_msg=path)
        else:
            expected = old.astype(np.float64) * (1.0 - lr * expected_lr_mult(path) * wd)
            np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-6, err_msg=path)
            assert not np.array_equal(np.asarray(new), old), path


def test_last_layer_frozen_then_moving():
    params = make_params()
    freeze_steps = 2
    last_lr = lambda step: jnp.where(step < freeze_steps, 0.0, 1e-2)  # noqa: E731
    tx, _ = build(params, lr=1e-2, last_lr=last_lr, wd=0.04)
    step = jitted_step(tx)
    state, current = init_state(tx, params), params
    for t in range(freeze_steps + 1):
        previous = current
        current, state, _ = step(current, state, random_grads(params, seed=10 + t))
        for path, new in flat(current).items():
            moved = not np.array_equal(np.asarray(new), np.asarray(flat(previous)[path]))
            if "last_layer" in path:
                assert moved == (t >= freeze_steps), (t, path)
            else:
                assert moved, (t, path)
        # Like torch with lr = 0, Adam's moments keep accumulating during the freeze.
        first_moment = np.asarray(state[1].mu["dino_head"]["last_layer"]["weight_v"])
        assert np.all(first_moment != 0.0)


def test_backbone_frozen_then_joins_under_its_own_warmup():
    """optim.freeze_backbone_steps: the backbone is bit-identical (no update, no decay, Adam
    moments untouched) for the phase while the heads train; then it joins with a fresh Adam
    (first step mhat / sqrt(vhat) = sign(g)) at lr * 1/W of the join warm-up."""
    params = make_params(seed=3, ibot_head=True)
    freeze, ramp, lr, wd = 2, 2, 1e-2, 0.04
    cfg = optim.OptimizerConfig(
        freeze_backbone_steps=freeze, join_warmup_steps=ramp, layerwise_decay=1.0
    )
    tx, _ = build(params, cfg, lr=lr, wd=wd)
    step = jitted_step(tx)
    state, current = init_state(tx, params), params
    initial = flat(params)
    for t in range(freeze + 2):
        previous = flat(current)
        grads = random_grads(params, seed=30 + t)
        current, state, _ = step(current, state, grads)
        for path, new in flat(current).items():
            moved = not np.array_equal(np.asarray(new), np.asarray(previous[path]))
            if path.startswith("backbone/"):
                assert moved == (t >= freeze), (t, path)
            else:
                assert moved, (t, path)  # every head leaf trains from the first update
        if t < freeze:
            for path, new in flat(current).items():
                if path.startswith("backbone/"):
                    np.testing.assert_array_equal(np.asarray(new), np.asarray(initial[path]))
        if t == freeze:  # the backbone's first update: fresh Adam, join factor 1 / ramp
            _, wd_mult, _ = optim.param_multipliers(params, cfg)
            wd_mults = flat(wd_mult)
            signs = flat(jax.tree.map(np.sign, grads))
            for path, new in flat(current).items():
                if not path.startswith("backbone/"):
                    continue
                theta = np.asarray(previous[path], np.float64)
                lr_m = 0.2 if "patch_embed" in path else 1.0
                expected = theta - lr * lr_m / ramp * (signs[path] + wd * wd_mults[path] * theta)
                np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-5, atol=1e-6)


def test_freeze_backbone_off_keeps_the_plain_chain():
    """freeze_backbone_steps = 0 (the default) builds the recipe's chain: same state layout
    (checkpoints stay loadable) and the same updates."""
    params = make_params(seed=4)
    plain, _ = build(params)
    assert optim.OptimizerConfig().freeze_backbone_steps == 0
    state = init_state(plain, params)
    assert isinstance(state[1], optax.ScaleByAdamState)
    with pytest.raises(ValueError, match="freeze_backbone_steps"):
        optim.OptimizerConfig(freeze_backbone_steps=-1)


# --------------------------------------------------------------------------- clipping


def numpy_norm(tree) -> float:
    """Global L2 norm in float64 numpy (reference for the JAX norms)."""
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


def test_clipping_is_per_submodule():
    params = make_params(ibot_head=True)
    clip = optim.clip_by_submodule_norm(3.0, ("backbone", "dino_head", "ibot_head"))
    grads = jax.device_get(random_grads(params, seed=4))
    target_norms = {"backbone": None, "dino_head": 0.5, "ibot_head": 10.0}
    for name, target in target_norms.items():
        factor = 1e4 if target is None else target / numpy_norm(grads[name])
        grads[name] = jax.tree.map(lambda g, f=factor: (g * f).astype(np.float32), grads[name])
    norms = {name: numpy_norm(subtree) for name, subtree in grads.items()}

    @jax.jit
    def clip_and_measure(g):
        clipped, _ = clip.update(g, clip.init(params))
        return clipped, optim.submodule_grad_norms(g), optim.submodule_grad_norms(clipped)

    clipped, pre_norms, post_norms = jax.device_get(clip_and_measure(grads))
    for name in grads:
        assert pre_norms[name] == pytest.approx(norms[name], rel=1e-5)
    # Small head gradient: untouched, bit for bit, despite the huge backbone gradient.
    for a, b in zip(
        jax.tree.leaves(clipped["dino_head"]), jax.tree.leaves(grads["dino_head"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # Large ones: scaled to 3 independently (torch's factor 3 / (norm + 1e-6)), direction kept.
    for name in ("backbone", "ibot_head"):
        assert post_norms[name] <= 3.0 * (1 + 1e-6)  # <= 3 up to float32 rounding, as in torch
        assert post_norms[name] == pytest.approx(3.0, rel=1e-5)
        factor = 3.0 / (norms[name] + 1e-6)
        for a, b in zip(jax.tree.leaves(clipped[name]), jax.tree.leaves(grads[name]), strict=True):
            np.testing.assert_allclose(a, np.asarray(b, np.float64) * factor, rtol=1e-5)
    # Absent submodule (no ibot_head) is skipped; unknown keys are an error. Shapes only.
    two = {"backbone": grads["backbone"], "dino_head": grads["dino_head"]}
    assert set(jax.eval_shape(lambda g: clip.update(g, None)[0], two)) == {"backbone", "dino_head"}
    with pytest.raises(ValueError, match="not in submodules"):
        jax.eval_shape(lambda g: clip.update(g, None), {"teacher": grads["backbone"]})


# --------------------------------------------------------------------------- reference: torch


def run_against_torch_adamw(dtype: np.dtype, steps: int = 5) -> dict[str, tuple]:
    """Full pipeline in JAX and in torch; returns {path: (initial, ours, torch's)} as numpy.

    Torch side: clip_grad_norm_ per submodule, then AdamW with one group per parameter whose
    lr / weight_decay are reset every step as dinov2's apply_optim_scheduler does:
    lr = (last_layer_lr or lr) * lr_mult, weight_decay = wd * wd_mult.
    """
    cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)  # noqa: E731
    params = cast(make_params(seed=5))
    cfg = optim.OptimizerConfig()
    lr_fn = lambda s: 2e-2 * (s + 1) / 4.0  # noqa: E731
    last_fn = lambda s: jnp.where(s < 2, 0.0, lr_fn(s))  # noqa: E731
    wd_fn = lambda s: 0.04 + 0.1 * s  # noqa: E731
    tx, _ = build(params, cfg, lr=lr_fn, last_lr=last_fn, wd=wd_fn)
    step = jitted_step(tx)
    lr_mult, wd_mult, last_layer = (flat(t) for t in optim.param_multipliers(params, cfg))

    initial = {p: np.asarray(v) for p, v in flat(params).items()}
    torch_params = {p: torch.nn.Parameter(torch.tensor(v.copy())) for p, v in initial.items()}
    groups = [{"params": [tp], "path": p} for p, tp in torch_params.items()]
    torch_opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    jax_params, state = params, init_state(tx, params)
    for t in range(steps):
        grads = cast(random_grads(params, seed=100 + t, scale=3.0))
        jax_params, state, _ = step(jax_params, state, grads)
        for p, g in flat(grads).items():
            torch_params[p].grad = torch.tensor(np.asarray(g))
        for sub in ("backbone", "dino_head"):
            sub_params = [tp for p, tp in torch_params.items() if p.startswith(sub + "/")]
            torch.nn.utils.clip_grad_norm_(sub_params, 3.0)
        for group in torch_opt.param_groups:
            path = group["path"]
            base_lr = float(last_fn(t)) if last_layer[path] else float(lr_fn(t))
            group["lr"] = base_lr * lr_mult[path]
            group["weight_decay"] = float(wd_fn(t)) * wd_mult[path]
        torch_opt.step()
    ours = flat(jax_params)
    return {
        p: (initial[p], np.asarray(ours[p]), tp.detach().numpy()) for p, tp in torch_params.items()
    }


def test_matches_torch_adamw_float64():
    """In float64 both implementations agree to 1e-6 relative on the displacement itself."""
    with jax.enable_x64(True):
        results = run_against_torch_adamw(np.float64)
    for path, (initial, ours, theirs) in results.items():
        assert ours.dtype == np.float64
        np.testing.assert_allclose(
            ours - initial, theirs - initial, rtol=1e-6, atol=1e-12, err_msg=path
        )
        if "last_layer" not in path:
            assert np.all(ours != initial), path


def test_matches_torch_adamw_float32():
    """In float32 the parameters agree to float32 rounding (Adam amplifies it where m ~ 0)."""
    for path, (initial, ours, theirs) in run_against_torch_adamw(np.float32).items():
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(
            ours - initial, theirs - initial, rtol=1e-3, atol=1e-6, err_msg=path
        )


# --------------------------------------------------------------------------- jit, sharding, resume


def test_jit_on_sharded_params_matches_single_device():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    params = make_params(seed=6)

    def sharding_for(leaf):
        axis = next((i for i, n in enumerate(leaf.shape) if n % 8 == 0), None)
        spec = [None] * leaf.ndim
        if axis is not None:
            spec[axis] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*spec))

    shardings = jax.tree.map(sharding_for, params)
    sharded = jax.device_put(params, shardings)
    grads = jax.device_put(random_grads(params, seed=7), shardings)
    tx, _ = build(params, lr=1e-2, wd=0.04)
    state = jax.jit(tx.init)(sharded)

    step = jitted_step(tx)
    new_sharded, state_sharded, _ = step(sharded, state, grads)
    new_single, _, _ = step(params, init_state(tx, params), random_grads(params, seed=7))
    for a, b in zip(jax.tree.leaves(new_sharded), jax.tree.leaves(new_single), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    kernel = new_sharded["backbone"]["blocks"]["0"]["attn"]["qkv"]["kernel"]
    assert kernel.sharding.is_equivalent_to(
        shardings["backbone"]["blocks"]["0"]["attn"]["qkv"]["kernel"], 2
    )


def test_resume_from_host_copy_is_exact():
    """The step count lives in the state: 3 + restore + 2 steps == 5 uninterrupted steps."""
    params = make_params(seed=8)
    last_lr = lambda s: jnp.where(s < 4, 0.0, 1e-2)  # noqa: E731
    tx, _ = build(params, lr=lambda s: 1e-3 * (s + 1), last_lr=last_lr, wd=0.04)
    step = jitted_step(tx)
    grads = [random_grads(params, seed=20 + t) for t in range(5)]

    straight, state = params, init_state(tx, params)
    for g in grads:
        straight, state, _ = step(straight, state, g)

    resumed, state = params, init_state(tx, params)
    for g in grads[:3]:
        resumed, state, _ = step(resumed, state, g)
    host = jax.device_get((resumed, state))  # what a checkpoint round trip gives back
    resumed, state = jax.tree.map(jnp.asarray, host)
    for g in grads[3:]:
        resumed, state, _ = step(resumed, state, g)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_heads_only_phase_in_the_training_loop(tmp_path):
    """optim.freeze_backbone_steps through the real loop on an FSDP mesh: during the phase
    (checkpoints 1 and 3) the student's backbone does not change by a bit and stays the initial
    one (the loop's jitted init may differ from an eager one by an ulp), the teacher's follows
    it (EMA of equal trees), the heads train; after the phase (step 6) the backbone moves."""
    from raddino_jax import checkpoint
    from raddino_jax.models import init_params
    from raddino_jax.train import loop
    from raddino_jax.train.build import model_spec
    from tests.tiny import build_tiny_dataset, tiny_run_config

    dataset = build_tiny_dataset(tmp_path / "data")
    overrides = {"optim.freeze_backbone_steps": 3, "model.drop_path_rate": 0.0}
    config = tiny_run_config(*dataset, mesh={"data": 2, "fsdp": 4, "tensor": 1}, **overrides)
    config.checkpoint_every, config.keep_checkpoints = 1, 6
    loop.train(config, str(tmp_path / "run"))
    params = {
        (which, step): checkpoint.load_run_params(tmp_path / "run", which, step=step)[1]
        for which in ("student", "teacher")
        for step in (1, 3, 6)
    }
    initial = init_params(model_spec(config), config.seed)

    def leaves(which, step, part):
        return [np.asarray(x) for x in jax.tree.leaves(params[which, step][part])]

    for a, b, c, t in zip(
        leaves("student", 1, "backbone"),
        leaves("student", 3, "backbone"),
        jax.tree.leaves(initial["backbone"]),
        leaves("teacher", 3, "backbone"),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, np.asarray(c), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(t, b, rtol=1e-6, atol=1e-12)
    for a, b in zip(leaves("student", 1, "dino_head"), leaves("student", 3, "dino_head")):
        assert not np.array_equal(a, b)
    for a, b in zip(leaves("student", 3, "backbone"), leaves("student", 6, "backbone")):
        assert not np.array_equal(a, b)

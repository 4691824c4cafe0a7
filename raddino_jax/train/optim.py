"""AdamW with per-parameter rules expressed as data (recipe s4).

The student parameters are a nested dict with top-level keys "backbone", "dino_head" and
optionally "ibot_head". Every per-parameter behaviour of the DINOv2 optimiser is decided by
matching the parameter's path string (keys joined with "/", e.g.
"backbone/blocks/3/attn/qkv/kernel") against lists of (regex, value) rules, big_vision style:
`re.search`, first match wins, otherwise a default. The rules are static Python data, so the
resulting multipliers can be printed and tested before anything is compiled.

The update for a parameter theta with lr multiplier a, wd multiplier b, at step t is

    g   <- g * min(1, clip_norm / (||g_submodule|| + 1e-6))      (per submodule)
    u   <- mhat / (sqrt(vhat) + eps)                                (optax.scale_by_adam)
    upd  = -lr(t) * a * (u + wd(t) * b * theta)                     (decoupled decay)

with lr(t) replaced by last_layer_lr(t) for the DINO/iBOT head's weight-normalised last layer.
This is exactly one step of torch.optim.AdamW with per-group lr = lr(t)*a and
weight_decay = wd(t)*b: torch first does theta *= (1 - lr_g*wd_g) and then
theta -= lr_g * mhat/(sqrt(vhat)+eps), i.e.
theta_new = theta - lr_g*(mhat/(sqrt(vhat)+eps) + wd_g*theta) with the *old* theta in both
terms, which is the formula above (the two only differ in float rounding order).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Rules = tuple[tuple[str, float], ...]

# Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does (recipe s4 clips
# with torch's function): clip factor = min(1, max_norm / (norm + 1e-6)).
TORCH_CLIP_EPS = 1e-6

# layer_id rules (recipe s4, dinov2 utils/param_groups.py get_vit_lr_decay_rate): the embedding
# parameters get layer 0, block i gets layer i + 1 (the value is added to the captured block
# index), anything unmatched (final norm, all heads) gets layer n_blocks + 1, i.e. multiplier 1.
DEFAULT_LAYER_ID_RULES: tuple[tuple[str, int], ...] = (
    (r"^backbone/(pos_embed|patch_embed|cls_token|mask_token|register_tokens)(/|$)", 0),
    (r"^backbone/blocks/(?P<block>\d+)/", 1),
)

# Weight-decay exemptions by name only (recipe s4): names ending in "bias" or containing "norm"
# or "gamma" (LayerScale). cls_token, pos_embed, mask_token, register_tokens and the last
# layer's weight_g are NOT exempt.
DEFAULT_WD_MULT_RULES: Rules = (
    (r"(^|/)bias$", 0.0),
    (r"norm", 0.0),
    (r"gamma", 0.0),
)

# Parameters whose name contains "last_layer" follow last_layer_lr_schedule, which is 0 for the
# first freeze_last_layer_epochs (recipe s4).
DEFAULT_LAST_LAYER_REGEX = r"last_layer"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Static optimiser settings; the defaults reproduce recipe s4.

    Attributes:
      b1, b2, eps: AdamW moments and epsilon (eps outside the square root, as in torch).
      clip_norm: max gradient norm, applied to each submodule's own global norm.
      layerwise_decay: lr multiplier = layerwise_decay ** (n_blocks + 1 - layer_id).
      patch_embed_lr_mult: extra lr factor for the patch embedding (used by the default
        `lr_mult_rules`).
      n_blocks: number of transformer blocks; None infers it from the parameter paths.
      lr_mult_rules: (regex, factor) rules multiplied on top of the layer decay, first match
        wins, default 1. Empty means the recipe's ((r"patch_embed", patch_embed_lr_mult),);
        explicit rules replace it. A factor of 0 freezes the matched parameters' lr
        (big_vision's "frozen").
      wd_mult_rules: (regex, factor) weight-decay multipliers, first match wins, default 1.
      layer_id_rules: (regex, value) layer-id rules, first match wins, default n_blocks + 1.
        If the regex has a named group "block", layer_id = int(block) + value, else value.
      last_layer_regex: parameters matching it use the last-layer lr schedule.
      submodules: top-level keys clipped separately; a key absent from the tree is skipped.
      freeze_backbone_steps: heads-only phase for continued pretraining (issue 23): for the
        first N updates the "backbone" subtree gets no update, no weight decay and no Adam
        moment update (its Adam state starts counting when it joins, so the bias correction
        is that of a fresh optimiser); the heads train as usual. 0: off.
      join_warmup_steps: after the phase, the backbone's lr ramps linearly from lr/W to lr
        over W updates (W = optim.warmup_steps, set by config.optimizer_config); 0: no ramp.
    """

    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    n_blocks: int | None = None
    lr_mult_rules: Rules = ()
    wd_mult_rules: Rules = DEFAULT_WD_MULT_RULES
    layer_id_rules: tuple[tuple[str, int], ...] = DEFAULT_LAYER_ID_RULES
    last_layer_regex: str = DEFAULT_LAST_LAYER_REGEX
    submodules: tuple[str, ...] = ("backbone", "dino_head", "ibot_head")
    freeze_backbone_steps: int = 0
    join_warmup_steps: int = 0

    def __post_init__(self) -> None:
        """Fail on bad values and bad regexes now, not inside a traced function."""
        if not 0.0 <= self.b1 < 1.0 or not 0.0 <= self.b2 < 1.0:
            raise ValueError(f"b1, b2 must lie in [0, 1), got {self.b1}, {self.b2}")
        if self.eps <= 0.0 or self.clip_norm <= 0.0 or self.layerwise_decay <= 0.0:
            raise ValueError("eps, clip_norm and layerwise_decay must be positive")
        if self.n_blocks is not None and self.n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {self.n_blocks}")
        if self.freeze_backbone_steps < 0 or self.join_warmup_steps < 0:
            raise ValueError(
                "freeze_backbone_steps and join_warmup_steps must be >= 0, got "
                f"{self.freeze_backbone_steps}, {self.join_warmup_steps}"
            )
        if not self.submodules or isinstance(self.submodules, str):
            raise ValueError(f"submodules must be a non-empty tuple, got {self.submodules!r}")
        for name in ("lr_mult_rules", "wd_mult_rules", "layer_id_rules"):
            _check_rules(name, getattr(self, name))
        re.compile(self.last_layer_regex)

    def resolved_lr_mult_rules(self) -> Rules:
        """The lr factor rules in force: the explicit ones, or the recipe's patch_embed rule."""
        if self.lr_mult_rules:
            return tuple(self.lr_mult_rules)
        return ((r"patch_embed", self.patch_embed_lr_mult),)


def _check_rules(name: str, rules: Sequence[tuple[str, float]]) -> None:
    """Raise ValueError unless `rules` is a sequence of (valid regex, number) pairs."""
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"{name}: each rule must be a (regex, value) pair, got {rule!r}")
        if isinstance(rule[1], bool) or not isinstance(rule[1], (int, float)):
            raise ValueError(f"{name}: rule value must be a number, got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as err:
            raise ValueError(f"{name}: invalid regex {rule[0]!r}: {err}") from err


# --------------------------------------------------------------------------- paths and rules


def param_paths(tree: PyTree) -> PyTree:
    """The tree with every leaf replaced by its "/"-joined path, e.g. "backbone/norm/scale"."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree
    )


def match_rules(path: str, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
    """Value of the first rule whose regex `re.search`es `path`; `default` if none does."""
    for pattern, value in rules:
        if re.search(pattern, path):
            return value
    return default


def layer_id(path: str, rules: Sequence[tuple[str, int]], n_blocks: int) -> int:
    """Layer index used by the layer-wise lr decay (recipe s4); n_blocks + 1 if no rule hits."""
    for pattern, value in rules:
        found = re.search(pattern, path)
        if found is None:
            continue
        block = found.groupdict().get("block")
        if block is None:
            return value
        if int(block) >= n_blocks:
            raise ValueError(f"{path}: block index {block} >= n_blocks={n_blocks}")
        return int(block) + value
    return n_blocks + 1


def infer_n_blocks(params: PyTree) -> int:
    """Number of backbone blocks: 1 + the largest index in "backbone/blocks/<i>/" paths."""
    indices = [
        int(found.group(1))
        for path in jax.tree.leaves(param_paths(params))
        if (found := re.match(r"^backbone/blocks/(\d+)/", path))
    ]
    return max(indices) + 1 if indices else 0


def _lr_multiplier(path: str, cfg: OptimizerConfig, n_blocks: int) -> float:
    """Layer decay times the first matching lr factor rule."""
    layer = layer_id(path, cfg.layer_id_rules, n_blocks)
    if not 0 <= layer <= n_blocks + 1:
        raise ValueError(f"{path}: layer_id {layer} outside [0, {n_blocks + 1}]; check n_blocks")
    decay = cfg.layerwise_decay ** (n_blocks + 1 - layer)
    return float(decay * match_rules(path, cfg.resolved_lr_mult_rules(), 1.0))


def param_multipliers(params: PyTree, cfg: OptimizerConfig) -> tuple[PyTree, PyTree, PyTree]:
    """Static per-parameter (lr multiplier, wd multiplier, is-last-layer) trees: the structure
    of `params` (only its paths are used) with Python float / float / bool leaves."""
    n_blocks = infer_n_blocks(params) if cfg.n_blocks is None else cfg.n_blocks
    paths = param_paths(params)
    lr_mult = jax.tree.map(lambda p: _lr_multiplier(p, cfg, n_blocks), paths)
    wd_mult = jax.tree.map(lambda p: float(match_rules(p, cfg.wd_mult_rules, 1.0)), paths)
    last_layer = jax.tree.map(lambda p: re.search(cfg.last_layer_regex, p) is not None, paths)
    return lr_mult, wd_mult, last_layer


def unmatched_rules(params: PyTree, cfg: OptimizerConfig) -> list[str]:
    """Regexes of `cfg` that match no parameter path: usually a typo worth a warning."""
    paths = jax.tree.leaves(param_paths(params))
    patterns = [p for p, _ in cfg.resolved_lr_mult_rules()]
    patterns += [p for p, _ in cfg.wd_mult_rules] + [p for p, _ in cfg.layer_id_rules]
    patterns.append(cfg.last_layer_regex)
    return [pat for pat in patterns if not any(re.search(pat, path) for path in paths)]


def _global_norm(tree: PyTree) -> jax.Array:
    """sqrt of the sum of squares of all leaves, accumulated in >= float32 (bf16 grads); scalar."""
    leaves = jax.tree.leaves(tree)
    dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
    squares = [jnp.sum(jnp.square(leaf.astype(dtype))) for leaf in leaves]
    return jnp.sqrt(sum(squares, jnp.zeros((), dtype)))


def submodule_grad_norms(grads: Mapping[str, PyTree]) -> dict[str, jax.Array]:
    """Global L2 norm of each top-level subtree of `grads` (pre-clip, for metrics)."""
    return {name: _global_norm(subtree) for name, subtree in grads.items()}


def clip_by_submodule_norm(
    max_norm: float, submodules: Sequence[str]
) -> optax.GradientTransformation:
    """Clip each listed top-level subtree by its own global norm (recipe s4).

    Each submodule's gradient is multiplied by min(1, max_norm / (norm + 1e-6)), which is what
    torch.nn.utils.clip_grad_norm_ does; a gradient already within the bound is multiplied by
    exactly 1. Submodules absent from the tree are skipped; other top-level keys are an error.
    """
    allowed = tuple(submodules)

    def update_fn(updates, state, params=None):
        del params
        if not isinstance(updates, Mapping):
            raise TypeError(f"expected a dict of submodules, got {type(updates).__name__}")
        unknown = sorted(set(updates) - set(allowed))
        if unknown:
            raise ValueError(f"top-level keys {unknown} are not in submodules={allowed}")
        clipped = {}
        for name, subtree in updates.items():
            factor = jnp.minimum(1.0, max_norm / (_global_norm(subtree) + TORCH_CLIP_EPS))
            clipped[name] = jax.tree.map(lambda g, f=factor: g * f.astype(g.dtype), subtree)
        return clipped, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# --------------------------------------------------------------------------- decay and lr


class ScheduledDecayState(NamedTuple):
    """Number of updates applied so far; the schedules are evaluated at this count."""

    count: jax.Array  # int32 scalar


def scale_by_schedules_with_decay(
    lr_mult: PyTree,
    wd_mult: PyTree,
    last_layer: PyTree,
    *,
    lr_schedule: optax.Schedule,
    last_layer_lr_schedule: optax.Schedule,
    wd_schedule: optax.Schedule,
    frozen: PyTree | None = None,
    join_factor: optax.Schedule | None = None,
) -> optax.GradientTransformation:
    """upd = -lr_g(t) * (u + wd_g(t) * theta) per leaf, with t the count in the state.

    lr_g = lr(t) * lr_mult (last_layer_lr(t) for last-layer leaves), wd_g = wd(t) * wd_mult;
    for leaves marked in `frozen` (static bools) lr_g is further multiplied by join_factor(t),
    exactly 0 during a heads-only phase, so those leaves stay bit-identical.
    The multiplier trees are static Python values, so the choice of schedule and the skipping
    of the decay term for exempt leaves happen at trace time.
    """
    if frozen is None:
        frozen = jax.tree.map(lambda _: False, lr_mult)

    def init_fn(params):
        del params
        return ScheduledDecayState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_schedules_with_decay needs params for weight decay")
        step = state.count
        lr, last_lr, wd = lr_schedule(step), last_layer_lr_schedule(step), wd_schedule(step)
        join = None if join_factor is None else join_factor(step)

        def leaf_update(u, theta, lr_m, wd_m, is_last, is_frozen):
            group_lr = (last_lr if is_last else lr) * lr_m
            if is_frozen and join is not None:
                group_lr = group_lr * join
            direction = u if wd_m == 0.0 else u + jnp.asarray(wd * wd_m, u.dtype) * theta
            return -jnp.asarray(group_lr, u.dtype) * direction

        new_updates = jax.tree.map(
            leaf_update, updates, params, lr_mult, wd_mult, last_layer, frozen
        )
        return new_updates, ScheduledDecayState(count=optax.safe_increment(step))

    return optax.GradientTransformation(init_fn, update_fn)


class HoldState(NamedTuple):
    """`hold_until`'s state: updates seen so far and the held transformation's own state."""

    count: jax.Array  # int32 scalar
    inner_state: Any


def hold_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """`inner`, switched off for the first `steps` updates: zero updates and its state unchanged
    (Adam moments and count do not move), then `inner` as if it started at update `steps`."""

    def init_fn(params):
        return HoldState(count=jnp.zeros((), jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        active = state.count >= steps
        held = jax.tree.map(
            lambda new, zero: jnp.where(active, new, jnp.zeros_like(zero)), new_updates, updates
        )
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(active, new, old), new_inner, state.inner_state
        )
        return held, HoldState(count=optax.safe_increment(state.count), inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def backbone_join_factor(freeze_steps: int, warmup_steps: int) -> optax.Schedule:
    """The backbone's lr factor: 0 for updates < freeze_steps, then (t - freeze_steps + 1) / W
    up to 1 over W = warmup_steps updates (the backbone joins under a warm-up of its own)."""
    ramp = max(warmup_steps, 1)

    def factor(step):
        joined = jnp.asarray(step, jnp.float32) - freeze_steps + 1.0
        return jnp.clip(joined / ramp, 0.0, 1.0)

    return factor


def build_optimizer(
    params: PyTree,
    cfg: OptimizerConfig,
    *,
    lr_schedule: optax.Schedule,
    last_layer_lr_schedule: optax.Schedule,
    wd_schedule: optax.Schedule,
) -> optax.GradientTransformation:
    """The student optimiser of recipe s4 as an optax chain.

    clip each submodule to cfg.clip_norm -> scale_by_adam(b1, b2, eps) -> add wd(t)*wd_mult*theta
    -> scale by -lr(t)*lr_mult (last layer: -last_layer_lr(t)*lr_mult). Pure tree ops, so it runs
    under jax.jit on sharded params; the step count is part of the state (exact resume).
    The student parameters' paths decide the multipliers; the schedules are step -> value.
    """
    unknown = sorted(set(params) - set(cfg.submodules))
    if unknown:
        raise ValueError(f"top-level keys {unknown} are not in cfg.submodules={cfg.submodules}")
    lr_mult, wd_mult, last_layer = param_multipliers(params, cfg)
    clip = clip_by_submodule_norm(cfg.clip_norm, cfg.submodules)
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    schedules = dict(
        lr_schedule=lr_schedule,
        last_layer_lr_schedule=last_layer_lr_schedule,
        wd_schedule=wd_schedule,
    )
    if not cfg.freeze_backbone_steps:
        return optax.chain(
            clip, adam, scale_by_schedules_with_decay(lr_mult, wd_mult, last_layer, **schedules)
        )
    # Heads-only phase: the backbone gets its own Adam, held until it joins, and an lr factor
    # that is exactly 0 until then (no decay either), so its parameters stay bit-identical.
    frozen = {
        name: jax.tree.map(lambda _, f=name == "backbone": f, sub) for name, sub in params.items()
    }
    heads = jax.tree.map(lambda f: not f, frozen)
    return optax.chain(
        clip,
        optax.masked(adam, heads),
        optax.masked(hold_until(adam, cfg.freeze_backbone_steps), frozen),
        scale_by_schedules_with_decay(
            lr_mult,
            wd_mult,
            last_layer,
            frozen=frozen,
            join_factor=backbone_join_factor(cfg.freeze_backbone_steps, cfg.join_warmup_steps),
            **schedules,
        ),
    )

"""The DINOv2 objective on one batch: teacher targets, DINO + iBOT + KoLeo (recipe s3, s7),
plus DINOv3's Gram anchoring when `gram_weight` > 0 (recipe, "Gram anchoring (DINOv3)").

Pure function of (student params, teacher params, centres, batch, key, scalars[, Gram
teacher]). The batch uses the pipeline's crop-major layout with an explicit crop axis:
  global_crops [2, B, G, G, C], local_crops [n_local, B, L, L, C], masks [2, B, N],
  mask_indices / mask_weights / mask_valid [n_groups, U] (flat indices into a group's
  [2, b, N] tokens, b = B / n_groups; masks are drawn per group as the reference draws them per
  device batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from raddino_jax.models import ModelSpec, bind
from raddino_jax.ssl import chunked, gram, losses

CENTERINGS = ("centering", "sinkhorn_knopp")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static knobs of the loss (recipe s3 defaults).

    `koleo_group_size` is the number of images per KoLeo group: the reference computes KoLeo per
    device batch, so set it to the per-device batch of the run you reproduce. It is a fixed
    number (not derived from the mesh) so that the loss does not change with the mesh layout.

    Gram anchoring (DINOv3; off while `gram_weight` is 0): from step `gram_start_step` on, the
    total gains `gram_weight * gram_loss`. `gram_teacher` "ema" copies the EMA teacher's
    backbone into the Gram teacher at `gram_start_step` and then every `gram_update_every`
    steps (0: never again); "initial" keeps the weights the run started from (random init or
    `init.checkpoint`) for the whole run.

    `prototype_chunk` > 0 applies the heads' prototype layer and the DINO / iBOT losses that
    many prototypes at a time (`ssl/chunked.py`): the [rows, K] logits are never stored. It
    must divide the heads' K; 0 (the default) materialises the logits.
    """

    student_temperature: float = 0.1
    centering: str = "centering"  # "centering" (softmax - centre) or "sinkhorn_knopp"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_group_size: int = 0  # 0: the whole batch is one group
    gram_weight: float = 0.0  # 0: Gram anchoring off (DINOv3 uses 2.0)
    gram_start_step: int = 0
    gram_update_every: int = 0  # 0: the Gram teacher is never refreshed after the first copy
    gram_teacher: str = "ema"  # "ema" or "initial"
    prototype_chunk: int = 0  # > 0: heads' prototype layer + losses in chunks (ssl/chunked.py)

    @property
    def gram_enabled(self) -> bool:
        return self.gram_weight > 0

    def __post_init__(self):
        if self.centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {self.centering!r}")
        if self.student_temperature <= 0:
            raise ValueError("student_temperature must be > 0")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError("center_momentum must be in [0, 1)")
        if self.koleo_group_size < 0:
            raise ValueError("koleo_group_size must be >= 0")
        if self.prototype_chunk < 0:
            raise ValueError(f"prototype_chunk must be >= 0 (0: off), got {self.prototype_chunk}")
        if self.gram_weight < 0:
            raise ValueError(f"gram_weight must be >= 0 (0: off), got {self.gram_weight}")
        if self.gram_start_step < 0:
            raise ValueError(f"gram_start_step must be >= 0, got {self.gram_start_step}")
        if self.gram_update_every < 0:
            raise ValueError(f"gram_update_every must be >= 0, got {self.gram_update_every}")
        if self.gram_teacher not in gram.GRAM_TEACHERS:
            raise ValueError(
                f"gram_teacher must be one of {gram.GRAM_TEACHERS}, got {self.gram_teacher!r}"
            )
        if self.gram_teacher == "initial" and self.gram_update_every:
            raise ValueError(
                "gram_teacher 'initial' is never refreshed: set gram_update_every to 0, or use "
                "gram_teacher 'ema' to refresh from the EMA teacher"
            )


def to_input_channels(images: jax.Array, in_chans: int) -> jax.Array:
    """Grayscale crops [..., 1] are replicated to the backbone's channels (RGB weights)."""
    if images.shape[-1] == in_chans:
        return images
    if images.shape[-1] != 1:
        raise ValueError(f"images have {images.shape[-1]} channels, backbone expects {in_chans}")
    return jnp.broadcast_to(images, images.shape[:-1] + (in_chans,))


def _image_major(crops: jax.Array) -> jax.Array:
    """[C, B, ...] -> [B * C, ...] with rows (image, crop).

    Flattening image-major keeps the sharded image axis outermost, so every device keeps its
    own images; a crop-major flatten ([C * B]) would make XLA all-gather the batch on each
    data-parallel device (found by the mesh sweep: 8x the work on 8x1x1).
    """
    return jnp.swapaxes(crops, 0, 1).reshape(-1, *crops.shape[2:])


def _crop_major(x: jax.Array, n_crops: int) -> jax.Array:
    """[B * C, ...] rows (image, crop) -> [C, B, ...]: the layout the losses expect."""
    return jnp.swapaxes(x.reshape(-1, n_crops, *x.shape[1:]), 0, 1)


def gather_masked_tokens(tokens: jax.Array, indices: jax.Array) -> jax.Array:
    """Patch tokens of image-major globals [B * 2, N, D] (rows (image, crop)) -> masked-token
    buffer [n_groups * U, D].

    Group g holds images g*b..(g+1)*b-1 of both crops, flattened as (crop*b + image)*N + patch,
    which is where the pipeline's indices point. The group axis follows the sharded image axis,
    so the gather stays local to each batch shard.
    """
    two_b, n, d = tokens.shape
    n_groups = indices.shape[0]
    b = two_b // 2 // n_groups
    grouped = tokens.reshape(n_groups, b, 2, n, d).transpose(0, 2, 1, 3, 4)
    grouped = grouped.reshape(n_groups, 2 * b * n, d)
    picked = jnp.take_along_axis(grouped, indices[..., None].astype(jnp.int32), axis=1)
    return picked.reshape(-1, d)


def teacher_targets(
    logits: jax.Array,
    center: jax.Array,
    temperature: jax.Array,
    cfg: ObjectiveConfig,
    valid: jax.Array | None = None,
    n_groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """(probs [n, K], next centre [K]). Centering uses the previous step's centre and returns the
    lagged update (recipe s3); Sinkhorn-Knopp leaves the centre untouched.

    `valid` marks the real rows of a padded masked-token buffer of `n_groups` mask groups: padding
    rows get zero probability and stay out of the centre (per-group means, averaged)."""
    if cfg.centering == "sinkhorn_knopp":
        probs = losses.sinkhorn_knopp_teacher(logits, temperature, cfg.sinkhorn_iterations, valid)
        return probs, center
    probs = losses.softmax_center_teacher(logits, center, temperature)
    if valid is not None:
        probs = probs * valid[:, None]
        new_center = losses.update_center(
            center, logits, cfg.center_momentum, valid=valid, n_groups=n_groups
        )
    else:
        new_center = losses.update_center(center, logits, cfg.center_momentum)
    return probs, new_center


def ssl_loss(
    student_params: dict,
    teacher_params: dict,
    dino_center: jax.Array,
    ibot_center: jax.Array,
    batch: dict[str, jax.Array],
    key: jax.Array,
    teacher_temperature: jax.Array,
    gram_teacher_params: dict | None = None,
    gram_active: jax.Array | bool = False,
    *,
    spec: ModelSpec,
    cfg: ObjectiveConfig,
) -> tuple[jax.Array, dict]:
    """Total loss and auxiliaries (terms, next centres, monitors). Differentiable in the student.

    With `cfg.gram_enabled`, `gram_teacher_params` ({"backbone": ...}) is the Gram teacher and
    `gram_active` (a bool scalar, `step >= cfg.gram_start_step`) switches the Gram term on; while
    it is off the Gram teacher's forward is skipped (`lax.cond`) and `gram_loss` is 0.
    """
    vit = spec.backbone
    student, teacher = bind(spec, student_params), bind(spec, teacher_params)
    student_ibot_head = student.ibot_head if spec.ibot_head is not None else student.dino_head
    teacher_ibot_head = teacher.ibot_head if spec.ibot_head is not None else teacher.dino_head

    global_crops = to_input_channels(batch["global_crops"], vit.in_chans)
    local_crops = to_input_channels(batch["local_crops"], vit.in_chans)
    n_global, batch_size = global_crops.shape[:2]
    n_local = local_crops.shape[0]
    globals_flat = _image_major(global_crops)
    masks = _image_major(batch["masks"])
    valid = batch["mask_valid"].reshape(-1)
    weights = jnp.where(valid, batch["mask_weights"].reshape(-1), 0.0)

    # Teacher: both globals, unmasked, no drop path (recipe s7).
    t_out = teacher.backbone(globals_flat)
    t_cls = _crop_major(t_out["x_norm_clstoken"], n_global).reshape(n_global * batch_size, -1)
    t_patch = gather_masked_tokens(t_out["x_norm_patchtokens"], batch["mask_indices"])

    # Student: masked globals and locals (two passes, equivalent to the reference's one list pass).
    key_global, key_local = jax.random.split(key)
    s_global = student.backbone(globals_flat, masks, drop_path_key=key_global)
    s_global_cls = _crop_major(s_global["x_norm_clstoken"], n_global)
    s_cls = s_global_cls
    if n_local:  # data.n_local 0: global crops only (the DINO loss pairs the two globals)
        s_local = student.backbone(_image_major(local_crops), drop_path_key=key_local)
        s_cls = jnp.concatenate([s_cls, _crop_major(s_local["x_norm_clstoken"], n_local)])
    s_patch = gather_masked_tokens(s_global["x_norm_patchtokens"], batch["mask_indices"])

    n_groups = batch["mask_indices"].shape[0]
    heads = (student.dino_head, student_ibot_head, teacher.dino_head, teacher_ibot_head)
    inputs = (s_cls, s_patch, t_cls, t_patch)
    terms_of = _chunked_terms if cfg.prototype_chunk else _materialised_terms
    group = cfg.koleo_group_size or batch_size
    if batch_size % group:
        raise ValueError(f"ssl.koleo_group_size {group} does not divide the batch {batch_size}")
    with jax.named_scope("heads_losses"):  # sweep/profile.py sums time by this scope
        dino, ibot, monitors = terms_of(
            heads, inputs, dino_center, ibot_center, teacher_temperature, valid, weights,
            n_groups, cfg,
        )
        koleo = sum(losses.koleo_loss_grouped(s_global_cls[c], group) for c in range(n_global))
    total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
    if cfg.gram_enabled:
        gram_term = _gram_term(
            s_global["x_norm_patchtokens"], globals_flat, gram_teacher_params, gram_active, spec
        )
        total = total + cfg.gram_weight * gram_term

    aux = {
        "dino_loss": dino,
        "ibot_loss": ibot,
        "koleo_loss": koleo,
        **monitors,
        "masked_tokens": jnp.sum(valid.astype(jnp.float32)),
    }
    if cfg.gram_enabled:
        aux["gram_loss"] = gram_term
    return total, aux


def _materialised_terms(
    heads, inputs, dino_center, ibot_center, teacher_temperature, valid, weights, n_groups, cfg
):
    """(DINO loss, iBOT loss, monitors and next centres) from the heads' [rows, K] logits."""
    student_dino, student_ibot, teacher_dino, teacher_ibot = heads
    s_cls, s_patch, t_cls, t_patch = inputs
    n_teacher = 2
    batch_size = t_cls.shape[0] // n_teacher
    t_cls_logits = jax.lax.stop_gradient(teacher_dino(t_cls))
    t_patch_logits = jax.lax.stop_gradient(teacher_ibot(t_patch))
    t_cls_probs, next_dino_center = teacher_targets(
        t_cls_logits, dino_center, teacher_temperature, cfg
    )
    t_patch_probs, next_ibot_center = teacher_targets(
        t_patch_logits, ibot_center, teacher_temperature, cfg, valid, n_groups=n_groups
    )
    s_cls_logits = student_dino(s_cls)
    s_patch_logits = student_ibot(s_patch)
    tau = cfg.student_temperature
    teacher_probs = t_cls_probs.reshape(n_teacher, batch_size, -1)
    dino = losses.dino_loss(s_cls_logits, teacher_probs, tau)
    ibot = losses.ibot_loss(s_patch_logits, t_patch_probs, weights, n_teacher * batch_size, tau)
    swapped = teacher_probs[::-1].reshape(n_teacher * batch_size, -1)  # crop swap, recipe s3
    monitors = {
        "next_dino_center": next_dino_center,
        "next_ibot_center": next_ibot_center,
        "teacher_entropy": losses.entropy(t_cls_probs),
        "student_teacher_kl": losses.mean_kl_divergence(
            swapped, s_cls_logits[:n_teacher].reshape(n_teacher * batch_size, -1), tau
        ),
    }
    return dino, ibot, monitors


def _chunked_terms(
    heads, inputs, dino_center, ibot_center, teacher_temperature, valid, weights, n_groups, cfg
):
    """`_materialised_terms` with the prototype layer applied chunk by chunk (ssl/chunked.py):
    the same values, no [rows, K] array."""
    student_dino, student_ibot, teacher_dino, teacher_ibot = heads
    s_cls, s_patch, t_cls, t_patch = inputs
    chunk = cfg.prototype_chunk
    n_teacher = 2
    batch_size = t_cls.shape[0] // n_teacher

    def prepared(head, x):  # (features in the head's compute dtype, float32 features, kernel)
        features = head.features(x)
        return features.astype(head.last_layer.dtype), features, head.last_layer.kernel()

    t_cls_x, t_cls_f32, t_cls_kernel = jax.lax.stop_gradient(prepared(teacher_dino, t_cls))
    t_patch_x, t_patch_f32, t_patch_kernel = jax.lax.stop_gradient(prepared(teacher_ibot, t_patch))
    all_rows = jnp.ones(t_cls_x.shape[:1], bool)
    if cfg.centering == "sinkhorn_knopp":
        iterations = cfg.sinkhorn_iterations
        cls_targets = chunked.sinkhorn_targets(
            t_cls_x, t_cls_kernel, teacher_temperature, iterations, all_rows, chunk
        )
        patch_targets = chunked.sinkhorn_targets(
            t_patch_x, t_patch_kernel, teacher_temperature, iterations, valid, chunk
        )
        next_dino_center, next_ibot_center = dino_center, ibot_center
    else:
        cls_targets = chunked.centered_targets(
            t_cls_x, t_cls_kernel, dino_center, teacher_temperature, all_rows, chunk
        )
        patch_targets = chunked.centered_targets(
            t_patch_x, t_patch_kernel, ibot_center, teacher_temperature, valid, chunk
        )
        momentum = cfg.center_momentum
        next_dino_center = chunked.next_center(dino_center, t_cls_f32, t_cls_kernel, momentum)
        next_ibot_center = chunked.next_center(
            ibot_center, t_patch_f32, t_patch_kernel, momentum, valid, n_groups
        )

    s_cls_x, _, s_cls_kernel = prepared(student_dino, s_cls)
    s_patch_x, _, s_patch_kernel = prepared(student_ibot, s_patch)
    tau = cfg.student_temperature
    dino, entropy, kl = chunked.dino_terms(s_cls_x, s_cls_kernel, cls_targets, tau, chunk)
    ibot = chunked.ibot_loss(
        s_patch_x, s_patch_kernel, patch_targets, weights, n_teacher * batch_size, tau, chunk
    )
    monitors = {
        "next_dino_center": next_dino_center,
        "next_ibot_center": next_ibot_center,
        "teacher_entropy": entropy,
        "student_teacher_kl": kl,
    }
    return dino, ibot, monitors


def _gram_term(
    student_patches: jax.Array,
    globals_flat: jax.Array,
    gram_teacher_params: dict | None,
    active: jax.Array | bool,
    spec: ModelSpec,
) -> jax.Array:
    """DINOv3's Gram loss on the global crops (image-major rows, as the objective holds them).

    student_patches [B * 2, N, D]: the student's normed patch tokens of the *masked* globals
    (the reference takes them from the same student pass as iBOT, all tokens used).
    The Gram teacher sees the unmasked globals at the same resolution, without drop path.
    """
    if gram_teacher_params is None:
        raise ValueError(
            "ssl.gram_weight > 0 needs a Gram teacher in the train state: create the state with "
            "train.state.create_state(..., gram=True)"
        )

    def compute(student_patches, globals_flat, gram_teacher_params):
        teacher = bind(ModelSpec(backbone=spec.backbone), gram_teacher_params)
        teacher_patches = teacher.backbone(globals_flat)["x_norm_patchtokens"]
        return gram.gram_loss(student_patches, jax.lax.stop_gradient(teacher_patches))

    def skip(student_patches, globals_flat, gram_teacher_params):
        return jnp.zeros((), jnp.float32)

    return jax.lax.cond(
        jnp.asarray(active, jnp.bool_),
        compute,
        skip,
        student_patches,
        globals_flat,
        gram_teacher_params,
    )

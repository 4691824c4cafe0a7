"""The reference train step in PyTorch (eager, float32), what `train.step.train_step` computes:

- crops: integer pixel levels are normalised first, (x / dtype max - mean) / std, float crops
  are used as given;
- teacher (no grad): backbone on the 2 unmasked global crops, DINO head on the CLS tokens,
  the shared head on the patch tokens of the static masked-token buffer; centred, sharpened
  targets softmax((z - c) / T) and the lagged centre updates (the iBOT centre is the mean of
  per-mask-group means over the buffer's real rows);
- student: backbone on the masked globals and, separately, on the local crops; DINO loss over
  all (student crop, other teacher crop) pairs, iBOT loss over the buffer with weights 1/M_i
  divided by 2B, KoLeo on each global crop's pre-head CLS per group of `koleo_group_size`;
- AdamW with dinov2's per-parameter rules (layer-wise lr decay, 0.2 x lr for the patch
  embedding, no weight decay for biases / norms / LayerScale, last-layer lr schedule), each
  submodule's gradient clipped by its own norm, schedules as dinov2's CosineScheduler arrays;
  torch's multi-tensor ("foreach") AdamW or, with `adamw="fused"`, its fused kernel;
- teacher EMA, and nothing updated at all when the loss or a gradient norm is not finite.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raddino_jax.reference.config import ReferenceConfig
from raddino_jax.reference.model import SSLModel

# F.normalize / F.pairwise_distance eps of dinov2's KoLeoLoss.
KOLEO_EPS = 1e-8
SUBMODULES = ("backbone", "dino_head")


def cosine_schedule(
    peak: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start: float = 0.0,
    freeze_steps: int = 0,
) -> np.ndarray:
    """[total_steps] float64 values (dinov2's CosineScheduler): zeros for `freeze_steps`,
    np.linspace(start, peak) with endpoint for `warmup_steps`, then
    final + (peak - final)(1 + cos(pi i / n)) / 2 for i = 0 .. n - 1."""
    cosine_steps = total_steps - warmup_steps - freeze_steps
    if cosine_steps < 0:
        raise ValueError("freeze + warmup steps exceed total steps")
    i = np.arange(cosine_steps)
    cosine = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * i / max(cosine_steps, 1)))
    return np.concatenate([np.zeros(freeze_steps), np.linspace(start, peak, warmup_steps), cosine])


class Schedules:
    """lr (sqrt batch scaling, warmup + cosine), last-layer lr (lr zeroed for the first
    `freeze_last_layer_steps`), weight decay and teacher momentum (cosine, no warmup), teacher
    temperature (linear warmup, then constant); steps past an array take its final value."""

    def __init__(self, cfg: ReferenceConfig):
        peak = cfg.base_lr * math.sqrt(cfg.global_batch / 1024)
        lr = cosine_schedule(peak, cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
        last_layer_lr = lr.copy()
        last_layer_lr[: cfg.freeze_last_layer_steps] = 0.0
        wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.total_steps)
        momentum = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.total_steps)
        n = cfg.warmup_teacher_temp_steps
        temperature = cosine_schedule(
            cfg.teacher_temp, cfg.teacher_temp, n, n, start=cfg.warmup_teacher_temp
        )
        # name (as in the step's metrics) -> (values per step, the value once they run out)
        self.tables = {
            "lr": (lr, cfg.min_lr),
            "last_layer_lr": (last_layer_lr, cfg.min_lr),
            "wd": (wd, cfg.weight_decay_end),
            "momentum": (momentum, 1.0),
            "teacher_temperature": (temperature, cfg.teacher_temp),
        }

    def at(self, step: int) -> dict[str, float]:
        return {
            name: float(values[step]) if step < len(values) else float(final)
            for name, (values, final) in self.tables.items()
        }


@dataclasses.dataclass(frozen=True)
class ParamRule:
    """lr multiplier, weight-decay multiplier and whether the last-layer lr applies."""

    lr_mult: float
    wd_mult: float
    last_layer: bool


def layer_id(name: str, n_blocks: int) -> int:
    """0 for the embeddings, i + 1 for block i, n_blocks + 1 for the rest (norm, heads)."""
    if re.match(r"backbone\.(pos_embed|patch_embed|cls_token|mask_token|register_tokens)", name):
        return 0
    found = re.match(r"backbone\.blocks\.(\d+)\.", name)
    return int(found.group(1)) + 1 if found else n_blocks + 1


def param_rule(name: str, cfg: ReferenceConfig) -> ParamRule:
    """dinov2's rules for the state-dict name `name` (e.g. "backbone.blocks.3.attn.qkv.weight")."""
    decay = cfg.layerwise_decay ** (cfg.depth + 1 - layer_id(name, cfg.depth))
    lr_mult = decay * (cfg.patch_embed_lr_mult if "patch_embed" in name else 1.0)
    exempt = name.endswith("bias") or "norm" in name or "gamma" in name
    return ParamRule(lr_mult, 0.0 if exempt else 1.0, "last_layer" in name)


def param_groups(model: SSLModel, cfg: ReferenceConfig) -> list[dict]:
    """AdamW groups, one per distinct rule (the step sets each group's lr and wd)."""
    groups: dict[ParamRule, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        groups.setdefault(param_rule(name, cfg), []).append(param)
    return [
        {"params": params, "rule": rule, "lr": 0.0, "weight_decay": 0.0}
        for rule, params in groups.items()
    ]


def centered_targets(logits: torch.Tensor, center: torch.Tensor, temperature: float):
    """softmax((z - c) / T) over the prototypes."""
    return F.softmax((logits - center) / temperature, dim=-1)


def ema_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    return center * momentum + (1.0 - momentum) * batch_mean


def masked_group_mean(logits: torch.Tensor, valid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean over mask groups of each group's mean over its valid rows ([n_groups * U, K] -> [K]);
    a group without valid rows contributes 0."""
    rows = logits.reshape(n_groups, -1, logits.shape[-1])
    weight = valid.reshape(n_groups, -1, 1).to(logits.dtype)
    sums = torch.where(weight > 0, rows, torch.zeros_like(rows)).mul(weight).sum(dim=1)
    return (sums / weight.sum(dim=1).clamp_min(1.0)).mean(dim=0)


def dino_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over (student crop s, teacher crop t != s) pairs of mean_b H(p_t, softmax(z_s/tau)).

    student_logits [S, B, K] (the T global crops first, in the teacher's order), teacher_probs
    [T, B, K]."""
    n_teacher, batch = teacher_probs.shape[:2]
    n_student = student_logits.shape[0]
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    pair_ce = -torch.einsum("tbk,sbk->ts", teacher_probs, log_q) / batch
    same_crop = torch.eye(n_teacher, n_student, dtype=torch.bool, device=pair_ce.device)
    return pair_ce.masked_fill(same_crop, 0.0).sum() / (n_student * n_teacher - n_teacher)


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    weights: torch.Tensor,
    n_crops: int,
    temperature: float,
) -> torch.Tensor:
    """sum_m w_m H(p_m, softmax(z_m / tau)) / n_crops over the padded buffer (w = 0 on padding,
    whose targets are 0 too)."""
    cross_entropy = -(teacher_probs * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1)
    return (weights * cross_entropy).sum() / n_crops


def koleo_loss(features: torch.Tensor) -> torch.Tensor:
    """-mean_b log(||x_b - x_nn(b)|| + eps) on L2-normalised rows; the nearest neighbour by
    inner product with the diagonal excluded (dinov2's KoLeoLoss)."""
    x = F.normalize(features, p=2, dim=-1, eps=KOLEO_EPS)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-1.0)
        neighbour = dots.argmax(dim=1)
    distance = F.pairwise_distance(x, x[neighbour], p=2, eps=KOLEO_EPS)
    return -torch.log(distance + KOLEO_EPS).mean()


def koleo_loss_grouped(features: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of `koleo_loss` over consecutive groups of `group_size` rows (per device batch)."""
    if features.shape[0] % group_size:
        raise ValueError(f"{features.shape[0]} rows do not split into groups of {group_size}")
    groups = features.split(group_size)
    return torch.stack([koleo_loss(g) for g in groups]).mean()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean row entropy in nats (0 log 0 = 0)."""
    return -torch.xlogy(probs, probs).sum(-1).mean()


def mean_kl(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """Mean over rows of KL(p_teacher || softmax(z / tau))."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    cross = torch.where(teacher_probs > 0, teacher_probs * log_q, torch.zeros_like(log_q))
    return (torch.xlogy(teacher_probs, teacher_probs) - cross).sum(-1).mean()


def normalise_levels(crops: torch.Tensor, mean: float | None, std: float | None):
    """Integer pixel levels -> float32 (x / dtype max - mean) / std; float crops as given.

    A torch copy of `data.layout.normalise` on purpose: this module is the independent
    reference that `tests/test_step_reference.py` checks our step against, so it shares no
    code with the step it checks."""
    if crops.is_floating_point():
        return crops
    if mean is None or std is None:
        raise ValueError(f"{crops.dtype} crops need ReferenceConfig.pixel_mean / pixel_std")
    return (crops.to(torch.float32) / float(torch.iinfo(crops.dtype).max) - mean) / std


def to_model_input(crops: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Crop-major NHWC float crops [C, B, H, W, c] -> [C * B, in_chans, H, W] (grey
    replicated to the backbone's channels)."""
    n_crops, batch, height, width, channels = crops.shape
    images = crops.reshape(n_crops * batch, height, width, channels).permute(0, 3, 1, 2)
    if channels != in_chans:
        if channels != 1:
            raise ValueError(f"crops have {channels} channels, the backbone expects {in_chans}")
        images = images.expand(-1, in_chans, -1, -1)
    return images.contiguous()


def masked_token_rows(indices: torch.Tensor, batch: int, n_tokens: int) -> torch.Tensor:
    """Rows of the crop-major flattened patch tokens [2B * N, D] that the buffer indices name.

    Group g's index i points into [crop 1 of images g*b..; crop 2 of them] x N patches, i.e.
    i = (crop * b + image) * N + patch with b = B / n_groups."""
    n_groups = indices.shape[0]
    b = batch // n_groups
    indices = indices.long()
    crop, rest = indices // (b * n_tokens), indices % (b * n_tokens)
    image, patch = rest // n_tokens, rest % n_tokens
    group_start = (torch.arange(n_groups, device=indices.device) * b).unsqueeze(1)
    return ((crop * batch + group_start + image) * n_tokens + patch).reshape(-1)


def batch_to_torch(batch: dict[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The pipeline's host batch (NumPy) as tensors (sharing its memory on the CPU)."""
    return {
        key: torch.from_numpy(np.ascontiguousarray(value)).to(device)
        for key, value in batch.items()
    }


class ReferenceStep:
    """Student, teacher, AdamW state and centres; calling it runs one train step.

    As a speed peer (`benchmarks/step_vs_reference.py --device gpu`) it runs the way DINOv2's
    trainer does on a GPU: float32 parameters and optimizer, the forward passes under
    `torch.autocast` (`autocast="bfloat16"`), SDPA attention, and with `compile=True`
    `torch.compile` on each transformer block and on the head (DINOv3 trains so). The default
    (CPU, no autocast, eager) is the float32 numerics reference.
    """

    def __init__(
        self,
        cfg: ReferenceConfig,
        weights: dict[str, np.ndarray],
        *,
        device: str = "cpu",
        autocast: str = "",
        compile: bool = False,
    ):
        """`weights`: the student's state dict ("backbone.*", "dino_head.*" names); the
        teacher starts as a copy, the centres at zero (as `train.state.new_state`)."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.autocast = getattr(torch, autocast) if autocast else None  # e.g. torch.bfloat16
        self.schedules = Schedules(cfg)
        self.student = SSLModel(cfg).to(self.device)
        self.teacher = SSLModel(cfg).to(self.device)
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()}
        self.student.load_state_dict(state, strict=True)
        self.teacher.load_state_dict(state, strict=True)
        self.teacher.requires_grad_(False)
        if compile:
            for model in (self.student, self.teacher):
                for block in model.backbone.blocks:
                    block.compile()
                model.dino_head.compile()
        self.dino_center = torch.zeros(cfg.head_out_dim, device=self.device)
        self.ibot_center = torch.zeros(cfg.head_out_dim, device=self.device)
        self.step = 0
        self.optimizer = torch.optim.AdamW(
            param_groups(self.student, cfg),
            betas=(cfg.b1, cfg.b2),
            eps=cfg.eps,
            foreach=cfg.adamw == "foreach",
            fused=cfg.adamw == "fused",
        )

    def float32(self):
        """A context where autocast is off: the losses, targets and centres run in float32
        (as dinov2's loss modules do under its autocast)."""
        return torch.autocast(self.device.type, enabled=False)

    def teacher_targets(
        self,
        globals_in: torch.Tensor,
        rows: torch.Tensor,
        batch: dict[str, torch.Tensor],
        temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CLS targets [2B, K], buffer targets [n_groups * U, K], next DINO centre, next iBOT
        centre) from the unmasked globals `globals_in` [2B, C, G, G]; `rows` are the buffer's
        rows of the flattened patch tokens (`masked_token_rows`)."""
        valid, n_groups = batch["mask_valid"].reshape(-1), batch["mask_indices"].shape[0]
        with torch.no_grad():
            cls, patches = self.teacher.backbone(globals_in)
            cls_logits = self.teacher.dino_head(cls)
            patch_logits = self.teacher.dino_head(
                patches.reshape(-1, patches.shape[-1]).index_select(0, rows)
            )
        with torch.no_grad(), self.float32():
            cls_logits, patch_logits = cls_logits.float(), patch_logits.float()
            cls_probs = centered_targets(cls_logits, self.dino_center, temp)
            patch_probs = centered_targets(patch_logits, self.ibot_center, temp)
            patch_probs = patch_probs * valid.unsqueeze(1)
            momentum = self.cfg.center_momentum
            next_dino = ema_center(self.dino_center, cls_logits.mean(dim=0), momentum)
            next_ibot = ema_center(
                self.ibot_center, masked_group_mean(patch_logits, valid, n_groups), momentum
            )
        return cls_probs, patch_probs, next_dino, next_ibot

    def losses(self, batch: dict[str, torch.Tensor], temp: float) -> dict[str, torch.Tensor]:
        """Forward passes and the loss terms (the total is differentiable in the student)."""
        cfg = self.cfg
        globals_in, locals_in = (
            to_model_input(
                normalise_levels(batch[key], cfg.pixel_mean, cfg.pixel_std), cfg.in_chans
            )
            for key in ("global_crops", "local_crops")
        )
        n_global, size = batch["global_crops"].shape[:2]
        n_local = batch["local_crops"].shape[0]
        masks = batch["masks"].reshape(n_global * size, -1)
        rows = masked_token_rows(batch["mask_indices"], size, masks.shape[1])
        valid = batch["mask_valid"].reshape(-1)
        weights = torch.where(valid, batch["mask_weights"].reshape(-1), 0.0)

        cls_probs, patch_probs, next_dino, next_ibot = self.teacher_targets(
            globals_in, rows, batch, temp
        )
        s_global_cls, s_patches = self.student.backbone(globals_in, masks)
        s_local_cls, _ = self.student.backbone(locals_in)
        s_cls = torch.cat([s_global_cls, s_local_cls]).reshape(n_global + n_local, size, -1)
        s_cls_logits = self.student.dino_head(s_cls)
        s_patch_logits = self.student.dino_head(
            s_patches.reshape(-1, s_patches.shape[-1]).index_select(0, rows)
        )
        tau = cfg.student_temperature
        teacher_probs = cls_probs.reshape(n_global, size, -1)
        with self.float32():
            s_cls_logits, s_patch_logits = s_cls_logits.float(), s_patch_logits.float()
            dino = dino_loss(s_cls_logits, teacher_probs, tau)
            ibot = ibot_loss(s_patch_logits, patch_probs, weights, n_global * size, tau)
            koleo = sum(
                koleo_loss_grouped(crop_cls, cfg.koleo_group_size)
                for crop_cls in s_global_cls.float().reshape(n_global, size, -1)
            )
        with torch.no_grad(), self.float32():
            swapped = teacher_probs.flip(0).reshape(n_global * size, -1)
            student_global = s_cls_logits[:n_global].reshape(n_global * size, -1)
            kl = mean_kl(swapped, student_global, tau)
        return {
            "loss": cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo,
            "dino_loss": dino,
            "ibot_loss": ibot,
            "koleo_loss": koleo,
            "next_dino_center": next_dino,
            "next_ibot_center": next_ibot,
            "teacher_entropy": entropy(cls_probs),
            "student_teacher_kl": kl,
            "masked_tokens": valid.sum().float(),
        }

    def update(self, scalars: dict[str, float]) -> None:
        """AdamW with each group's lr = lr(t) (or last_layer_lr(t)) x lr_mult and weight decay
        wd(t) x wd_mult, then the teacher EMA."""
        for group in self.optimizer.param_groups:
            rule: ParamRule = group["rule"]
            base = scalars["last_layer_lr"] if rule.last_layer else scalars["lr"]
            group["lr"] = base * rule.lr_mult
            group["weight_decay"] = scalars["wd"] * rule.wd_mult
        self.optimizer.step()
        with torch.no_grad():
            teacher, momentum = list(self.teacher.parameters()), scalars["momentum"]
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, list(self.student.parameters()), alpha=1 - momentum)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One train step on a host batch (`batch_to_torch`); returns float metrics. When the
        loss or a gradient norm is not finite nothing changes (not even the step count) and
        `finite` is 0."""
        scalars = self.schedules.at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
        ):
            out = self.losses(batch, scalars["teacher_temperature"])
        out["loss"].backward()
        # Each submodule's gradient clipped to `clip_norm` by its own norm; the pre-clip norms.
        norms = {
            f"grad_norm/{name}": float(
                nn.utils.clip_grad_norm_(
                    getattr(self.student, name).parameters(), self.cfg.clip_norm, foreach=True
                )
            )
            for name in SUBMODULES
        }
        finite = all(map(math.isfinite, [float(out["loss"].detach()), *norms.values()]))
        if finite:
            self.update(scalars)
            self.dino_center = out["next_dino_center"]
            self.ibot_center = out["next_ibot_center"]
            self.step += 1
        metrics = {k: float(v.detach()) for k, v in out.items() if not k.startswith("next_")}
        return {**metrics, **scalars, **norms, "finite": float(finite)}

    def named_state(self) -> Iterator[tuple[str, np.ndarray]]:
        """("student.<name>" | "teacher.<name>" | "dino_center" | "ibot_center", array) pairs."""
        for prefix, model in (("student", self.student), ("teacher", self.teacher)):
            for name, param in model.state_dict().items():
                yield f"{prefix}.{name}", param.detach().cpu().numpy().copy()
        yield "dino_center", self.dino_center.cpu().numpy().copy()
        yield "ibot_center", self.ibot_center.cpu().numpy().copy()

"""Our compiled train step next to the torch reference: same weights, same batch, same names.

`comparable` sets a config to what the reference models (float32, no drop path, one device,
LayerScale 1, no lr warmup); `OursStep` is our real compiled step on one device with one fixed
batch (`raddino_jax.sweep.measure`: the loop's builders; the benchmarks time it too), and
`torch_named` gives its state the reference's names; `compare_states` measures how far two
states after the same step(s) agree. It imports JAX, not torch.
"""

from __future__ import annotations

import jax
import numpy as np

from raddino_jax.convert.to_torch import backbone_to_dinov2, head_to_dinov2
from raddino_jax.parallel import sharding
from raddino_jax.sweep import measure
from raddino_jax.train.build import build


def comparable(config, batch: int):
    """`config` (changed in place and returned) set to what the reference implements, on one
    device with `batch` images: float32, no drop path, mask and KoLeo groups of the whole batch,
    an lr schedule without warmup (step 0 must move the weights), no periodic evaluation.

    LayerScale starts at 1: at 1e-5 every image's CLS is nearly the same at step 0 (a degenerate
    KoLeo neighbour search) and the gradients are near rounding noise, a weak agreement check.
    """
    config.batch_size = batch
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    config.model.dtype = "float32"
    config.model.drop_path_rate = 0.0
    config.model.layerscale_init = 1.0
    config.data.mask_group_size = batch
    config.ssl.koleo_group_size = batch
    config.optim.warmup_steps = 0
    config.eval.every = 0
    return config


def torch_named(params: dict) -> dict[str, np.ndarray]:
    """Our student/teacher params -> {"backbone.<dinov2 name>", "dino_head.<name>": array}."""
    named = {f"backbone.{k}": v for k, v in backbone_to_dinov2(params).items()}
    named.update({f"dino_head.{k}": v for k, v in head_to_dinov2(params["dino_head"]).items()})
    return named


class OursStep:
    """Our compiled train step on one device, its state and one fixed batch; calling it runs
    one step (the state donated and threaded through), waits for it, and returns float
    metrics."""

    def __init__(self, config, device):
        self.config = config
        self.point = build(config, [device])
        self.state = measure.initial_state(self.point, config.seed)
        self.host_batch = measure.host_batch(self.point, config.seed)
        self.batch = measure.device_batch(self.point, config.seed)
        # The reference has no drop path, so the key is unused; one placed key keeps the timed
        # call lean (a benchmark with drop path on times the same work with any key).
        self.key = jax.device_put(jax.random.key(config.seed), sharding.replicated(self.point.mesh))
        self.step_fn = self.point.step_fn

    def compile(self) -> float:
        """Compiles the step ahead of time; returns the seconds it took."""
        self.step_fn, seconds = measure.compile_step(self.point, self.config.seed)
        return seconds

    def student_weights(self) -> dict[str, np.ndarray]:
        """The current student in torch names (call before a step: the state is donated)."""
        return torch_named(jax.device_get(self.state.student))

    def __call__(self) -> dict[str, float]:
        self.state, metrics = self.step_fn(self.state, self.batch, self.key)
        jax.block_until_ready((self.state, metrics))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def named_state(self) -> dict[str, np.ndarray]:
        """The same names as `ReferenceStep.named_state`."""
        state = jax.device_get(self.state)
        named = {f"student.{k}": v for k, v in torch_named(state.student).items()}
        named.update({f"teacher.{k}": v for k, v in torch_named(state.teacher).items()})
        named["dino_center"] = np.asarray(state.dino_center)
        named["ibot_center"] = np.asarray(state.ibot_center)
        return named


def _relative(diff_sq: float, ref_sq: float) -> float:
    return float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else float(np.sqrt(diff_sq))


def split_key_bias(name: str, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entries compared as they are, key-bias entries) of one state tensor.

    The key third of a fused qkv bias has a zero gradient in exact arithmetic (q . b_k shifts
    all of a query's logits alike, and the softmax ignores it), so both steps update it by
    Adam-normalised rounding noise: its entries agree only to the size of that update, and are
    compared apart from the rest. Other tensors have no key-bias entries.
    """
    flat = value.reshape(-1)
    if not name.endswith("attn.qkv.bias"):
        return flat, flat[:0]
    dim = flat.shape[0] // 3
    return np.concatenate([flat[:dim], flat[2 * dim :]]), flat[dim : 2 * dim]


def compare_states(
    initial: dict[str, np.ndarray], ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]
) -> dict[str, float]:
    """Agreement after the same step(s) from the same `initial` student (= teacher) weights.

    For the student and the teacher, over every tensor except the qkv key biases
    (`split_key_bias`):
    - `<model> update rel (global)` and `(worst tensor)`: ||u_ours - u_torch|| / ||u_torch||
      with u = weights after - weights before, over all tensors and for the worst one: the
      step's own change, the sensitive view (Adam scales every gradient entry to ~lr);
    - `<model> params rel`: max over tensors of max|ours - torch| / max|torch|;
    and `key bias max abs` over the key biases, `centres max abs` for both centres.
    """
    if set(ours) != set(theirs):
        raise ValueError(f"state names differ: {sorted(set(ours) ^ set(theirs))}")
    report: dict[str, float] = {}
    key_bias = 0.0
    for model in ("student", "teacher"):
        diff_sq = ref_sq = worst = params = 0.0
        for name, start in initial.items():
            (mine, mine_k), (ref, ref_k) = (
                split_key_bias(name, state[f"{model}.{name}"]) for state in (ours, theirs)
            )
            if mine_k.size:
                key_bias = max(key_bias, float(np.max(np.abs(mine_k - ref_k))))
            mine, ref = mine.astype(np.float64), ref.astype(np.float64)
            # u_ours - u_torch = ours - torch: both updates start from the same weights.
            d = float(np.sum((mine - ref) ** 2))
            r = float(np.sum((ref - split_key_bias(name, start)[0]) ** 2))
            diff_sq, ref_sq = diff_sq + d, ref_sq + r
            worst = max(worst, _relative(d, r))
            params = max(params, float(np.max(np.abs(mine - ref)) / max(np.abs(ref).max(), 1e-30)))
        report[f"{model} update rel (global)"] = _relative(diff_sq, ref_sq)
        report[f"{model} update rel (worst tensor)"] = worst
        report[f"{model} params rel"] = params
    report["key bias max abs"] = key_bias
    report["centres max abs"] = max(
        float(np.max(np.abs(ours[c] - theirs[c]))) for c in ("dino_center", "ibot_center")
    )
    return report

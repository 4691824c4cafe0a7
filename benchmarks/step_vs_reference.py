"""The whole train step on CPU: ours (jax.jit) vs the same step in PyTorch (eager), in one run.

Ours is the real compiled step (`raddino_jax.sweep.measure.build_point`: `train.step`'s jit on a
1x1x1 mesh of one CPU device, float32); the other side is `benchmarks/reference_step.py`, a
PyTorch implementation of exactly that step (DINO + iBOT + KoLeo with centering, AdamW with the
per-parameter rules, teacher EMA). Both start from the same weights (ours, exported with
`convert.to_torch` names) and run on the same batch (the sweep's synthetic `host_batch`: random
crops in the dtype the loop ships them, masks from the real iBOT sampler).

Per crop size (G global, L local px: 2 x G + n_local x L crops) each side runs in its own
worker process, so sys time, page faults and peak RSS belong to one implementation:
1. the jax worker builds the config, exports the initial weights, the batch and the reference
   config to a temporary folder, compiles, runs step 0 and saves the state after it;
2. the torch worker loads them, runs step 0 and saves its state: the parent compares the
   step-0 losses and the updated student, teacher and centres (the proof that it is the same
   step) before anything is timed;
3. after `--warmup` more steps each, rounds alternate ours / torch (A B A B), `--steps` timed
   steps per round, so load drift hits both; the idle worker waits on its pipe.
Both workers are alive together (peak memory is the sum of the two).

Threads (as `benchmarks/model_vs_torch.py`): each worker restricts its CPU affinity to the
first `--threads` cores *before* importing jax / torch (XLA sizes its thread pool from the
affinity mask), and torch gets `set_num_threads(n)`, `set_num_interop_threads(1)`. Resource
use comes from `resource.getrusage(RUSAGE_SELF)` deltas around the timed steps (ru_stime,
ru_minflt + ru_majflt) and ru_maxrss at the end (which includes warm-up and compilation).
Measure on a quiet machine: torch's OpenMP threads wait on each other at every op, and when
another process takes one of the cores that wait grows by time slices (on a loaded 2-core VM
a small torch step ran 6x slower with 2 threads than with 1), far more than XLA's pool does.

Reported per size: min and median s/step of each side, ours/torch as the ratio of minima and
the median of per-round paired ratios (round medians), sys s/step, page faults per step, peak
RSS, and the agreement table. The markdown is printed ready for benchmarks/RESULTS.md, with the
command line, CPU model, versions and load averages.

The benchmark model: ViT-S/14 shape (`--width 384 --depth 12`, heads = width / 64), float32,
no drop path, LayerScale initialised to 1 (1e-5 would make every image's CLS nearly the same
at step 0, a degenerate KoLeo neighbour search, and gradients near rounding noise: a weak
agreement check; timing does not depend on the values), one DINO head shared with iBOT (2048
hidden, 256 bottleneck, `--K` prototypes), batch 16 with masks and KoLeo per batch (one
device), lr schedule without warmup (step 0 must move the weights).

Run (defaults: both sizes, batch 16, 2 threads):
  PYTHONPATH=. .venv/bin/python benchmarks/step_vs_reference.py [--sizes 112x56 224x98]
      [--rounds 5] [--steps 2] [--threads 2] [--xla-flags "..."] [--env MALLOC_ARENA_MAX=2]
  smoke: ... --sizes 56x28 --depth 2 --width 64 --K 256 --steps 2 --rounds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from model_vs_torch import _pin_threads  # noqa: E402  (no jax/torch import at module level)

MESSAGE_PREFIX = "@@step_vs_reference "
DEFAULT_SIZES = ("112x56", "224x98")
LOSS_TERMS = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
WEIGHTS_FILE, BATCH_FILE, CONFIG_FILE = "init_weights.npz", "batch.npz", "reference.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="GxL crop sizes")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after step 0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=0, help="0: width / 64")
    p.add_argument("--K", type=int, default=4096, help="prototypes of the shared head")
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--head-bottleneck", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "matmul"])
    p.add_argument("--torch-adamw", default="foreach", choices=["foreach", "fused"])
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax worker")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the jax worker (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for item in args.env:
        if "=" not in item:
            p.error(f"--env {item!r} is not KEY=VALUE")
    for size in args.sizes:
        parse_size(size)
    return args


def parse_size(text: str) -> tuple[int, int]:
    """A "GxL" size, e.g. "224x98" -> (224, 98)."""
    try:
        global_size, local_size = (int(part) for part in text.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"size {text!r} is not GxL, e.g. 224x98") from err
    return global_size, local_size


# ----------------------------------------------------------------------------------------------
# Our side (imports jax lazily: the torch worker and the parent never load it)
# ----------------------------------------------------------------------------------------------


def benchmark_config(
    global_size: int,
    local_size: int,
    *,
    batch: int = 16,
    n_local: int = 8,
    depth: int = 12,
    width: int = 384,
    heads: int = 0,
    k: int = 4096,
    head_hidden: int = 2048,
    head_bottleneck: int = 256,
    seed: int = 0,
    total_steps: int = 1000,
    freeze_last_layer_steps: int = 0,
    warmup_teacher_temp_steps: int = 37_500,
):
    """Our config of the compared step (module docstring): `base_config()` with a ViT-S-shaped
    backbone, float32, no drop path, LayerScale 1, one device (batch-sized mask and KoLeo
    groups) and an lr schedule without warmup."""
    from raddino_jax.config import base_config

    c = base_config()
    c.seed = seed
    c.total_steps = total_steps
    c.batch_size = batch
    c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    c.model.arch = "vit_small"
    c.model.embed_dim, c.model.depth = width, depth
    c.model.num_heads = heads or max(1, width // 64)
    c.model.dtype = "float32"
    c.model.drop_path_rate = 0.0
    c.model.layerscale_init = 1.0
    c.model.head_out_dim = k
    c.model.head_hidden_dim = head_hidden
    c.model.head_bottleneck_dim = head_bottleneck
    c.data.global_size, c.data.local_size, c.data.n_local = global_size, local_size, n_local
    c.optim.warmup_steps = 0
    c.optim.freeze_last_layer_steps = freeze_last_layer_steps
    c.teacher.warmup_temperature_steps = warmup_teacher_temp_steps
    c.eval.every = 0
    return c


def reference_config(config, attention: str = "sdpa", adamw: str = "foreach"):
    """The `ReferenceConfig` of our config; ValueError for what the reference does not model."""
    from reference_step import ReferenceConfig

    from raddino_jax import config as config_lib
    from raddino_jax.train.optim import OptimizerConfig

    spec = config_lib.model_spec(config)
    vit, head = spec.backbone, spec.dino_head
    objective = config_lib.objective_config(config, 1)
    optim = config_lib.optimizer_config(config)
    defaults = OptimizerConfig()
    unsupported = {
        "separate iBOT head": spec.ibot_head is not None,
        "register tokens": vit.num_register_tokens > 0,
        "SwiGLU": vit.ffn_layer != "mlp",
        "drop path": vit.drop_path_rate > 0,
        "non-float32 compute": vit.dtype != "float32" or head.dtype != "float32",
        "interpolation other than 'offset'": vit.interpolate_mode != "offset",
        "Sinkhorn-Knopp": objective.centering != "centering",
        "Gram anchoring": objective.gram_enabled,
        "custom optimiser rules": (
            optim.lr_mult_rules != defaults.lr_mult_rules
            or optim.wd_mult_rules != defaults.wd_mult_rules
            or optim.layer_id_rules != defaults.layer_id_rules
            or optim.last_layer_regex != defaults.last_layer_regex
        ),
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"the torch reference does not implement: {', '.join(found)}")
    o, t = config.optim, config.teacher
    return ReferenceConfig(
        embed_dim=vit.embed_dim,
        depth=vit.depth,
        num_heads=vit.num_heads,
        patch_size=vit.patch_size,
        img_size=vit.img_size,
        in_chans=vit.in_chans,
        mlp_ratio=vit.mlp_ratio,
        layer_norm_eps=vit.layer_norm_eps,
        interpolate_offset=vit.interpolate_offset,
        head_hidden_dim=head.hidden_dim,
        head_bottleneck_dim=head.bottleneck_dim,
        head_out_dim=head.out_dim,
        head_nlayers=head.nlayers,
        student_temperature=objective.student_temperature,
        center_momentum=objective.center_momentum,
        dino_weight=objective.dino_weight,
        ibot_weight=objective.ibot_weight,
        koleo_weight=objective.koleo_weight,
        koleo_group_size=objective.koleo_group_size,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        clip_norm=optim.clip_norm,
        layerwise_decay=optim.layerwise_decay,
        patch_embed_lr_mult=optim.patch_embed_lr_mult,
        base_lr=o.base_lr,
        global_batch=config.batch_size,
        total_steps=config.total_steps,
        warmup_steps=o.warmup_steps,
        min_lr=o.min_lr,
        freeze_last_layer_steps=o.freeze_last_layer_steps,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum,
        warmup_teacher_temp=t.warmup_temperature,
        teacher_temp=t.temperature,
        warmup_teacher_temp_steps=t.warmup_temperature_steps,
        attention=attention,
        adamw=adamw,
        # integer crops are normalised in the step with the data statistics (when it does so)
        pixel_mean=getattr(objective, "pixel_mean", None),
        pixel_std=getattr(objective, "pixel_std", None),
    )


def torch_named(params: dict) -> dict[str, np.ndarray]:
    """Our student/teacher params -> {"backbone.<dinov2 name>", "dino_head.<name>": array}."""
    from raddino_jax.convert.to_torch import backbone_to_dinov2, head_to_dinov2

    named = {f"backbone.{k}": v for k, v in backbone_to_dinov2(params).items()}
    named.update({f"dino_head.{k}": v for k, v in head_to_dinov2(params["dino_head"]).items()})
    return named


class OursStep:
    """Our compiled train step on one device, its state and one fixed batch."""

    def __init__(self, config, device):
        import jax

        from raddino_jax.parallel import sharding
        from raddino_jax.sweep import measure

        self.config = config
        self.point = measure.build_point(config, [device])
        self.state = measure.initial_state(self.point, config.seed)
        self.host_batch = measure.host_batch(self.point, config.seed)
        self.batch = measure.device_batch(self.point, config.seed)
        # Drop path is off, so the key is unused; one placed key keeps the timed call lean.
        self.key = jax.device_put(jax.random.key(config.seed), sharding.replicated(self.point.mesh))
        self.step_fn = self.point.step_fn

    def compile(self) -> float:
        """Compiles the step ahead of time; returns the seconds it took."""
        from raddino_jax.sweep import measure

        self.step_fn, seconds = measure.compile_step(self.point, self.config.seed)
        return seconds

    def student_weights(self) -> dict[str, np.ndarray]:
        """The current student in torch names (call before a step: the state is donated)."""
        import jax

        return torch_named(jax.device_get(self.state.student))

    def __call__(self) -> dict[str, float]:
        """One step (blocks until it is done); float metrics."""
        import jax

        self.state, metrics = self.step_fn(self.state, self.batch, self.key)
        jax.block_until_ready((self.state, metrics))
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def named_state(self) -> dict[str, np.ndarray]:
        """The same names as `ReferenceStep.named_state`."""
        import jax

        state = jax.device_get(self.state)
        named = {f"student.{k}": v for k, v in torch_named(state.student).items()}
        named.update({f"teacher.{k}": v for k, v in torch_named(state.teacher).items()})
        named["dino_center"] = np.asarray(state.dino_center)
        named["ibot_center"] = np.asarray(state.ibot_center)
        return named


# ----------------------------------------------------------------------------------------------
# Comparison of the two steps (NumPy only)
# ----------------------------------------------------------------------------------------------


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
            key = f"{model}.{name}"
            (mine, mine_k), (ref, ref_k) = (
                split_key_bias(name, ours[key]),
                split_key_bias(name, theirs[key]),
            )
            before, _ = split_key_bias(name, start)
            if mine_k.size:
                key_bias = max(key_bias, float(np.max(np.abs(mine_k - ref_k))))
            mine_update = mine.astype(np.float64) - before
            ref_update = ref.astype(np.float64) - before
            d = float(np.sum((mine_update - ref_update) ** 2))
            r = float(np.sum(ref_update**2))
            diff_sq, ref_sq = diff_sq + d, ref_sq + r
            worst = max(worst, _relative(d, r))
            params = max(
                params, float(np.max(np.abs(mine - ref)) / max(np.max(np.abs(ref)), 1e-30))
            )
        report[f"{model} update rel (global)"] = _relative(diff_sq, ref_sq)
        report[f"{model} update rel (worst tensor)"] = worst
        report[f"{model} params rel"] = params
    report["key bias max abs"] = key_bias
    report["centres max abs"] = max(
        float(np.max(np.abs(ours[c] - theirs[c]))) for c in ("dino_center", "ibot_center")
    )
    return report


# ----------------------------------------------------------------------------------------------
# Workers: one implementation each, commanded over stdin / stdout
# ----------------------------------------------------------------------------------------------


def send(message: dict) -> None:
    """One protocol line on stdout (other output of the libraries is ignored by the parent)."""
    sys.stdout.write(MESSAGE_PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def timed_round(step: Callable[[], object], steps: int) -> dict:
    """Runs `steps` steps; their seconds and the process's resource deltas over them."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "times": times,
        "sys_s": after.ru_stime - before.ru_stime,
        "user_s": after.ru_utime - before.ru_utime,
        "faults": (after.ru_minflt + after.ru_majflt) - (before.ru_minflt + before.ru_majflt),
        "maxrss_kib": after.ru_maxrss,
    }


def serve(step: Callable[[], object]) -> None:
    """Answers {"cmd": "round", "steps": n} with `timed_round` until {"cmd": "quit"}."""
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            return
        send(timed_round(step, int(command["steps"])))


def jax_worker(args: argparse.Namespace) -> None:
    """Builds our step, writes the shared inputs and our step-0 state, then serves rounds."""
    import jax

    folder = Path(args.dir)
    global_size, local_size = parse_size(args.sizes[0])
    config = benchmark_config(
        global_size,
        local_size,
        batch=args.batch,
        n_local=args.n_local,
        depth=args.depth,
        width=args.width,
        heads=args.heads,
        k=args.K,
        head_hidden=args.head_hidden,
        head_bottleneck=args.head_bottleneck,
        seed=args.seed,
    )
    (folder / CONFIG_FILE).write_text(
        reference_config(config, args.torch_attention, args.torch_adamw).to_json()
    )
    ours = OursStep(config, jax.devices()[0])
    np.savez(folder / WEIGHTS_FILE, **ours.student_weights())
    np.savez(folder / BATCH_FILE, **ours.host_batch)
    compile_s = ours.compile()
    start = time.perf_counter()
    metrics = ours()
    first_step_s = time.perf_counter() - start
    np.savez(folder / "ours_state.npz", **ours.named_state())
    for _ in range(args.warmup):
        ours()
    send(
        {
            "ready": True,
            "version": f"jax {jax.__version__}",
            "compile_s": compile_s,
            "first_step_s": first_step_s,
            "metrics": metrics,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
    )
    serve(ours)


def torch_worker(args: argparse.Namespace) -> None:
    """Loads the shared inputs, runs the reference's step 0 and saves it, then serves rounds."""
    import torch
    from reference_step import ReferenceConfig, ReferenceStep, batch_to_torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    folder = Path(args.dir)
    cfg = ReferenceConfig.from_json((folder / CONFIG_FILE).read_text())
    with np.load(folder / WEIGHTS_FILE) as weights:
        reference = ReferenceStep(cfg, dict(weights))
    with np.load(folder / BATCH_FILE) as batch:
        tensors = batch_to_torch(dict(batch))
    start = time.perf_counter()
    metrics = reference(tensors)
    first_step_s = time.perf_counter() - start
    np.savez(folder / "torch_state.npz", **dict(reference.named_state()))
    for _ in range(args.warmup):
        reference(tensors)
    send(
        {
            "ready": True,
            "version": f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
            "first_step_s": first_step_s,
            "metrics": metrics,
        }
    )
    serve(lambda: reference(tensors))


# ----------------------------------------------------------------------------------------------
# Parent: start the workers, alternate rounds, compare, report
# ----------------------------------------------------------------------------------------------


class Worker:
    """A worker subprocess and its protocol lines."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]):
        self.name = name
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )

    def receive(self) -> dict:
        """The next protocol message; other stdout lines are passed on to stderr."""
        for line in self.process.stdout:
            if line.startswith(MESSAGE_PREFIX):
                return json.loads(line[len(MESSAGE_PREFIX) :])
            sys.stderr.write(f"[{self.name}] {line}")
        code = self.process.wait()
        raise RuntimeError(f"the {self.name} worker exited (status {code}) before answering")

    def round(self, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"cmd": "round", "steps": steps}) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def worker_argv(args: argparse.Namespace, kind: str, size: str, folder: str) -> list[str]:
    """This script, as worker `kind` for one size, with the run's model options."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--dir", folder]
    argv += ["--sizes", size, "--warmup", str(args.warmup), "--threads", str(args.threads)]
    argv += ["--batch", str(args.batch), "--n-local", str(args.n_local)]
    argv += ["--depth", str(args.depth), "--width", str(args.width), "--heads", str(args.heads)]
    argv += ["--K", str(args.K), "--head-hidden", str(args.head_hidden)]
    argv += ["--head-bottleneck", str(args.head_bottleneck), "--seed", str(args.seed)]
    argv += ["--torch-attention", args.torch_attention, "--torch-adamw", args.torch_adamw]
    if kind == "jax" and args.xla_flags:
        argv += ["--xla-flags", args.xla_flags]
    return argv


def worker_env(args: argparse.Namespace, kind: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    if kind == "jax":
        env.update(item.split("=", 1) for item in args.env)
    return env


@dataclasses.dataclass
class SizeResult:
    """Everything measured for one crop size."""

    size: str
    ready: dict[str, dict]
    rounds: dict[str, list[dict]]
    agreement: dict[str, float]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def run_size(args: argparse.Namespace, size: str) -> SizeResult:
    """Both workers for one size: step-0 agreement, then alternating timed rounds."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="step_vs_reference_") as folder:
        workers: dict[str, Worker] = {}
        try:
            ready = {}
            for kind, name in (("jax", "ours"), ("torch", "torch")):
                workers[name] = Worker(
                    name, worker_argv(args, kind, size, folder), worker_env(args, kind)
                )
                ready[name] = workers[name].receive()
            agreement = step_agreement(Path(folder), ready)
            rounds: dict[str, list[dict]] = {"ours": [], "torch": []}
            for index in range(args.rounds):
                for name in ("ours", "torch"):
                    rounds[name].append(workers[name].round(args.steps))
                print(
                    f"{size} round {index + 1}/{args.rounds}: "
                    + ", ".join(
                        f"{n} {statistics.median(r[-1]['times']):.3f} s" for n, r in rounds.items()
                    ),
                    file=sys.stderr,
                )
        finally:
            for worker in workers.values():
                worker.close()
    return SizeResult(size, ready, rounds, agreement, load_before, os.getloadavg())


def step_agreement(folder: Path, ready: dict[str, dict]) -> dict[str, float]:
    """Step-0 losses of both sides and `compare_states` of the saved states."""
    report: dict[str, float] = {}
    for term in LOSS_TERMS:
        ours, theirs = ready["ours"]["metrics"][term], ready["torch"]["metrics"][term]
        report[f"{term} ours"], report[f"{term} torch"] = ours, theirs
        report[f"{term} abs diff"] = abs(ours - theirs)
    report["losses max abs diff"] = max(report[f"{t} abs diff"] for t in LOSS_TERMS)
    with (
        np.load(folder / WEIGHTS_FILE) as initial,
        np.load(folder / "ours_state.npz") as ours,
        np.load(folder / "torch_state.npz") as theirs,
    ):
        report.update(compare_states(dict(initial), dict(ours), dict(theirs)))
    return report


def summary(result: SizeResult) -> dict[str, dict[str, float]]:
    """Per side: min / median s/step, sys s/step, faults/step, peak RSS GiB."""
    out = {}
    for name, rounds in result.rounds.items():
        times = [t for r in rounds for t in r["times"]]
        steps = len(times)
        out[name] = {
            "min": min(times),
            "median": statistics.median(times),
            "sys": sum(r["sys_s"] for r in rounds) / steps,
            "faults": sum(r["faults"] for r in rounds) / steps,
            "rss_gib": rounds[-1]["maxrss_kib"] / 2**20,
        }
    paired = [
        statistics.median(a["times"]) / statistics.median(b["times"])
        for a, b in zip(result.rounds["ours"], result.rounds["torch"])
    ]
    out["ratio"] = {
        "of_mins": out["ours"]["min"] / out["torch"]["min"],
        "paired_median": statistics.median(paired),
        "paired_min": min(paired),
        "paired_max": max(paired),
    }
    return out


def cpu_model() -> str:
    """/proc/cpuinfo's model name (and whether it has AVX-512), else platform.processor()."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
        platform.processor() or "unknown CPU",
    )
    return model + (" (AVX-512)" if " avx512f" in text else "")


def crops_label(args: argparse.Namespace, size: str) -> str:
    global_size, local_size = parse_size(size)
    return f"2x{global_size} + {args.n_local}x{local_size}"


def format_report(args: argparse.Namespace, argv: list[str], results: list[SizeResult]) -> str:
    """Markdown: the setup, the timing table and the agreement table."""
    first = results[0].ready
    lines = [
        f"Command: `{shlex.join(['benchmarks/step_vs_reference.py', *argv])}`",
        "",
        f"CPU: {cpu_model()}; {args.threads} threads each; {first['ours']['version']}, "
        f"{first['torch']['version']}; float32; ViT {args.width} wide x {args.depth} blocks, "
        f"batch {args.batch}, K={args.K} shared head, centering, KoLeo; "
        f"XLA_FLAGS={first['ours']['xla_flags']!r}"
        + (f"; jax env {' '.join(args.env)}" if args.env else "")
        + f"; torch attention {args.torch_attention}, AdamW {args.torch_adamw}.",
        f"{args.rounds} rounds x {args.steps} steps per side, alternating; load average "
        + "; ".join(
            f"{r.size}: {r.load_before[0]:.2f} before, {r.load_after[0]:.2f} after" for r in results
        )
        + ".",
        "",
        "| crops | ours min s/step | ours median | torch min s/step | torch median "
        "| ours/torch (mins) | ours/torch paired median (range) | ours sys s/step, faults/step, "
        "peak RSS | torch sys s/step, faults/step, peak RSS | ours compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        s = summary(result)
        o, t, r = s["ours"], s["torch"], s["ratio"]
        lines.append(
            f"| {crops_label(args, result.size)} | {o['min']:.3f} | {o['median']:.3f} "
            f"| {t['min']:.3f} | {t['median']:.3f} | {r['of_mins']:.2f} "
            f"| {r['paired_median']:.2f} ({r['paired_min']:.2f}..{r['paired_max']:.2f}) "
            f"| {o['sys']:.2f} s, {o['faults'] / 1e6:.3f}M, {o['rss_gib']:.2f} GiB "
            f"| {t['sys']:.2f} s, {t['faults'] / 1e6:.3f}M, {t['rss_gib']:.2f} GiB "
            f"| {result.ready['ours']['compile_s']:.1f} |"
        )
    lines += [
        "",
        "Step-0 agreement (same weights and batch; losses, then the state after the step):",
        "",
        "| crops | total ours / torch | dino | ibot | koleo | losses max abs diff "
        "| student update rel (global, worst tensor) | teacher update rel (global, worst) "
        "| student / teacher params rel | qkv key bias max abs | centres max abs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        a = result.agreement
        terms = " | ".join(
            f"{a[f'{term} ours']:.6f} / {a[f'{term} torch']:.6f}" for term in LOSS_TERMS
        )
        lines.append(
            f"| {crops_label(args, result.size)} | {terms} | {a['losses max abs diff']:.1e} "
            + "".join(
                f"| {a[f'{model} update rel (global)']:.1e}, "
                f"{a[f'{model} update rel (worst tensor)']:.1e} "
                for model in ("student", "teacher")
            )
            + f"| {a['student params rel']:.1e} / {a['teacher params rel']:.1e} "
            f"| {a['key bias max abs']:.1e} | {a['centres max abs']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        _pin_threads(args.threads, args.xla_flags if args.worker == "jax" else "")
        (jax_worker if args.worker == "jax" else torch_worker)(args)
        return 0
    if args.threads > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--threads {args.threads} > {len(os.sched_getaffinity(0))} cores")
    results = [run_size(args, size) for size in args.sizes]
    print(format_report(args, argv, results))
    if args.json:
        Path(args.json).write_text(
            json.dumps([dataclasses.asdict(r) for r in results], indent=2, default=float)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

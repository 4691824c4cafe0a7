"""What every benchmark script shares, so that a script says only what it compares.

- `pin_threads` before jax / torch are imported: the process keeps the first n cores (XLA sizes
  its CPU thread pool from the affinity mask) and `torch_threads` gives torch the same n;
- `interleaved`: rounds that alternate the compared callables (A B A B), so slow load drift hits
  all of them alike; `paired` summarises per-round ratios; `spread` one series;
- `Worker` / `serve` / `timed_round`: the same rounds across worker processes (one
  implementation per process, so its sys time, page faults and peak RSS are its own);
- `machine_header`: command, CPU, cores, load, versions; `markdown_table`: rows for RESULTS.md;
- `config_args` / `one_device_config`: `--config NAME --batch N --dtype D --set key=value`, the
  named config (`named_config`, as the drivers' `--config.key=value`) sized for one device;
  `one_device_step`: its real train step compiled, as a call.

Importing this module imports neither jax nor torch. A script imports it as `import harness`
(Python puts the script's folder first on sys.path) and runs from the repository root:
`PYTHONPATH=. python benchmarks/<script>.py`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

MESSAGE_PREFIX = "@@benchmark "


def pin_threads(n: int, xla_flags: str = "") -> None:
    """Restrict this process to its first n cores and append `xla_flags` to XLA_FLAGS; call it
    before importing jax or torch. JAX_PLATFORMS defaults to cpu."""
    cores = sorted(os.sched_getaffinity(0))
    if n > len(cores):
        raise SystemExit(f"--threads {n} > {len(cores)} available cores")
    os.sched_setaffinity(0, cores[:n])
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags]))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def torch_threads(n: int):
    """torch with n intra-op threads and one inter-op thread; returns the module."""
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)
    return torch


def interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Seconds of each named call per round, the calls alternating within every round, after
    `warmup` untimed calls of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """a / b per round (same round, same machine load): median, min and max, and the ratio of
    the minima (the least disturbed samples)."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    median, low, high = statistics.median(ratios), min(ratios), max(ratios)
    return {"median": median, "min": low, "max": high, "of_mins": min(a) / min(b)}


def format_paired(a: Sequence[float], b: Sequence[float]) -> str:
    """'median (min..max)' of the paired ratios a / b."""
    r = paired(a, b)
    return f"{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f})"


def spread(values: Sequence[float], spec: str = ".3f") -> str:
    """'median (min..max)' of one series."""
    return (
        f"{format(statistics.median(values), spec)} "
        f"({format(min(values), spec)}..{format(max(values), spec)})"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; cells are formatted with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


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


def machine_header(argv: Sequence[str] | None = None) -> str:
    """Command, CPU, cores this process may use, load average, Python and the versions of jax
    and torch when they are imported (with jax's devices)."""
    argv = sys.argv if argv is None else argv
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"command: `{shlex.join(argv)}`",
        f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores; "
        f"load average {load}; {platform.platform()}",
    ]
    versions = [f"python {platform.python_version()}"]
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        device = jax.devices()[0]
        versions.append(
            f"jax {jax.__version__} ({len(jax.devices())} {device.platform} device(s), "
            f"{device.device_kind}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        )
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        versions.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    lines.append("; ".join(versions))
    return "\n".join(lines)


def named_config(name: str, overrides: Sequence[str] = ()):
    """`configs/<name>.py`'s `get_config()` with "key.sub=value" overrides, loaded as the
    drivers' `--config.key.sub=value` does (`config.load_config`: unknown keys raise)."""
    import configs
    from raddino_jax.config import load_config

    path = os.path.join(os.path.dirname(configs.__file__), f"{name}.py")
    return load_config(path, [f"--config.{item}" for item in overrides])


def override(config, overrides: Sequence[str]):
    """A copy of a built config with "key.sub=value" settings (values as Python literals)."""
    config = config.copy_and_resolve_references()
    for key, _, text in (item.partition("=") for item in overrides):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        config.update_from_flattened_dict({key: value})
    return config


def config_args(parser: argparse.ArgumentParser, config: str, batch: int) -> None:
    """--config, --batch, --dtype and --set (repeatable), for `one_device_config`."""
    parser.add_argument("--config", default=config, help="configs/<name>.py")
    parser.add_argument("--batch", type=int, default=batch, help="global batch (0: the config's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set model.depth=2 (repeatable)")  # fmt: skip


def one_device_config(args: argparse.Namespace, extra: Sequence[str] = ()):
    """The named config (`config_args`) with its --set and `extra` overrides, sized for one
    device: batch, dtype, mask and KoLeo groups within the batch, no periodic evaluation."""
    config = named_config(args.config, [*args.set, *extra])
    config.batch_size = args.batch or config.batch_size
    config.model.dtype = args.dtype
    batch = config.batch_size
    config.data.mask_group_size = min(config.data.mask_group_size or batch, batch)
    config.ssl.koleo_group_size = min(config.ssl.koleo_group_size or batch, batch)
    config.eval.every = 0
    return config


def one_device_step(config):
    """(`reference.compare.OursStep`, compile seconds): `config`'s real train step compiled on
    one device (a 1x1x1 mesh); a call runs one step on the sweep's synthetic batch, the state
    threaded through (donated), and waits for it. `.point` is the built run."""
    import jax

    from raddino_jax import sweep
    from raddino_jax.reference.compare import OursStep

    c = sweep.point_config(config, (1, 1, 1), config.batch_size, config.model.remat)
    step = OursStep(c, jax.devices()[0])
    return step, step.compile()


# Rounds across worker processes (`Worker` in the parent, `serve` in each worker).
def send(message: dict) -> None:
    """One protocol line on stdout (the parent passes any other output on to stderr)."""
    sys.stdout.write(MESSAGE_PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def timed_round(step: Callable[[], object], steps: int) -> dict:
    """`steps` calls: their seconds and the process's resource deltas over them (sys and user
    seconds, page faults) and its peak RSS so far."""
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
    """In a worker: answer {"steps": n} with `timed_round` until stdin closes."""
    for line in sys.stdin:
        send(timed_round(step, int(json.loads(line)["steps"])))


class Worker:
    """A worker subprocess (one implementation) that `serve`s timed rounds."""

    def __init__(self, name: str, argv: Sequence[str]):
        self.name = name
        self.process = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def receive(self) -> dict:
        """The next protocol message; other stdout lines go on to stderr."""
        for line in self.process.stdout:
            if line.startswith(MESSAGE_PREFIX):
                return json.loads(line[len(MESSAGE_PREFIX) :])
            sys.stderr.write(f"[{self.name}] {line}")
        code = self.process.wait()
        raise RuntimeError(f"the {self.name} worker exited (status {code}) before answering")

    def round(self, steps: int) -> dict:
        self.process.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()

"""Where a compiled step spends its time: a `jax.profiler` trace summed by kind of work.

A trace lists thousands of kernels (GPU) or thunks (CPU) named after HLO instructions
(`fusion.123`, `ynn_fusion.4`, `cudnn$fmha...`). To say why a step is slower than a peer's, the
time is summed into a few kinds: matmuls, attention forward / backward, elementwise work
(LayerNorm, GELU, residuals, softmax), the heads and losses, the optimizer and EMA, copies and
transposes, collectives. Each traced instruction is looked up in the compiled HLO text: its
opcode (and, for a fusion, the opcodes it fuses, or a custom call's target) gives the kernel
kind, and its `op_name` metadata (the jax name stack: `train_step` scopes `heads_losses`,
`optimizer`, `teacher_ema`, `attention`, and `transpose(...)` for the backward pass) gives the
part of the step.

Device events are used where the trace has any (GPU streams, TPU cores: time on the device);
otherwise the host's thunk events (CPU: thread time, summed over the worker threads).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
from collections.abc import Callable, Iterable, Sequence

from etils import epath

CATEGORIES = (
    "matmul",
    "attention forward",
    "attention backward",
    "elementwise (LayerNorm, GELU, residual, softmax)",
    "heads + losses",
    "optimizer + EMA",
    "copies and transposes",
    "collectives",
)

_COLLECTIVES = {
    "all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
    "all-reduce-start", "all-reduce-done", "all-gather-start", "all-gather-done",
    "collective-permute-start", "collective-permute-done",
}
_MATMULS = {"dot", "convolution", "ragged-dot"}
_LAYOUT = {"copy", "transpose", "copy-start", "copy-done", "bitcast", "parameter", "reshape",
           "tuple", "get-tuple-element", "constant"}
_ATTENTION_TARGET = re.compile(r"fmha|flash|splash|attention|dot_product", re.IGNORECASE)
_MATMUL_TARGET = re.compile(r"gemm|cublas|matmul|ynn", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of the compiled module: what a trace event names."""

    name: str
    opcode: str
    op_name: str = ""  # metadata op_name: the jax name stack
    fused: frozenset[str] = frozenset()  # opcodes inside a fusion / called computation
    target: str = ""  # custom_call_target


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=\{?%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def _opcode(rest: str) -> str:
    """The opcode after an instruction's result type (`f32[2,3]{1,0} add(...)`)."""
    if rest.startswith("("):  # tuple type: skip to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else rest
    match = re.match(r"\s*([\w\-]+)\(", rest)
    return match.group(1) if match else ""


def parse_hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction of a compiled module's text (`compiled.as_text()`) by name, with the
    opcodes of the computations it calls (transitively)."""
    computations: dict[str, list[tuple[str, str, str, str, list[str]]]] = {}
    current = None
    for line in hlo_text.splitlines():
        if not line.strip() or line.strip() == "}":
            continue
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("{", 1)[0]:
            current = computations.setdefault(head.group(1), [])
            continue
        inst = _INSTRUCTION.match(line)
        if inst is None or current is None:
            continue
        name, rest = inst.groups()
        op_name = _OP_NAME.search(rest)
        target = _TARGET.search(rest)
        current.append(
            (name, _opcode(rest), op_name.group(1) if op_name else "",
             target.group(1) if target else "", _CALLS.findall(rest))
        )

    def called_opcodes(names: list[str], seen: set[str]) -> set[str]:
        found: set[str] = set()
        for called in names:
            if called in seen or called not in computations:
                continue
            seen.add(called)
            for _, opcode, _, _, calls in computations[called]:
                found.add(opcode)
                found |= called_opcodes(calls, seen)
        return found

    ops = {}
    for instructions in computations.values():
        for name, opcode, op_name, target, calls in instructions:
            fused = frozenset(called_opcodes(calls, set()))
            ops[name] = HloOp(name, opcode, op_name, fused, target)
    return ops


def module_name(hlo_text: str) -> str:
    """The module name of a compiled module's text (what trace events call `hlo_module`)."""
    match = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    if match is None:
        raise ValueError("not an HLO module text (no 'HloModule <name>' line)")
    return match.group(1)


def _in_scope(op_name: str, scope: str) -> bool:
    return re.search(rf"(^|/|\(){re.escape(scope)}(/|\)|$)", op_name) is not None


def categorise(op: HloOp) -> str:
    """The kind of work of one instruction: one of `CATEGORIES`."""
    wrapper = {"fusion", "call", "while", "conditional", "async-start", "async-done"}
    opcodes = set(op.fused) | ({op.opcode} - wrapper)
    if opcodes & _COLLECTIVES:
        return "collectives"
    if _in_scope(op.op_name, "optimizer") or _in_scope(op.op_name, "teacher_ema"):
        return "optimizer + EMA"
    if _in_scope(op.op_name, "heads_losses"):
        return "heads + losses"
    backward = "transpose(" in op.op_name
    attention_kernel = bool(op.target) and _ATTENTION_TARGET.search(op.target) is not None
    if attention_kernel or (_in_scope(op.op_name, "attention") and opcodes & _MATMULS):
        return "attention backward" if backward else "attention forward"
    if opcodes & _MATMULS or (op.target and _MATMUL_TARGET.search(op.target)):
        return "matmul"
    if op.name.startswith("ynn_fusion"):  # XLA CPU's YNNPACK matmul fusions
        return "matmul"
    if opcodes <= _LAYOUT:
        return "copies and transposes"
    return "elementwise (LayerNorm, GELU, residual, softmax)"


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    hlo_op: str
    hlo_module: str
    duration_us: float
    on_device: bool


def read_trace_events(trace_dir: str | epath.Path) -> list[TraceEvent]:
    """The HLO-instruction events of the newest perfetto trace under `trace_dir` (as written by
    `jax.profiler.trace(dir, create_perfetto_trace=True)`)."""
    # jax writes DIR/plugins/profile/<timestamp>/perfetto_trace.json.gz
    pattern = "plugins/profile/*/perfetto_trace.json.gz"
    files = sorted(epath.Path(trace_dir).glob(pattern), key=str)
    if not files:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {trace_dir}: trace with "
            "jax.profiler.trace(dir, create_perfetto_trace=True)"
        )
    data = json.loads(gzip.decompress(files[-1].read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    process_names = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    out = []
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_op" not in args:
            continue
        device = process_names.get(e.get("pid"), "").startswith("/device:")
        out.append(TraceEvent(args["hlo_op"], args.get("hlo_module", ""), float(e["dur"]), device))
    return out


def summarise(
    events: Iterable[TraceEvent], ops: dict[str, HloOp], steps: int, module: str = ""
) -> dict[str, float]:
    """Milliseconds per step by category (every one of `CATEGORIES`, 0 when absent), plus
    "unmatched" for events whose instruction is not in `ops`.

    Only device events count when there are any; `module` (`module_name` of the compiled
    text) keeps one program's events.
    """
    events = [e for e in events if not module or e.hlo_module == module]
    if any(e.on_device for e in events):
        events = [e for e in events if e.on_device]
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        op = ops.get(event.hlo_op)
        totals[categorise(op) if op else "unmatched"] += event.duration_us / 1e3 / steps
    return {name: totals.get(name, 0.0) for name in (*CATEGORIES, "unmatched")}


def trace_steps(
    run_step: Callable[[], None], steps: int, trace_dir: str | epath.Path
) -> list[TraceEvent]:
    """Runs `run_step` (one step, blocking until done) `steps` times under the profiler."""
    import jax

    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(steps):
            run_step()
    return read_trace_events(trace_dir)


def markdown_table(columns: dict[str, dict[str, float]]) -> str:
    """One column of ms/step per run (e.g. {"before": ..., "after": ...}) with each column's
    share of its total, as a markdown table; a ratio column when there are exactly two."""
    names: Sequence[str] = list(columns)
    rows = [c for c in (*CATEGORIES, "unmatched") if any(col[c] for col in columns.values())]
    header = "| kind | " + " | ".join(f"{n} ms/step (share)" for n in names)
    header += " | ratio |" if len(names) == 2 else " |"
    lines = [header, "|" + "---|" * (len(names) + 1 + (len(names) == 2))]
    totals = {n: sum(columns[n].values()) or 1.0 for n in names}
    for row in [*rows, "total"]:
        values = [sum(columns[n].values()) if row == "total" else columns[n][row] for n in names]
        cells = [f"{v:.2f} ({v / totals[n]:.0%})" for v, n in zip(values, names)]
        if len(names) == 2:
            cells.append(f"{values[1] / values[0]:.2f}" if values[0] else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

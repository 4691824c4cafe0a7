#!/usr/bin/env bash
# One prepared GPU check (see benchmarks/gpu_check.py for what it runs and its tolerances):
#   [1] one tiny float32 train step on the GPU vs the CPU of the same machine,
#   [2] ViT-B/14 SSL step in bfloat16 at 224 and 518 px globals (8 x 98 px locals):
#       images/s, MFU, XLA memory analysis, allocator statistics,
#   [3] a small sweep at 224/98: remat x attention implementation,
#   [4] issue 19's levers at 518/98 x 40 (remat none, chunked head + loss, unrolled blocks,
#       80 images per GPU),
# and around it (GPU only), in order of value:
#   [P] the peer: ours vs DINOv2's step in PyTorch (autocast bf16, SDPA, fused AdamW), eager and
#       torch.compile'd, same weights and batch, step-0 losses checked, one ratio table
#       (benchmarks/step_vs_reference.py --device gpu) at 518/98 x 40, then 224/98 x 64 last;
#   [F] the profile of our 518/98 x 40 step by kind of work, before / after the chunked head
#       (benchmarks/step_profile.py).
# Expected total ~8-10 minutes on one H200 (mostly compiles); --budget-s trims part [2]-[4].
#
# Usage (from anywhere; it cds to the repo root):
#   bash benchmarks/gpu_check.sh             # GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny model, 2 steps: checks the script
#   bash benchmarks/gpu_check.sh --budget-s 420 --out rows.jsonl   # stop adding rows at 420 s
#
# Python environment, first match wins:
#   $PYTHON if set (an interpreter that already has the project's requirements + GPU jax);
#   .venv-gpu/bin/python if it exists;
#   otherwise .venv-gpu is created from requirements.txt plus jax[$JAX_CUDA] (needs network).
# JAX_CUDA defaults to cuda12: jax 0.10's CUDA 12 wheels (jax-cuda12-plugin[with-cuda]) bring
# their own CUDA 12 runtime from pip and only need an NVIDIA driver >= 525, which every H100
# image has; jax[cuda13] needs driver >= 580. Use JAX_CUDA=cuda13 on hosts with a 580+ driver.
# --dry-run uses $PYTHON or the existing .venv (CPU jax) and never installs anything.
# Offline GPU image with its own jax (as on the H200 of benchmarks/RESULTS.md, jax 0.11.2):
# pip-install grain, array-record, ml-collections (+ deflate, portpicker, zstandard, dm-tree)
# from carried wheels into a --target dir on PYTHONPATH, then PYTHON=python3 bash this script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=0
PASS=()  # everything else goes to gpu_check.py (--budget-s S, --out FILE, --steps N)
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) PASS+=("$arg") ;;
  esac
done

JAX_CUDA="${JAX_CUDA:-cuda12}"
VENV="${VENV:-.venv-gpu}"

if [[ "$DRY_RUN" == 1 ]]; then
  PY="${PYTHON:-.venv/bin/python}"
  export JAX_PLATFORMS=cpu
  unset XLA_FLAGS  # one CPU device, as on the GPU machine
else
  if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
  elif [[ -x "$VENV/bin/python" ]]; then
    PY="$VENV/bin/python"
  else
    echo "creating $VENV with requirements.txt + jax[$JAX_CUDA]" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -r requirements.txt "jax[$JAX_CUDA]>=0.10,<0.11"
    PY="$VENV/bin/python"
  fi
  # Both backends: the GPU for the runs, the CPU for the reference in part [1].
  export JAX_PLATFORMS="cuda,cpu"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax; print('jax', jax.__version__, 'devices', jax.devices())"
if [[ "$DRY_RUN" == 1 ]]; then
  exec "$PY" benchmarks/gpu_check.py --dry-run "${PASS[@]}"
fi
STATUS=0
PEER=(--device gpu --dtype bfloat16 --width 768 --depth 12 --n-local 8 --K 65536 --prototype-chunk 8192
      --torch-modes eager,compile --torch-adamw fused --rounds 3 --steps 5 --threads 4)
echo "[P] ours vs PyTorch (eager, torch.compile), ViT-B/14 518/98 x 40"
"$PY" benchmarks/step_vs_reference.py "${PEER[@]}" --sizes 518x98 --batch 40 || STATUS=1
"$PY" benchmarks/gpu_check.py "${PASS[@]}" || STATUS=1
echo "[F] profile of the 518/98 x 40 step by kind of work, before / after the chunked head"
"$PY" benchmarks/step_profile.py --config vitb14 --batch 40 --dtype bfloat16 --steps 3 \
    --set ssl.prototype_chunk=0 --compare ssl.prototype_chunk=8192 || STATUS=1
echo "[P] ours vs PyTorch at 224/98 x 64"
"$PY" benchmarks/step_vs_reference.py "${PEER[@]}" --sizes 224x98 --batch 64 || STATUS=1
exit $STATUS

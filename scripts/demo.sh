#!/usr/bin/env bash
# The quick-start main job on a fresh machine (CPU): built-in samples -> pretraining -> export to
# a transformers folder (checked with AutoModel) -> frozen-feature evaluation vs random init.
set -euo pipefail
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
$PY -m raddino_jax.main --config=configs/demo.py --workdir="$OUT"
$PY -m raddino_jax.convert to-hf --checkpoint "$OUT" --out "$OUT/hf" --verify
$PY -m raddino_jax.evaluate --checkpoint "$OUT" --data "$OUT/builtin/tfds/samples" \
    --label nodule,effusion --task all --out "$OUT/eval"
echo "demo finished: model $OUT/hf, evaluation $OUT/eval/eval.md"

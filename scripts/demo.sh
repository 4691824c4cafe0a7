#!/usr/bin/env bash
# The quick-start main job on a fresh machine (CPU): built-in samples -> pretraining -> export to
# a transformers folder (checked with AutoModel) -> frozen-feature evaluation of the teacher vs
# random init and the pixel reference, with 95% bootstrap intervals and a learning curve over
# the run's checkpoints (OUT/eval/eval.md, eval.json, curve.png, curve.json).
set -euo pipefail
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
$PY -m raddino_jax.main --config=configs/demo.py --workdir="$OUT"
$PY -m raddino_jax.convert to-hf --checkpoint "$OUT" --out "$OUT/hf" --verify
$PY -m raddino_jax.evaluate --checkpoint "$OUT" --data "$OUT/builtin/tfds/samples" \
    --label effusion_present,nodule --task all --curve --out "$OUT/eval"
echo "demo finished: model $OUT/hf, evaluation $OUT/eval/eval.md, learning curve $OUT/eval/curve.png"

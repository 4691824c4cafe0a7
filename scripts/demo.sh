#!/usr/bin/env bash
# The quick-start main job on a fresh machine (CPU): built-in samples (seed 0) -> pretraining ->
# export to a transformers folder (checked with AutoModel, max |torch - jax| printed) -> a
# held-out evaluation on phantoms drawn with another seed that training never saw, under the
# export's preprocessing (preprocessor_config.json = data/preprocess.py): the teacher vs random
# init of the same architecture and the pixel reference, kNN (balanced) accuracy and probe
# AUROC with paired 95% bootstrap intervals, and a kNN learning curve over the run's
# checkpoints (OUT/eval/eval.md, eval.json, curve.png, curve.json).
#
# The held-out draw and its build need no model, so they run in the background while the
# model trains (the training step leaves part of the second core idle); phase times are
# printed at the end.
set -euo pipefail
# A CPU job by default: the test extra in .venv brings libtpu, and with JAX_PLATFORMS unset
# every process probes for a TPU and prints "could not determine TPU worker hostnames".
# JAX_PLATFORMS=cuda (or tpu) bash ... runs it on an accelerator instead.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
HELDOUT_SEED=${HELDOUT_SEED:-20261204}  # any seed but 0 (the training samples')
HELDOUT_PHANTOMS=${HELDOUT_PHANTOMS:-2400}  # 45% test: ~1,070 held-out test images
mkdir -p "$OUT/heldout"
start=$SECONDS

heldout() {
  if [ ! -f "$OUT/heldout/samples/labels.csv" ]; then
    nice -n 5 $PY -m data_prep.samples --output "$OUT/heldout/samples" \
        --n-phantoms "$HELDOUT_PHANTOMS" --size 64 --seed "$HELDOUT_SEED" \
        --split-fractions 0.45,0.1,0.45 > /dev/null
  fi
  nice -n 5 $PY -m data_prep.build --input "$OUT/heldout/samples/labels.csv" \
      --output "$OUT/heldout/tfds" --name heldout --size 64 --workers 1
  echo "held-out samples ready after $((SECONDS - start)) s"
}
heldout > "$OUT/heldout/log.txt" 2>&1 &
heldout_pid=$!
trap 'kill $heldout_pid 2>/dev/null || true' EXIT

$PY -m raddino_jax.main --config=configs/demo.py --workdir="$OUT"
trained=$((SECONDS - start))
$PY -m raddino_jax.convert to-hf --checkpoint "$OUT" --out "$OUT/hf" --verify
exported=$((SECONDS - start))
if ! wait $heldout_pid; then
  cat "$OUT/heldout/log.txt" >&2
  echo "the held-out samples failed (log above)" >&2
  exit 1
fi
trap - EXIT
heldout_ready=$((SECONDS - start))
$PY -m raddino_jax.evaluate --checkpoint "$OUT" --data "$OUT/heldout/tfds/heldout" \
    --label nodule,effusion,effusion_present --task knn,linear --c-grid coarse \
    --curve --curve-tasks knn \
    --out "$OUT/eval"
echo "timing (s since start): trained $trained, exported $exported, held-out ready" \
    "$heldout_ready, evaluated $((SECONDS - start))"
echo "demo finished: model $OUT/hf, evaluation $OUT/eval/eval.md, learning curve $OUT/eval/curve.png"

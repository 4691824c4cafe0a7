#!/usr/bin/env bash
# Continued pretraining at demo scale (issue 23, configs/demo_continue.py): start from the
# backbone of a finished `make demo` run (RUN/hf: backbone only, so the DINO/iBOT heads start
# fresh), continue on a shifted domain (phantoms with the "portable" acquisition profile +
# the real CRs) with and without a heads-only phase (optim.freeze_backbone_steps), and
# evaluate both runs against the starting backbone (--baseline RUN, paired 95% bootstrap
# intervals) on held-out draws of the original domain (RUN/heldout, standard acquisition)
# and of the new one (portable, another unseen seed).
#
#   bash scripts/continue_demo.sh [RUN=runs/demo] [OUT=runs/demo_continue]
#
# Writes OUT/phase_<N>/eval_{original,shifted}/eval.md (N = heads-only steps) and
# OUT/summary.md (the checkpoint-minus-start intervals of every run and label).
set -euo pipefail
# A CPU job by default: the test extra in .venv brings libtpu, and with JAX_PLATFORMS unset
# every process probes for a TPU and prints "could not determine TPU worker hostnames".
# JAX_PLATFORMS=cuda (or tpu) bash ... runs it on an accelerator instead.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
RUN=${1:-runs/demo}
OUT=${2:-runs/demo_continue}
PY=${PY:-.venv/bin/python}
PHASES=${PHASES:-"0 20"}  # heads-only steps of each run; 0 = the backbone trains from step 0
TRAIN_SEED=${TRAIN_SEED:-7}  # the shifted domain's training draw (not 0: the demo's)
HELDOUT_SEED=${HELDOUT_SEED:-20261205}  # the shifted domain's held-out draw
TRAIN_PHANTOMS=${TRAIN_PHANTOMS:-3000}
HELDOUT_PHANTOMS=${HELDOUT_PHANTOMS:-2400}
LABELS=nodule,effusion,effusion_present
[ -d "$RUN/hf" ] && [ -d "$RUN/heldout/tfds/heldout" ] || {
  echo "$RUN is not a finished demo run (needs $RUN/hf and $RUN/heldout; run make demo)" >&2
  exit 1
}

draw() {  # draw OUTDIR SEED N
  if [ ! -f "$1/samples/labels.csv" ]; then
    $PY -m data_prep.samples --output "$1/samples" --n-phantoms "$3" --size 64 --seed "$2" \
        --acquisition portable --split-fractions 0.45,0.1,0.45 > /dev/null
  fi
  $PY -m data_prep.build --input "$1/samples/labels.csv" --output "$1/tfds" --name portable \
      --size 64 --workers 2 > /dev/null
}
draw "$OUT/portable_train" "$TRAIN_SEED" "$TRAIN_PHANTOMS"
draw "$OUT/portable_heldout" "$HELDOUT_SEED" "$HELDOUT_PHANTOMS"

for phase in $PHASES; do
  work="$OUT/phase_$phase"
  $PY -m raddino_jax.main --config=configs/demo_continue.py --workdir="$work" \
      --config.init.checkpoint="$RUN/hf" --config.data.dir="$OUT/portable_train/tfds" \
      --config.data.name=portable --config.optim.freeze_backbone_steps="$phase"
  for domain in original shifted; do
    data="$RUN/heldout/tfds/heldout"
    [ "$domain" = shifted ] && data="$OUT/portable_heldout/tfds/portable"
    $PY -m raddino_jax.evaluate --checkpoint "$work" --baseline "$RUN" --data "$data" \
        --label "$LABELS" --task knn,linear --c-grid coarse --out "$work/eval_$domain" > /dev/null
  done
done
reports=()
for phase in $PHASES; do
  for domain in original shifted; do
    reports+=("heads-only $phase, $domain=$OUT/phase_$phase/eval_$domain")
  done
done
$PY scripts/eval_table.py --against baseline "${reports[@]}" | tee "$OUT/summary.md"
echo "continued-pretraining demo finished: $OUT/summary.md"

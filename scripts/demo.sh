#!/usr/bin/env bash
# Demo of the weight pipeline on a fresh machine (replaced by the pretraining demo once the
# training driver lands): built-in samples -> random ViT-S/14 params -> features -> HF export.
set -euo pipefail
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY -m data_prep.samples --output "$OUT/samples" --n-phantoms 16
$PY - "$OUT" <<'PYEOF'
import sys
from raddino_jax import checkpoint
from raddino_jax.models import ModelSpec, init_params
from raddino_jax.models.vit import vit_config
out = sys.argv[1] + "/random_params"
spec = ModelSpec(vit_config("vit_small", depth=4, img_size=112))
if not checkpoint.is_param_checkpoint(out):
    checkpoint.save_params(out, spec, init_params(spec, 0), checkpoint.Preprocessing(image_size=112))
PYEOF
$PY -m raddino_jax.extract --checkpoint "$OUT/random_params" --input "$OUT/samples/phantoms" --out "$OUT/features.npz"
$PY -m raddino_jax.convert to-hf --checkpoint "$OUT/random_params" --out "$OUT/hf_export" --verify

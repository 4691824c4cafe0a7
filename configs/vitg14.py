"""ViT-g/14 (vit_giant2, SwiGLU) with DINOv2's vitg14 recipe: as configs/vitl14.py with the
giant backbone (1.1B parameters, recipe s1).

  python -m raddino_jax.main --config=configs/vitg14.py --workdir=gs://BUCKET/runs/g14 \
      --config.data.dir=gs://BUCKET/tfds --config.data.name=NAME --config.mesh.fsdp=16 \
      --config.model.remat=True

Needs FSDP (and usually remat); check per-device memory for your slice first with
`python -m raddino_jax.sweep --config=configs/vitg14.py --compile-only`.
"""

from configs import vitl14


def get_config():
    c = vitl14.get_config()
    c.model.arch = "vit_giant2"
    c.model.ffn_layer = "swiglu"  # fused SwiGLU, as dinov2 trains and releases ViT-g
    return c

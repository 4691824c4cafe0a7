"""ViT-S/14 with DINOv2's default recipe (ssl_default_config; recipe s3-s5), 224/98 px.

  python -m raddino_jax.main --config=configs/vits14.py --workdir=DIR \
      --config.data.dir=DATA_DIR --config.data.name=NAME

100 "epochs" of 1250 iterations at batch 1024, base lr 4e-3 per 1024 with 10-epoch warmup,
layer decay 0.9, drop path 0.3 (recipe s4 defaults); ImageNet-scale reference: kNN 79.0 / linear
81.1 on IN-1k for the distilled model (recipe s10) - radiograph numbers will differ.
"""

from raddino_jax.config import base_config


def get_config():
    c = base_config()
    c.total_steps = 125_000
    c.checkpoint_every = 3_750
    c.batch_size = 1024
    c.model.arch = "vit_small"
    c.model.drop_path_rate = 0.3
    c.model.dtype = "bfloat16"
    c.data.global_size = 224
    c.data.local_size = 98
    c.optim.base_lr = 4e-3
    c.optim.warmup_steps = 12_500
    return c

"""RAD-DINO: ViT-B/14 continued from DINOv2 weights on chest radiographs at 518 px (recipe s8).

  python -m raddino_jax.main --config=configs/vitb14.py --workdir=gs://BUCKET/runs/raddino \
      --config.data.dir=gs://BUCKET/tfds --config.data.name=cxr \
      --config.init.checkpoint=dinov2_vitb14_pretrain.pth

Known from RAD-DINO's card: ViT-B/14 without registers, batch 2,560 (40 per A100 x 64), 100k
iterations, 518 px globals, initialised from DINOv2 ViT-B/14. Not published, and therefore our
choices (recipe s8, "proposed defaults"): base_lr 2e-4 per 1024 (DINOv2's continued-training
value), 10k warmup, layer decay 1.0, drop path 0, momentum 0.994, 8 local crops of 98 px,
centring (not Sinkhorn), shared iBOT head with K=65536. `init.checkpoint` takes a from-torch
output or the torch file / HF folder directly; heads start fresh unless `init.heads` is given.
Expect ~28 img/s per A100 in the reference (recipe s11); measure yours with raddino_jax.sweep.

Memory (benchmarks/RESULTS.md, compiled for the slices without a TPU): as written, 40 images
per chip fit a v5p chip (remat "dots", head + loss chunked over prototypes: 39.3 GiB of 95 on
v5p-8, estimated >= 466 ms per step, MFU 0.507; 53.1 GiB / 484 ms with
--config.ssl.prototype_chunk=0) and an H200 (38 GiB before the chunking; measured 382 ms per
step, session 4). Smaller chips need more
recompute and fewer images per chip, e.g. v5e (16 GiB): --config.model.remat=full
--config.batch_size=<24 x chips> --config.data.mask_group_size=24
--config.ssl.koleo_group_size=24 (9.7-10.9 GiB per chip); v4 (32 GiB per chip, a device per
TensorCore with 16 GiB): --config.model.remat=full --config.data.mask_group_size=20
--config.ssl.koleo_group_size=20 at 40 per chip (9.6 GiB per core).
Check a layout before paying for it:
  python -m raddino_jax.sweep --config=configs/vitb14.py --topology=v5e:2x4 --meshes=8x1x1 \
      --batch-sizes=192 --remat=full --compile-only --out=DIR
"""

from raddino_jax.config import base_config


def get_config():
    c = base_config()
    c.total_steps = 100_000
    c.log_every = 50
    c.checkpoint_every = 2_500
    c.batch_size = 2560
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}

    c.model.arch = "vit_base"
    c.model.img_size = 518
    c.model.drop_path_rate = 0.0
    c.model.dtype = "bfloat16"
    c.model.head_out_dim = 65536
    # Fit 40 images per chip in HBM (v5p: 53.1 GiB of 95, benchmarks/RESULTS.md): keep the
    # matmul outputs and recompute the rest of each block; scan compiles one block body.
    c.model.remat = "dots"
    c.model.scan_blocks = True

    c.data.global_size = 518
    c.data.local_size = 98
    c.data.n_local = 8
    c.data.mask_group_size = 40  # the reference draws masks per GPU batch of 40
    c.data.num_workers = 8
    c.ssl.koleo_group_size = 40  # KoLeo per GPU batch, as the reference
    # The heads' prototype layer and the DINO/iBOT losses in 8 chunks of 8,192 prototypes:
    # the [tokens, 65536] logits are never stored (v5p-8: 53.1 -> 39.3 GiB per chip, estimated
    # 484 -> 466 ms per step; benchmarks/RESULTS.md). 0 materialises them.
    c.ssl.prototype_chunk = 8192

    c.optim.base_lr = 2e-4
    c.optim.warmup_steps = 10_000
    c.optim.layerwise_decay = 1.0
    c.optim.weight_decay_end = 0.2
    c.teacher.momentum = 0.994
    c.teacher.warmup_temperature_steps = 10_000
    return c

"""The tiny model of the tests and the benchmarks' smoke runs: a 2-block, 32-wide ViT on 56 px
globals and 2 x 28 px locals, float32, 6 steps of batch 16.

  python -m raddino_jax.main --config=configs/tiny.py --workdir=/tmp/tiny \
      --config.data.dir=DATA_DIR --config.data.name=NAME

Seconds per step on a CPU core; it checks that things run, not what they learn.
`shrink(config)` puts the same model and crop sizes into any other config (the GPU check's dry
run); `get_config()` is the whole run (`tests/tiny.py` builds its test configs from it).
"""

import ml_collections

from raddino_jax.config import base_config

GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 56, 28, 2


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (changed in place and returned) with the tiny model and crop sizes."""
    m = config.model
    m.arch = "vit_small"
    m.embed_dim, m.depth, m.num_heads = 32, 2, 2
    m.patch_size = 14  # the crop sizes below are multiples of it (configs/demo.py uses 8)
    m.img_size = 0  # the global crop size
    m.head_out_dim, m.head_hidden_dim, m.head_bottleneck_dim = 64, 32, 16
    config.data.global_size, config.data.local_size = GLOBAL_SIZE, LOCAL_SIZE
    config.data.n_local = N_LOCAL
    config.ssl.prototype_chunk = 0  # the tiny head's 64 prototypes: no chunking
    return config


def get_config() -> ml_collections.ConfigDict:
    c = shrink(base_config())
    c.total_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.batch_size = 16
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.model.layerscale_init = 0.1
    c.model.drop_path_rate = 0.1
    c.model.dtype = "float32"
    c.data.mask_group_size = 2
    c.ssl.koleo_group_size = 2
    c.optim.warmup_steps = 2
    c.optim.freeze_last_layer_steps = 1
    c.teacher.warmup_temperature_steps = 3
    return c

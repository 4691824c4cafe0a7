"""ViT-L/14 with DINOv2's vitl14 training recipe (recipe s2, s4): K=131072, bottleneck 384,
separate iBOT head, Sinkhorn-Knopp centring, drop path 0.4, base lr 2e-4, 625k steps, 100k
warmup, batch 3072, layer decay 1.0, momentum 0.994, wd 0.04 -> 0.2; 224/98 px.

One deliberate difference: the FFN is the GELU MLP of the *released* ViT-L/14 weights
(hub `dinov2_vitl14`), so this config can continue from them. dinov2's vitl14 training config
itself uses a fused SwiGLU FFN; set `--config.model.ffn_layer=swiglu` to train that
architecture from scratch (it cannot load the released weights).

  python -m raddino_jax.main --config=configs/vitl14.py --workdir=gs://BUCKET/runs/l14 \
      --config.data.dir=gs://BUCKET/tfds --config.data.name=NAME --config.mesh.fsdp=8

Use FSDP (mesh fsdp > 1) to fit optimizer state; check memory first with
`python -m raddino_jax.sweep --config=configs/vitl14.py --compile-only`.
"""

from raddino_jax.config import base_config


def get_config():
    c = base_config()
    c.total_steps = 625_000
    c.checkpoint_every = 3_750
    c.batch_size = 3072
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.model.arch = "vit_large"
    c.model.ffn_layer = "mlp"  # the released weights' FFN (see the docstring)
    c.model.drop_path_rate = 0.4
    c.model.dtype = "bfloat16"
    c.model.head_out_dim = 131072
    c.model.head_bottleneck_dim = 384
    c.model.separate_ibot_head = True
    c.model.ibot_out_dim = 131072
    c.model.ibot_bottleneck_dim = 256
    c.ssl.centering = "sinkhorn_knopp"
    c.data.global_size = 224
    c.data.local_size = 98
    c.optim.base_lr = 2e-4
    c.optim.warmup_steps = 100_000
    c.optim.layerwise_decay = 1.0
    c.optim.weight_decay_end = 0.2
    c.teacher.momentum = 0.994
    return c

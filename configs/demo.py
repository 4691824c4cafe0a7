"""Demo: a small ViT pretrained on the built-in samples (real CRs + DICOM phantoms) on CPU.

  python -m raddino_jax.main --config=configs/demo.py --workdir=runs/demo

What to expect on 2 CPU cores: samples generated and built into WORKDIR/builtin (~30 s), one
compile (~30-60 s), then ~1-2 s per step; total under 10 minutes. The loss curve is in
WORKDIR/metrics.jsonl; export the teacher with
`python -m raddino_jax.convert to-hf --checkpoint runs/demo --out runs/demo/hf`.
Everything else is the DINOv2 recipe at toy scale (short schedules, 112/56 px crops).
"""

from raddino_jax.config import base_config


def get_config():
    c = base_config()
    c.total_steps = 150
    c.log_every = 10
    c.checkpoint_every = 50
    c.batch_size = 32
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}

    c.model.arch = "vit_small"
    c.model.embed_dim = 128
    c.model.depth = 4
    c.model.num_heads = 2
    c.model.layerscale_init = 0.1
    c.model.drop_path_rate = 0.0
    c.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
    c.model.head_out_dim = 1024
    c.model.head_hidden_dim = 256
    c.model.head_bottleneck_dim = 64

    c.data.builtin_phantoms = 96
    c.data.builtin_size = 160
    c.data.global_size = 112
    c.data.local_size = 56
    c.data.n_local = 4
    c.data.mask_group_size = 0  # 0: per-device batch, so the demo runs on any device count
    c.ssl.koleo_group_size = 0

    c.optim.base_lr = 5e-3
    c.optim.warmup_steps = 15
    c.optim.freeze_last_layer_steps = 10
    c.optim.layerwise_decay = 1.0
    c.teacher.momentum = 0.99
    c.teacher.warmup_temperature_steps = 50

    c.eval.every = 50
    c.eval.label = "nodule"
    c.eval.max_examples = 256
    return c

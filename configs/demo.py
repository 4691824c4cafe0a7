"""Demo: a small ViT pretrained on the built-in samples (real CRs + DICOM phantoms) on CPU.

  python -m raddino_jax.main --config=configs/demo.py --workdir=runs/demo

`make demo` (scripts/demo.sh) runs this, exports the teacher (`convert to-hf --verify`) and
evaluates it on phantoms drawn with a seed training never saw (2,400 phantoms, ~1,070 held-out
test images) against random init of the same architecture and a pixel-probe reference: kNN
(balanced) accuracy and probe AUROC with paired 95% bootstrap intervals, and a learning curve
(`python -m raddino_jax.evaluate ... --curve`). Results: benchmarks/RESULTS.md ("Issue 23").

What the evaluation shows (benchmarks/RESULTS.md "Issue 23, second session", held-out seed
101, 1,071 test images, training seeds 0 and 1, teacher temperature 0.0025; cells random init
-> teacher, paired 95% interval of the difference):
- nodule: kNN balanced accuracy (k=20) 0.552 -> 0.639 / 0.629 (+0.054..+0.122 /
  +0.045..+0.113), probe AUROC 0.946 -> 0.966 / 0.962 (+0.008..+0.033 / +0.005..+0.028);
- effusion_present: probe AUROC 0.591 -> 0.639 / 0.632 (+0.017..+0.076 / +0.008..+0.074); kNN
  at chance for random init and teacher alike (0.53 -> 0.50);
- effusion (none/left/right): probe AUROC 0.649 -> 0.675 / 0.671 (+0.002..+0.048 /
  -0.001..+0.045); kNN at chance (0.34 -> 0.33).
The effusion was re-drawn in this session (small to moderate, partly opaque, with the
hemidiaphragm height varying in everyone) so that random features no longer solve it (their
probe AUROC was 0.99). So the issue-23 bar (every finding above random init on kNN and probe)
is met for nodules and the effusion_present probe, not for effusion kNN. The teacher entropy
stays at 71-76% of log K (both seeds), under the issue's 80%.
Why the effusion kNN does not move (RESULTS.md "Issue 23, third session"): thirteen one-change
runs (global crops (0.7, 1) or (0.9, 1) without locals, no local crops, no brightness / contrast
jitter or blur, K 32, 600 steps, batch 128, and phantoms with a denser effusion, fixed exposure,
tight positioning, no lung texture or no hemidiaphragm variation) leave it at random init's
level or below while the nodule kNN rises; with the nuisance variation removed, training makes
it significantly worse than random init. The trained CLS responds 3x more than random init to a
nodule-like disc and less to an opacity at the lung base: at this scale DINO + iBOT learns
compact objects and drops a regional opacity, so this config keeps the choices below.

What to expect on 2 CPU cores: 4,000 phantoms generated and built into WORKDIR/builtin, one
compile, 150 steps of 32 (67 img/s measured on a quiet machine with the old phantoms; the
same cost now), while the held-out draw (2,400 phantoms of seed 20261204) is generated and
built in the background; then export and the evaluation (kNN and the probe, coarse C grid, a
kNN-only curve over the checkpoints at steps 30..150). Timed end to end (2026-12-05): 5 min
02 s at load ~2 with temperature 0.01 (trained at 204 s, exported 215 s, evaluated 302 s;
the temperature does not change the cost); with 0.0025 9 min 03 s at load 3.5-7.5. The
issue's 5 minutes are reached, not beaten.
The loss, teacher entropy and student-teacher KL are in WORKDIR/metrics.jsonl.

Why each choice (issue 23; lever table in RESULTS.md):
- model.patch_size 8 at data.global_size 64 / local_size 32 (64 + 16 patch tokens): the same
  token count per crop as the old 112/56 px at patch 14, with phantoms generated and stored at
  64 px (data.builtin_size), so sample generation and decoding are ~4x cheaper and the findings
  (nodule radius 5-8 px) stay visible.
- data.builtin_phantoms 4000: ~1,800 unique training phantoms (the built-in split is 45/10/45
  by patient) instead of 282, each seen ~2.7 times in 150 steps of 32.
- head K 256, hidden 256, bottleneck 64: K <= 2x the global crops per batch (64), the range
  in which Sinkhorn-Knopp does not force every sample over many prototypes.
- ssl.centering sinkhorn_knopp, teacher temperature 0.0025 fixed, 10 iterations: with softmax
  centring at 0.04 the teacher went towards the uniform distribution within 20 steps here
  (94% of log K at step 20, 97% at 60; RESULTS.md run t1), as in the earlier demo sessions;
  Sinkhorn at 0.01 held it at 88-94%. Lower is the lever that works (RESULTS.md lever
  table, new phantoms): 0.005 -> 83-87%, 0.0025 -> 71-76% with the same findings as 0.01 on
  both seeds; K 64 gained little over 0.005 alone.
- teacher.momentum 0.99 (-> 1 over the run, cosine): a 150-step run cannot wait for a 0.992+
  teacher.
- optim.base_lr 2.83e-3 per 1024 (sqrt scaling: peak 5e-4 at batch 32), warm-up 20 steps
  (~13%), last layer frozen 15 steps (10%), layerwise_decay 1.0, patch-embedding lr x1:
  the short-run recipe of the issue; layerscale 0.1, drop path 0, KoLeo 0.05.
- data.flip_p 0 and data.solarize_p 0: the effusion label has a side (left/right), which a
  horizontal flip turns into the other class, and solarisation inverts the intensity that
  defines a fluid level. Measured (B32 vs A32, old phantoms): effusion not learnt either way, nodule
  kNN is a little lower without them (+0.09..+0.15 vs +0.12..+0.18), the nodule probe a little
  higher; kept off because a flip changes the effusion label's meaning.
- global_scale (0.4, 1), local_scale (0.1, 0.4): at 64 / 32 px smaller crops hold no anatomy.
- checkpoint_every 30, keep_checkpoints 10: five checkpoints, all kept, for the evaluation's
  kNN learning curve (`evaluate --curve --curve-tasks knn`: no probe fit per step).
"""

from raddino_jax.config import base_config


def get_config():
    c = base_config()
    c.total_steps = 150
    c.log_every = 10
    c.checkpoint_every = 30
    c.keep_checkpoints = 10  # all of them: the evaluation's learning curve reads every step
    c.batch_size = 32
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}

    c.model.arch = "vit_small"
    c.model.patch_size = 8
    c.model.embed_dim = 128
    c.model.depth = 4
    c.model.num_heads = 2
    c.model.layerscale_init = 0.1
    c.model.drop_path_rate = 0.0
    c.model.dtype = "float32"  # CPUs have no fast bfloat16 matmuls
    c.model.head_out_dim = 256
    c.model.head_hidden_dim = 256
    c.model.head_bottleneck_dim = 64

    c.data.builtin = True  # the built-in samples: real CRs + DICOM phantoms
    c.data.builtin_phantoms = 4000
    c.data.builtin_size = 64  # phantoms are generated and stored at 64 px (shorter side)
    c.data.global_size = 64
    c.data.local_size = 32
    c.data.n_local = 4
    c.data.global_scale = (0.4, 1.0)
    c.data.local_scale = (0.1, 0.4)
    c.data.flip_p = 0.0
    c.data.solarize_p = 0.0
    c.data.mask_group_size = 0  # 0: per-device batch, so the demo runs on any device count
    c.ssl.koleo_group_size = 0
    c.ssl.koleo_weight = 0.05
    c.ssl.centering = "sinkhorn_knopp"
    c.ssl.sinkhorn_iterations = 10

    c.optim.base_lr = 5e-4 / (32 / 1024) ** 0.5  # peak 5e-4 at batch 32 (sqrt scaling)
    c.optim.warmup_steps = 20
    c.optim.freeze_last_layer_steps = 15
    c.optim.layerwise_decay = 1.0
    c.optim.patch_embed_lr_mult = 1.0
    c.teacher.momentum = 0.99
    c.teacher.warmup_temperature = 0.0025
    c.teacher.temperature = 0.0025
    c.teacher.warmup_temperature_steps = 0

    c.eval.every = 0  # the learning curve comes from `evaluate --curve` over the checkpoints
    c.eval.label = "nodule"
    c.eval.max_examples = 512
    return c

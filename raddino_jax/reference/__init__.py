"""The train step in PyTorch: an independent reference for ours.

`raddino_jax.train.step.train_step` written again from the recipe's semantics (docs/recipe.md
s3-s4) in the style of dinov2's own step, checked for equality by `tests/test_step_reference.py`
and timed beside ours by `benchmarks/step_vs_reference.py`. config.py: `ReferenceConfig` (plain
JSON: the torch process never imports JAX); model.py: a DINOv2 ViT with hub names and the DINO
head; step.py: schedules, parameter groups, losses, `ReferenceStep`; compare.py: our step on the
same footing (`OursStep`) and `compare_states`. model.py and step.py import torch (the `torch`
extra); nothing on the training path imports this package.
"""

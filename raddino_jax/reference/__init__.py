"""The train step in PyTorch (eager, float32): an independent reference for ours.

`raddino_jax.train.step.train_step` written again from the recipe's semantics (docs/recipe.md
s3-s4) in the style of dinov2's own step, so the two can be checked for equality
(`tests/test_step_reference.py`) and timed side by side on the same weights and batch
(`benchmarks/step_vs_reference.py`):

- config.py: `ReferenceConfig`, every number of one step as plain JSON (the torch process never
  imports JAX), and `from_config`, which derives it from a raddino_jax config;
- model.py: a hand-written DINOv2 ViT (hub state-dict names) and the weight-normalised DINO head;
- step.py: dinov2's schedules, parameter groups, losses and `ReferenceStep`;
- compare.py: our compiled step on the same footing (`OursStep`), and `compare_states`.

model.py and step.py import torch (the `torch` extra); nothing on the training path imports
this package.
"""

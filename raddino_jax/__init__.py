"""raddino_jax: RAD-DINO-style (DINOv2 recipe) self-supervised pretraining in JAX/Flax."""

__version__ = "0.1.0"

"""Public loss names of the SSL objective, re-exported from :mod:`raddino_jax.ssl.losses`."""

from raddino_jax.ssl.losses import (
    dino_loss,
    entropy,
    ibot_loss,
    koleo_loss,
    koleo_loss_grouped,
    mean_kl_divergence,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
    update_center,
)

__all__ = [
    "dino_loss",
    "entropy",
    "ibot_loss",
    "koleo_loss",
    "koleo_loss_grouped",
    "mean_kl_divergence",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
    "update_center",
]

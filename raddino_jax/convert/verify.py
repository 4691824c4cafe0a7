"""Reload exported weights in PyTorch and compare outputs with the JAX model (`--verify`).

Needs torch and transformers (requirements-test.txt); the export itself does not.
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath

from raddino_jax.convert import from_torch, names
from raddino_jax.convert.to_torch import backbone_to_dinov2
from raddino_jax.models import ModelSpec, bind

# Parity target of the conversion, recipe s9 (HF's own conversion script asserts 1e-3 on CLS);
# we hold float32 exports to a much tighter bound.
VERIFY_ATOL = 1e-4


def jax_last_hidden_state(spec: ModelSpec, params: dict, images: np.ndarray) -> np.ndarray:
    """Normed token sequence [B, 1 + R + h*w, D] (= HF `last_hidden_state`) for NHWC images."""
    spec = spec.replace(backbone=spec.backbone.replace(dtype="float32"))

    @jax.jit
    def forward(p, x):
        out = bind(spec, p).backbone(x)
        return jax.numpy.concatenate(
            [out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]],
            axis=1,
        )

    with jax.default_matmul_precision("highest"):
        return np.asarray(forward(params, images))


def torch_last_hidden_state(model, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        pixel_values = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return model(pixel_values=pixel_values).last_hidden_state.numpy()


def random_images(spec: ModelSpec, batch: int = 2, seed: int = 0) -> np.ndarray:
    size = spec.backbone.img_size
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, size, size, spec.backbone.in_chans)).astype(np.float32)


def verify_hf_folder(folder: str | epath.Path, spec: ModelSpec, params: dict) -> float:
    """Strict-load the folder with `AutoModel.from_pretrained`; return max |torch - jax|."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise names.ConversionError(
            f"transformers did not load {folder} cleanly",
            missing=info.get("missing_keys", []),
            unexpected=info.get("unexpected_keys", []),
            misshaped=[str(m) for m in info.get("mismatched_keys", [])],
        )
    model.eval()
    images = random_images(spec)
    torch_out = torch_last_hidden_state(model, images)
    diff = float(np.abs(torch_out - jax_last_hidden_state(spec, params, images)).max())
    if not diff <= VERIFY_ATOL:
        raise AssertionError(f"{folder}: torch and JAX outputs differ by {diff:.3g} > "
                             f"{VERIFY_ATOL}")
    return diff


def verify_dinov2_file(path: str | epath.Path, spec: ModelSpec, params: dict) -> float:
    """Re-import the hub-layout file strictly (bit-identical tensors demanded), then run it through
    transformers (via a temporary folder) and compare with the JAX model."""
    import tempfile

    from raddino_jax.checkpoint import Preprocessing
    from raddino_jax.convert.to_torch import write_hf

    reread = from_torch.load_tensor_file(path)
    original = backbone_to_dinov2(params)
    if set(reread) != set(original):
        raise names.ConversionError(
            f"{path} does not round-trip",
            missing=sorted(set(original) - set(reread)),
            unexpected=sorted(set(reread) - set(original)),
        )
    for key, value in original.items():
        if not np.array_equal(reread[key], value):
            raise AssertionError(f"{path}: tensor {key} changed in the round trip")
    _, reimported = from_torch.read_torch_weights(path, num_heads=spec.backbone.num_heads)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(tmp, spec, reimported, Preprocessing(image_size=spec.backbone.img_size))
        # transformers interpolates nothing at the native size, so all interpolate modes agree.
        return verify_hf_folder(tmp, spec, params)

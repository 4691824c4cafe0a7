"""Backbone forward+backward time on CPU: ours (jax.jit) vs transformers `Dinov2Model` (eager).

Both sides compute loss = sum(last_hidden_state ** 2) (the final-LayerNorm'd CLS + patch
tokens) and its gradient w.r.t. every backbone parameter, in float32, on identical weights:
a randomly initialised HF model is `save_pretrained` into a temporary folder and imported with
`convert.from_torch.read_torch_weights`; forward outputs and a few gradients are compared
before anything is timed.

Both frameworks get the same n cores (`harness.pin_threads`, default n = os.cpu_count());
`--xla-flags` are appended to $XLA_FLAGS so each variant can be tried. After warm-up
(compilation, allocator), rounds alternate ours / torch (`harness.interleaved`). Reported:
median and min..max over rounds, the median (and range) of the per-round ratio ours/torch, and
the ratio of the minima (the least-disturbed samples).

Run: PYTHONPATH=. .venv/bin/python benchmarks/model_vs_torch.py [--archs vit_small vit_base]
     [--batch 8] [--size 224] [--rounds 7] [--threads N] [--attention-impls default xla einsum]
     [--xla-flags "..."] [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import harness


def build_models(arch: str, size: int, folder: str):
    """Random HF Dinov2Model (eval, float32) and our (spec, backbone params) with its weights.

    Every LayerNorm gets a random affine map (weight 1 + 0.2 N, bias 0.2 N): with the default
    (1, 0) the loss sum(LN(x) ** 2) is constant (every normed token has squared norm D), so all
    gradients below the final norm would be rounding noise and the agreement check meaningless.
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from raddino_jax.convert.from_torch import read_torch_weights
    from raddino_jax.models.vit import ARCHS

    arch_cfg = ARCHS[arch]
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=arch_cfg["embed_dim"],
        num_hidden_layers=arch_cfg["depth"],
        num_attention_heads=arch_cfg["num_heads"],
        image_size=size,
        patch_size=14,
        layerscale_value=1.0,
    )
    hf = Dinov2Model(config).eval()  # default attention: torch SDPA
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in hf.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
    hf.save_pretrained(folder)
    spec, params = read_torch_weights(folder)
    return hf, spec, params["backbone"]


def jax_step(spec, attention_impl: str):
    """jit(value_and_grad) of sum(last_hidden_state**2) w.r.t. the backbone params (pure dict);
    `attention_impl` 'default' keeps the spec's, 'None'/'auto' is the platform's choice."""
    import jax
    import jax.numpy as jnp

    from raddino_jax.models import bind

    backbone = spec.backbone
    if attention_impl != "default":
        impl = "" if attention_impl in ("None", "auto") else attention_impl
        backbone = backbone.replace(attention_impl=impl)
    backbone_spec = spec.replace(backbone=backbone, dino_head=None, ibot_head=None)

    def loss(params, images):
        out = bind(backbone_spec, {"backbone": params}).backbone(images)
        hidden = jnp.concatenate([out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1)
        return jnp.sum(jnp.square(hidden)), hidden

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), backbone.attention_impl


def torch_step(model):
    """Eager forward + backward of sum(last_hidden_state**2); returns (loss, hidden)."""

    def step(pixel_values):
        model.zero_grad(set_to_none=True)
        hidden = model(pixel_values=pixel_values).last_hidden_state
        loss = hidden.square().sum()
        loss.backward()
        return loss, hidden

    return step


def agreement(ours, params, theirs, torch_model, images_nhwc) -> dict[str, float]:
    """Max |ours - torch| of the hidden states and of three gradients (relative to their max)."""
    import numpy as np
    import torch

    (_, hidden), grads = ours(params, images_nhwc)
    _, t_hidden = theirs(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()))
    sd = dict(torch_model.named_parameters())
    pairs = {
        "grad fc1 (block 0)": (grads["blocks"][0]["mlp"]["fc1"]["kernel"],
                               sd["encoder.layer.0.mlp.fc1.weight"].grad.T),
        "grad patch bias": (grads["patch_embed"]["proj"]["bias"],
                            sd["embeddings.patch_embeddings.projection.bias"].grad),
        "grad final norm": (grads["norm"]["scale"], sd["layernorm.weight"].grad),
    }  # fmt: skip
    report = {"hidden max abs": float(np.abs(np.asarray(hidden) - t_hidden.detach().numpy()).max())}
    for name, (mine, ref) in pairs.items():
        ref = ref.detach().numpy()
        report[name + " (rel)"] = float(np.abs(np.asarray(mine) - ref).max() / np.abs(ref).max())
    return report


def run_arch(args, arch: str) -> dict[str, list[float]]:
    """Seconds per round of each ours[attention_impl] variant and of torch."""
    import jax
    import numpy as np
    import torch

    with tempfile.TemporaryDirectory() as folder:
        hf, spec, params = build_models(arch, args.size, folder)
    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3))
    images = images.astype(np.float32)
    theirs = torch_step(hf)
    images_jax = jax.device_put(images)
    images_torch = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    fns = {}
    for name in args.attention_impls:
        ours, impl = jax_step(spec, name)
        report = agreement(ours, params, theirs, hf, images)
        print(f"{arch} ours[{name}] (attention_impl={impl!r}) vs torch: "
              + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))  # fmt: skip
        if report["hidden max abs"] > 1e-4:
            raise SystemExit(f"{arch}: outputs disagree, not timing")
        fns[f"ours[{name}]"] = lambda s=ours: jax.block_until_ready(s(params, images_jax))
    fns["torch"] = lambda: theirs(images_torch)
    times = harness.interleaved(fns, args.rounds, args.warmup)
    if args.profile:
        with jax.profiler.trace(os.path.join(args.profile, arch)):
            for _ in range(2):
                next(iter(fns.values()))()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["vit_small", "vit_base"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--attention-impls", nargs="+", default=["default"],
                   help="ViTConfig.attention_impl values of ours, interleaved in one process "
                   "('default' keeps the config default, 'None' is None)")  # fmt: skip
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the jax side")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of ours here")
    args = p.parse_args(argv)
    harness.pin_threads(args.threads, args.xla_flags)
    harness.torch_threads(args.threads)
    import jax  # noqa: F401  (after the pinning; its version goes into the header)

    print(harness.machine_header())
    print(f"batch {args.batch}, {args.size} px, {args.rounds} rounds after {args.warmup} warm-up")
    rows = []
    for arch in args.archs:
        times = run_arch(args, arch)
        for name, ts in times.items():
            ours = name != "torch"
            ratio = f"{harness.paired(ts, times['torch'])['of_mins']:.2f}" if ours else "-"
            paired = harness.format_paired(ts, times["torch"]) if ours else "-"
            rows.append([arch, name, harness.spread(ts), paired, ratio])
    header = ["arch", "variant", "median (min..max) s", "ours/torch paired median (range)",
              "ratio of mins"]  # fmt: skip
    print(harness.markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Backbone and heads: sizes, torch-exact interpolation, masking, drop path, remat, bf16, heads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from raddino_jax.convert import names
from raddino_jax.models import ModelSpec, bind, init_params
from raddino_jax.models.attention import einsum_attention, splash_attention
from raddino_jax.models.heads import DINOHead, HeadConfig
from raddino_jax.models.interpolate import resample_grid
from raddino_jax.models.vit import DinoVisionTransformer, drop_path, vit_config


def count_params(module: nnx.Module) -> int:
    """Scalar parameters of an NNX module (shapes only: works on `nnx.eval_shape` modules)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=56, layerscale_init=0.5)


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("vit_small", 22_056_576),
        ("vit_base", 86_580_480),
        ("vit_large", 304_368_640),
        ("vit_giant2", 1_136_480_768),
    ],
)
def test_param_counts_match_recipe(arch, expected):
    # recipe s1: 22.06M / 86.58M / 304.37M / 1136.5M at 518 px (pos 37x37), mask token included
    model = nnx.eval_shape(lambda: DinoVisionTransformer(vit_config(arch), rngs=nnx.Rngs(0)))
    assert count_params(model) == expected


def test_dino_head_param_count():
    # recipe s2: one RAD-DINO head (768 -> 2048 -> 2048 -> 256 -> 65536) has 23,138,560 params
    head = nnx.eval_shape(lambda: DINOHead(HeadConfig(), rngs=nnx.Rngs(0)))
    assert count_params(head) == 23_138_560


@pytest.mark.parametrize("m, out_hw", [(37, (7, 7)), (37, (16, 16)), (16, (37, 37)), (16, (5, 9))])
@pytest.mark.parametrize("mode", ["offset", "size", "size_antialias"])
def test_interpolation_matches_torch(m, out_hw, mode):
    grid = np.random.default_rng(0).standard_normal((m, m, 6)).astype(np.float32)
    t = torch.from_numpy(grid).permute(2, 0, 1)[None]
    if mode == "offset":  # original dinov2 call (recipe s1)
        ref = F.interpolate(
            t, scale_factor=((out_hw[0] + 0.1) / m, (out_hw[1] + 0.1) / m), mode="bicubic"
        )
    else:
        ref = F.interpolate(
            t, size=out_hw, mode="bicubic", align_corners=False, antialias=mode == "size_antialias"
        )
    ref = ref[0].permute(1, 2, 0).numpy()
    ours = np.asarray(resample_grid(jnp.asarray(grid), out_hw, mode))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_interpolation_modes_differ_off_native_size():
    grid = np.random.default_rng(1).standard_normal((16, 16, 4)).astype(np.float32)
    a, b = resample_grid(grid, (7, 7), "offset"), resample_grid(grid, (7, 7), "size")
    assert np.abs(a - b).max() > 1e-3


def _tiny_model(**overrides):
    cfg = vit_config("vit_small", **{**TINY, **overrides})
    return DinoVisionTransformer(cfg, rngs=nnx.Rngs(0))


def test_mask_token_replaces_patch_embedding_before_pos_embed():
    model = _tiny_model()
    model.mask_token[...] = jax.random.normal(jax.random.key(3), (1, 32))
    x = jax.random.normal(jax.random.key(0), (2, 56, 56, 3))
    masks = jnp.zeros((2, 16), bool).at[0, 3].set(True).at[1, 7].set(True)
    tokens = model.prepare_tokens(x, masks)
    pos = model.pos_embed[...]
    np.testing.assert_allclose(tokens[0, 1 + 3], model.mask_token[0] + pos[0, 1 + 3], atol=1e-6)
    np.testing.assert_allclose(tokens[1, 1 + 7], model.mask_token[0] + pos[0, 1 + 7], atol=1e-6)
    unmasked = model.prepare_tokens(x)
    np.testing.assert_array_equal(tokens[0, 5], unmasked[0, 5])


def test_registers_sit_after_cls_without_pos_embed():
    model = _tiny_model(num_register_tokens=3)
    x = jax.random.normal(jax.random.key(0), (1, 56, 56, 3))
    tokens = model.prepare_tokens(x)
    assert tokens.shape == (1, 1 + 3 + 16, 32)
    np.testing.assert_array_equal(tokens[0, 1:4], model.register_tokens[0])
    out = model(x)
    assert out["x_norm_regtokens"].shape == (1, 3, 32)
    assert out["x_norm_patchtokens"].shape == (1, 16, 32)


def test_non_square_and_bad_sizes():
    model = _tiny_model()
    out = model(jnp.ones((1, 42, 70, 3)))
    assert out["x_norm_patchtokens"].shape == (1, 3 * 5, 32)
    with pytest.raises(ValueError, match="multiple of patch size"):
        model(jnp.ones((1, 40, 56, 3)))


def test_intermediate_layers_like_dinov2():
    model = _tiny_model()
    x = jax.random.normal(jax.random.key(1), (2, 56, 42, 3))
    layers = model.get_intermediate_layers(x, n=2, reshape=True)
    out = model(x)
    assert len(layers) == 2
    patch, cls = layers[-1]
    assert patch.shape == (2, 4, 3, 32)
    np.testing.assert_allclose(cls, out["x_norm_clstoken"], atol=1e-6)
    np.testing.assert_allclose(patch.reshape(2, 12, 32), out["x_norm_patchtokens"], atol=1e-6)
    # the first of the two is the output of block 0, not the last one
    assert np.abs(np.asarray(layers[0][1] - cls)).max() > 1e-3


def test_drop_path_is_per_sample_and_unbiased():
    x = jnp.ones((4000, 3))
    y = drop_path(x, 0.3, jax.random.key(0))
    kept = np.asarray(y[:, 0] != 0)
    assert abs(kept.mean() - 0.7) < 0.03
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    yy = np.asarray(y)
    assert np.all(yy == yy[:, :1])  # whole sample kept or dropped
    np.testing.assert_array_equal(drop_path(x, 0.3, None), x)


def test_drop_path_only_with_key():
    model = _tiny_model(drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (8, 28, 28, 3))
    a = model(x)["x_prenorm"]
    np.testing.assert_array_equal(a, model(x)["x_prenorm"])  # teacher / eval: deterministic
    b = model(x, drop_path_key=jax.random.key(1))["x_prenorm"]
    assert np.abs(np.asarray(a - b)).max() > 1e-4


def _backbone_grads(spec, params, x, drop_path_key=None, n_last_blocks=0):
    def loss(p):
        out = bind(spec, p).backbone(x, drop_path_key=drop_path_key, n_last_blocks=n_last_blocks)
        extra = sum(jnp.sum(t**3) for t in out["intermediates"])
        return jnp.sum(out["x_norm_clstoken"] ** 2) + jnp.sum(out["x_prenorm"] ** 3) * 1e-3 + extra

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots", True])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_and_scan_give_identical_values_and_grads(remat, scan):
    """Every remat policy, with and without the scan over blocks, equals the plain loop."""
    spec = ModelSpec(vit_config("vit_small", **{**TINY, "depth": 3, "drop_path_rate": 0.2}))
    variant = spec.replace(backbone=spec.backbone.replace(remat=remat, scan_blocks=scan))
    params = init_params(spec, 0)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))
    key = jax.random.key(3)
    for n_last in (0, 1):
        v1, g1 = _backbone_grads(spec, params, x, key, n_last)
        v2, g2 = _backbone_grads(variant, params, x, key, n_last)
        np.testing.assert_allclose(v1, v2, rtol=1e-6)
        assert jax.tree.structure(g1) == jax.tree.structure(g2)  # same parameter layout
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            # This loss is ill-conditioned (x**3 terms): a 1e-7 relative change of the input
            # moves some gradients by 1.8e-4 of their largest entry, so the scanned program
            # (which XLA fuses differently) is compared at 5e-4 of each gradient's scale.
            np.testing.assert_allclose(a, b, atol=5e-4 * float(np.abs(a).max()) + 1e-7)


def test_remat_spellings():
    assert vit_config("vit_small", remat=True).remat == "full"
    assert vit_config("vit_small", remat=False).remat == "none"
    assert vit_config("vit_small", remat="True").remat == "full"
    with pytest.raises(ValueError, match="remat must be one of"):
        vit_config("vit_small", remat="sometimes")


def test_attention_is_chosen_by_the_lowering_platform():
    spec = ModelSpec(vit_config("vit_small", **{**TINY, "dtype": "bfloat16"}))
    assert spec.for_platform("tpu").backbone.attention_impl == "splash"
    assert spec.for_platform("gpu").backbone.attention_impl == "cudnn"
    assert spec.for_platform("cpu").backbone.attention_impl == "einsum"
    # cuDNN's fused attention takes 16-bit inputs only: a float32 model on GPU gets XLA's.
    f32 = spec.replace(backbone=spec.backbone.replace(dtype="float32"))
    assert f32.for_platform("gpu").backbone.attention_impl == "xla"
    assert f32.for_platform("tpu").backbone.attention_impl == "splash"
    forced = spec.replace(backbone=spec.backbone.replace(attention_impl="xla"))
    assert forced.for_platform("tpu").backbone.attention_impl == "xla"
    # Lean backward passes: off on TPU (autodiff compiled 1.4% faster there at equal memory).
    assert spec.for_platform("tpu").backbone.lean_backward == "off"
    assert spec.for_platform("cpu").backbone.lean_backward == "on"
    assert spec.for_platform("gpu").backbone.lean_backward == "on"
    lean = spec.replace(backbone=spec.backbone.replace(lean_backward="on"))
    assert lean.for_platform("tpu").backbone.lean_backward == "on"
    with pytest.raises(ValueError, match="lean_backward"):
        spec.backbone.replace(lean_backward="yes")


def test_lean_and_autodiff_backward_agree():
    """The backbone with the lean backward passes and with autodiff's: same values, same
    gradients (float32, to 1e-5 of the largest gradient; measured 6e-7 of it)."""
    cfg = vit_config("vit_small", **TINY)
    x = jax.random.normal(jax.random.key(0), (2, 56, 56, 3))
    w = jax.random.normal(jax.random.key(1), (2, 16, cfg.embed_dim))  # a well-conditioned loss
    results = []
    for mode in ("on", "off"):
        spec = ModelSpec(cfg.replace(lean_backward=mode, attention_impl="einsum"))
        params = init_params(spec, 0)

        def loss(p, spec=spec):
            out = bind(spec, p).backbone(x)
            return jnp.sum(out["x_norm_patchtokens"] * w) + jnp.sum(out["x_norm_clstoken"])

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v_on, g_on), (v_off, g_off) = results
    np.testing.assert_allclose(v_on, v_off, rtol=1e-6)
    # Absolute tolerance on the scale of the largest gradient: small leaves such as the cls
    # token's are sums that cancel, so their float32 reassociation error is absolute (2.5e-5
    # measured against a largest entry of 41.6).
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(g_off))
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)


@pytest.mark.parametrize("tokens,multiple", [(257, 2), (50, 2), (257, 64)])
def test_padded_attention_equals_einsum(tokens, multiple):
    """The padding cuDNN needs (tokens to an even count, padded keys masked by
    key_value_seq_lengths, padded query rows dropped) changes nothing: checked through
    jax.nn.dot_product_attention's XLA path, which takes the same arguments, on CPU. f32,
    value and gradient to 2e-6 (measured <= 7e-7)."""
    from raddino_jax.models.attention import einsum_attention, padded_dot_product_attention

    qkv = jax.random.normal(jax.random.key(tokens), (2, tokens, 3, 4, 16), jnp.float32)
    grad_out = jax.random.normal(jax.random.key(1), (2, tokens, 4, 16), jnp.float32)
    got, got_vjp = jax.vjp(lambda t: padded_dot_product_attention(t, "xla", multiple), qkv)
    want, want_vjp = jax.vjp(einsum_attention, qkv)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(got_vjp(grad_out)[0], want_vjp(grad_out)[0], atol=2e-6)


@pytest.mark.parametrize("tokens", [130, 256])
def test_splash_attention_equals_einsum(tokens):
    """The Pallas TPU splash kernel (run by the Pallas interpreter on CPU), with its padding
    to 128-token blocks, equals the einsum path in value and gradient: float32 and bfloat16."""
    qkv = jax.random.normal(jax.random.key(0), (2, tokens, 3, 2, 64), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(1), (2, tokens, 2, 64), jnp.float32)

    def grads(fn, dtype):
        def loss(t):
            return jnp.sum(fn(t.astype(dtype)).astype(jnp.float32) * cotangent)

        return jax.value_and_grad(loss)(qkv)

    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)):
        ref_value, ref_grad = grads(einsum_attention, dtype)
        value, grad = grads(functools.partial(splash_attention, interpret=True), dtype)
        scale = float(jnp.abs(ref_value)) + 1.0
        assert abs(float(value - ref_value)) / scale < tol
        np.testing.assert_allclose(grad, ref_grad, atol=tol * 4, rtol=tol * 4)


def test_bfloat16_compute_close_to_float32():
    """bf16 compute (params stay fp32) vs fp32 on the same weights.

    Stated tolerance: on normed tokens (unit scale) mean |diff| < 2e-2, max |diff| < 0.15;
    cosine similarity of CLS features > 0.999.
    """
    spec = ModelSpec(vit_config("vit_small", **{**TINY, "layerscale_init": 1.0}))
    params = init_params(spec, 0)
    spec16 = spec.replace(backbone=spec.backbone.replace(dtype="bfloat16"))
    x = jax.random.normal(jax.random.key(0), (4, 56, 56, 3))
    out32 = jax.jit(lambda p: bind(spec, p).backbone(x))(params)
    out16 = jax.jit(lambda p: bind(spec16, p).backbone(x))(params)
    assert out16["x_norm_patchtokens"].dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    a = np.asarray(out32["x_norm_patchtokens"], np.float32)
    b = np.asarray(out16["x_norm_patchtokens"], np.float32)
    assert np.abs(a - b).mean() < 2e-2 and np.abs(a - b).max() < 0.15
    c32 = np.asarray(out32["x_norm_clstoken"], np.float32)
    c16 = np.asarray(out16["x_norm_clstoken"], np.float32)
    cos = (c32 * c16).sum(-1) / np.linalg.norm(c32, axis=-1) / np.linalg.norm(c16, axis=-1)
    assert cos.min() > 0.999


class TorchDINOHead(torch.nn.Module):
    """Independent reference of dinov2's DINOHead (recipe s2), weight-normalised last layer."""

    def __init__(self, din, k, hidden, bottleneck):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(din, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, bottleneck),
        )
        self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck, k, bias=False))

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12)
        return self.last_layer(x)


def test_dino_head_matches_torch_reference():
    torch.manual_seed(0)
    ref = TorchDINOHead(16, 40, 24, 8)
    with torch.no_grad():
        ref.last_layer.weight_g.uniform_(0.5, 2.0)  # g trains in DINOv2: make it non-trivial
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg = HeadConfig(in_dim=16, out_dim=40, hidden_dim=24, bottleneck_dim=8)
    head = DINOHead(cfg, rngs=nnx.Rngs(0))
    expected = {
        k: v.shape for k, v in names.flatten(nnx.state(head, nnx.Param).to_pure_dict()).items()
    }
    flat = names.torch_to_ours(state, expected, names.HEAD_RULES, "head")
    nnx.state(head, nnx.Param).replace_by_pure_dict(names.unflatten(flat))
    graphdef, st = nnx.split(head)
    st.replace_by_pure_dict(names.unflatten(flat))
    head = nnx.merge(graphdef, st)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(head(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # and back: exported names and values are the torch ones
    back = names.ours_to_torch(flat, names.HEAD_RULES)
    assert set(back) == set(state)
    for key in state:
        np.testing.assert_array_equal(back[key], state[key])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_implementations_agree(dtype):
    """The CPU default (hand-written einsum softmax) equals jax.nn.dot_product_attention."""
    spec = ModelSpec(vit_config("vit_small", **{**TINY, "dtype": dtype}))
    params = init_params(spec, 0)
    x = jax.random.normal(jax.random.key(2), (2, 56, 42, 3))
    outs = {}
    for impl in ("einsum", "xla"):
        s = spec.replace(backbone=spec.backbone.replace(attention_impl=impl))
        outs[impl] = np.asarray(
            jax.jit(lambda p, s=s: bind(s, p).backbone(x)["x_prenorm"])(params), np.float32
        )
    atol = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(outs["einsum"], outs["xla"], atol=atol)


def test_head_last_layer_accumulates_and_returns_float32():
    """bf16 operands, float32 accumulation and output: the logits feed a 0.04-temperature
    softmax and are not rounded to bfloat16 (issue 14)."""
    from raddino_jax.models.heads import WeightNormLinear

    layer = WeightNormLinear(16, 64, jnp.bfloat16, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.float32)
    out = layer(x)
    assert out.dtype == jnp.float32
    v = layer.weight_v[...]
    kernel = (v * (layer.weight_g[...] / jnp.linalg.norm(v, axis=0))).astype(jnp.bfloat16)
    exact = jnp.einsum(
        "bnd,dk->bnk", x.astype(jnp.bfloat16), kernel, preferred_element_type=jnp.float32
    )
    np.testing.assert_array_equal(out, exact)
    assert np.any(np.asarray(out) != np.asarray(out.astype(jnp.bfloat16), np.float32))

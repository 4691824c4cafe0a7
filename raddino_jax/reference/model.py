"""The reference's model in PyTorch: a DINOv2 ViT with the hub's state-dict names
(`blocks.<i>.attn.qkv`, `ls1.gamma`, ..., so `raddino_jax.convert.to_torch` exports load with
strict names) and a DINO head whose last layer is weight-normalised (weight_g / weight_v, as
`torch weight_norm`). Attention is `F.scaled_dot_product_attention`, as dinov2's current
Attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raddino_jax.reference.config import ReferenceConfig

# F.normalize eps of dinov2's DINO head.
HEAD_NORMALIZE_EPS = 1e-12


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Fused qkv (rows q | k | v, heads contiguous) + output projection, scale hd^-0.5."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, hd] each
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: x += LS1(Attn(LN1 x)); x += LS2(MLP(LN2 x)) (no drop path)."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=p, stride=p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, h*w, D] tokens in row-major patch order."""
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINOv2 backbone: tokens [cls, patches]; masked patches become `mask_token` before the
    positional embedding, which is resampled for other grids with dinov2's offset bicubic."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

    def positional_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, 1 + h*w, D]: the stored grid, or its bicubic resampling with scale factors
        (h + offset) / M, (w + offset) / M (the coordinate map follows the factor)."""
        m = self.cfg.grid_size
        if (grid_h, grid_w) == (m, m):
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        offset = self.cfg.interpolate_offset
        resampled = F.interpolate(
            grid,
            scale_factor=((grid_h + offset) / m, (grid_w + offset) / m),
            mode="bicubic",
            antialias=False,
        )
        if resampled.shape[-2:] != (grid_h, grid_w):
            raise ValueError(f"offset interpolation gave {tuple(resampled.shape[-2:])}")
        patch = resampled.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C, H, W] (+ bool masks [B, h*w]) -> (normed CLS [B, D], normed patch
        tokens [B, h*w, D])."""
        batch, _, height, width = images.shape
        p = self.cfg.patch_size
        tokens = self.patch_embed(images)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), tokens)
        cls = self.cls_token.expand(batch, -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.positional_embedding(
            height // p, width // p
        )
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        return normed[:, 0], normed[:, 1:]


class WeightNormLinear(nn.Module):
    """y = x W^T with W = g * v / ||v|| (one norm per output row, torch weight_norm dim=0)."""

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(dout, 1))
        self.weight_v = nn.Parameter(torch.zeros(dout, din))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (GELU between layers; torch Sequential indices 0, 2, 4) -> L2 normalise ->
    weight-normalised Linear(bottleneck -> K) without bias."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        dims = (
            [cfg.embed_dim]
            + [cfg.head_hidden_dim] * (cfg.head_nlayers - 1)
            + [cfg.head_bottleneck_dim]
        )
        layers: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(din, dout))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(cfg.head_bottleneck_dim, cfg.head_out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=HEAD_NORMALIZE_EPS)
        return self.last_layer(x)


class SSLModel(nn.Module):
    """Student or teacher: `backbone` and `dino_head` (state-dict names "backbone.*", ...)."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.backbone = VisionTransformer(cfg)
        self.dino_head = DINOHead(cfg)

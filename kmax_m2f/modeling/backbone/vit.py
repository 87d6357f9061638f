"""Plain Vision Transformer backbone (Dosovitskiy et al., ICLR 2021), as StructToken uses it.

Module and parameter names follow mmsegmentation 0.x's ``VisionTransformer``, the backbone of
the official StructToken code (RockeyCoss/StructToken), so its checkpoints' ``backbone.*`` keys
map one to one (the ViT checkpoints it starts from are the AugReg / Segmenter ViTs converted to
these names):

- ``cls_token`` [1, 1, C], ``pos_embed`` [1, 1 + (img / patch)^2, C];
- ``patch_embed.projection``: the patch x patch / patch convolution;
- ``layers.{i}.{ln1, attn.attn, ln2, ffn.layers.0.0, ffn.layers.1}``: pre-norm encoder layers,
  ``attn.attn`` being a ``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``out_proj``);
- ``ln1``: the final LayerNorm, only with ``final_norm`` (StructToken's configs leave it off).

The output is the last layer's patch tokens (the class token dropped) as a [B, C, h, w] map at
stride ``patch_size``.

detectron2's own ``ViT`` (ViTDet) is not used: its parameters have timm's names and its forward
has no class token, which takes part in the official model's attention.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torchvision.ops import StochasticDepth

__all__ = ["D2VisionTransformer", "VisionTransformer", "resize_pos_embed"]

OUT_FEATURE = "last_feat"  # detectron2's ViT names its stride-16 output the same way


def resize_pos_embed(
    pos_embed: torch.Tensor, grid_size: tuple[int, int], pos_grid_size: tuple[int, int], mode: str
) -> torch.Tensor:
    """Resample the patch part of ``pos_embed`` [1, 1 + P_h * P_w, C] (the class token's entry
    first) from a ``pos_grid_size`` grid to ``grid_size``; the class token's entry is kept.

    Returns [1, 1 + h * w, C].

    detectron2's ``get_abs_pos`` does the same for square grids, in bicubic only, and drops the
    class token's entry; ``MODEL.VIT.IMG_SIZE`` may be [H, W] and the mode is configurable."""
    if tuple(grid_size) == tuple(pos_grid_size):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    channels = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, *pos_grid_size, channels).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid_size, mode=mode, align_corners=False)
    return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. Inputs whose size is not a multiple of the patch are
    zero-padded at the bottom / right first (mmseg's "corner" padding)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C_in, H, W] -> tokens [B, h * w, C] and (h, w) = ceil((H, W) / patch)."""
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.patch_size, 0, -height % self.patch_size))
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class MultiheadSelfAttention(nn.Module):
    """Self-attention with a residual through stochastic depth; ``attn`` is the torch module."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=attn_drop, bias=qkv_bias, batch_first=True)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """x (normalised) and identity [B, N, C] -> identity + attention(x), [B, N, C]."""
        attended = self.attn(x, x, x, need_weights=False)[0]
        return identity + self.drop_path(self.proj_drop(attended))


class FFN(nn.Module):
    """Linear -> GELU -> Linear with a residual through stochastic depth (``layers.0.0`` and
    ``layers.1`` hold the weights, as in mmcv's FFN)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float, drop_path: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(drop)),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(drop),
        )
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """x (normalised) and identity [B, N, C] -> identity + FFN(x), [B, N, C]."""
        return identity + self.drop_path(self.layers(x))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm encoder layer: x + attn(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float, norm_eps: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiheadSelfAttention(dim, num_heads, qkv_bias, attn_drop, drop, drop_path)
        self.ln2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = FFN(dim, int(dim * mlp_ratio), drop, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        x = self.attn(self.ln1(x), identity=x)
        return self.ffn(self.ln2(x), identity=x)


class VisionTransformer(nn.Module):
    """ViT encoder: patch embedding, class token, learnt position embedding (resampled when the
    patch grid differs from the one it was built for), ``depth`` encoder layers."""

    def __init__(
        self,
        *,
        img_size: Sequence[int] = (512, 512),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        with_cls_token: bool = True,
        final_norm: bool = False,
        norm_eps: float = 1e-6,
        interpolate_mode: str = "bicubic",
    ) -> None:
        """
        Args:
            img_size: (H, W) the position embedding is built for (one entry per patch).
            patch_size: side of the square patches, the output stride.
            in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT sizes.
            drop_rate: dropout after the position embedding and in attention / FFN outputs.
            attn_drop_rate: dropout on the attention weights.
            drop_path_rate: stochastic depth of the last layer; linear from 0 over the layers.
            with_cls_token: prepend a learnt class token (it takes part in attention; it is
                dropped from the output).
            final_norm: a LayerNorm (``ln1``) on the last layer's output.
            norm_eps: the LayerNorms' epsilon.
            interpolate_mode: how the position embedding is resampled to other patch grids.
        """
        super().__init__()
        if len(img_size) != 2 or any(s % patch_size for s in img_size):
            raise ValueError(f"img_size must be (H, W), multiples of patch_size {patch_size}; got {tuple(img_size)}")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.pos_grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.with_cls_token = with_cls_token
        self.interpolate_mode = interpolate_mode
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.pos_grid_size[0] * self.pos_grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.drop_after_pos = nn.Dropout(drop_rate)
        drop_path_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate, norm_eps)
            for rate in drop_path_rates
        )
        self.ln1 = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else None
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT's initialisation (timm / mmseg): truncated normal for the embeddings and linear
        # layers, LeCun-style fan-in normal for the patch projection.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.kaiming_normal_(self.patch_embed.projection.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(self.patch_embed.projection.bias)

    def forward_tokens(
        self, x: torch.Tensor, keep_index: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C_in, H, W] normalised images -> patch tokens [B, N, C] of the last layer (after
        ``ln1`` when there is one; the class token dropped) and the patch grid (h, w).

        ``keep_index`` [B, N] (raster indices into the h x w grid) keeps only those patches after
        the position embedding is added, so that the encoder sees a subset that still knows where
        it sits (LOCA's token dropping); the output is then [B, N, C] in ``keep_index``'s order.
        Without it, N = h * w.
        """
        tokens, grid_size = self.patch_embed(x)
        pos_embed = resize_pos_embed(self.pos_embed, grid_size, self.pos_grid_size, self.interpolate_mode)
        tokens = tokens + pos_embed[:, 1:]
        if keep_index is not None:
            tokens = torch.gather(tokens, 1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if self.with_cls_token:
            cls_token = self.cls_token + pos_embed[:, :1]
            tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.drop_after_pos(tokens)
        for layer in self.layers:
            tokens = layer(tokens)
        if self.ln1 is not None:
            tokens = self.ln1(tokens)
        if self.with_cls_token:
            tokens = tokens[:, 1:]
        return tokens, grid_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] normalised images -> [B, C, ceil(H / p), ceil(W / p)] patch features."""
        tokens, grid_size = self.forward_tokens(x)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, *grid_size)


@BACKBONE_REGISTRY.register()
class D2VisionTransformer(VisionTransformer, Backbone):
    """:class:`VisionTransformer` as a detectron2 backbone built from ``MODEL.VIT.*``: one output,
    ``"last_feat"`` at stride ``PATCH_SIZE``. Its parameters sit at the top level of the module
    (``backbone.layers...`` in a meta-architecture), as in mmseg's model."""

    @configurable
    def __init__(self, **vit_kwargs) -> None:
        super().__init__(**vit_kwargs)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict:
        vit = cfg.MODEL.VIT
        return {
            "img_size": tuple(vit.IMG_SIZE),
            "patch_size": vit.PATCH_SIZE,
            "in_chans": input_shape.channels,
            "embed_dim": vit.EMBED_DIM,
            "depth": vit.DEPTH,
            "num_heads": vit.NUM_HEADS,
            "mlp_ratio": vit.MLP_RATIO,
            "qkv_bias": vit.QKV_BIAS,
            "drop_rate": vit.DROP_RATE,
            "attn_drop_rate": vit.ATTN_DROP_RATE,
            "drop_path_rate": vit.DROP_PATH_RATE,
            "with_cls_token": vit.WITH_CLS_TOKEN,
            "final_norm": vit.FINAL_NORM,
            "norm_eps": vit.NORM_EPS,
            "interpolate_mode": vit.INTERPOLATE_MODE,
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, C_in, H, W] -> {"last_feat": [B, C, ceil(H / p), ceil(W / p)]}."""
        if x.dim() != 4:
            raise ValueError(f"D2VisionTransformer takes [B, C, H, W] images, got {tuple(x.shape)}")
        return {OUT_FEATURE: super().forward(x)}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {OUT_FEATURE: ShapeSpec(channels=self.embed_dim, stride=self.patch_size)}

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

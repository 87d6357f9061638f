"""Swin Transformer backbone (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021), as Mask2Former uses it.

Module and parameter names follow the official Mask2Former backbone (itself from the
Swin-Transformer-Object-Detection repository), so its checkpoints and the ImageNet-pretrained
Swin weights load with no missing or unexpected keys: ``patch_embed.*``, ``absolute_pos_embed``,
``layers.{i}.blocks.{j}.{norm1,attn,norm2,mlp}.*``, ``layers.{i}.downsample.*``, ``norm{i}.*``.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from ...layers import Mlp, transformer_init

__all__ = [
    "D2SwinTransformer",
    "SwinTransformer",
    "relative_position_index",
    "shifted_window_attention_mask",
    "window_partition",
    "window_reverse",
]

# Added to the logits of token pairs that the cyclic shift made adjacent. The official code uses
# -100 rather than -inf (exp(-100) is ~4e-44, so the pair is ignored either way); keeping the same
# constant keeps outputs equal to the official model's.
_MASKED_LOGIT = -100.0


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a feature map into non-overlapping square windows.

    Args:
        x: [B, H, W, C], H and W multiples of ``window_size``.
    Returns:
        [B * nW, window_size * window_size, C], windows in row-major order within each image.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(
    windows: torch.Tensor, window_size: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: [B * nW, window_size * window_size, C].
        height, width: size of the (padded) map, multiples of ``window_size``.
    Returns:
        [B, height, width, C].
    """
    c = windows.shape[-1]
    rows, cols = height // window_size, width // window_size
    x = windows.view(-1, rows, cols, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def _padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def relative_position_index(window_size: int) -> torch.Tensor:
    """Row of the relative-position bias table for every (query, key) pair of a window.

    Returns:
        [N, N] int64 with N = window_size**2: for tokens a=(ya, xa) and b=(yb, xb),
        ``(ya - yb + window_size - 1) * (2 * window_size - 1) + (xa - xb + window_size - 1)``.
    """
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # [2, N, N], >= 0
    return relative[0] * (2 * window_size - 1) + relative[1]


def shifted_window_attention_mask(
    height: int,
    width: int,
    window_size: int,
    shift_size: int,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Additive attention mask for shifted-window attention on a ``height`` x ``width`` map.

    After the map is padded to multiples of ``window_size`` and rolled up-left by ``shift_size``,
    the windows along the bottom and right edges hold tokens that come from opposite sides of
    the image. Each axis splits into three bands ([0, L - window), [L - window, L - shift),
    [L - shift, L)); two tokens may attend to each other only if they lie in the same band on
    both axes.

    Returns:
        [nW, N, N] with nW the windows of the padded map and N = window_size**2: 0 where query
        and key share a band, ``_MASKED_LOGIT`` elsewhere.
    """
    padded_h, padded_w = _padded(height, window_size), _padded(width, window_size)

    def bands(length: int) -> torch.Tensor:
        index = torch.arange(length, device=device)
        return (index >= length - window_size).long() + (index >= length - shift_size).long()

    region = bands(padded_h)[:, None] * 3 + bands(padded_w)[None, :]  # [Hp, Wp]
    region = window_partition(region[None, :, :, None], window_size).squeeze(-1)  # [nW, N]
    different = region[:, :, None] != region[:, None, :]
    mask = torch.zeros(different.shape, device=device, dtype=dtype)
    return mask.masked_fill(different, _MASKED_LOGIT)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative-position bias."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        """
        Args:
            dim: token channels, divisible by ``num_heads``.
            window_size: side of the square window.
            qk_scale: logit scale; ``None`` means head_dim ** -0.5.
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Swin: dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        # One bias per head for each of the (2w-1)^2 possible offsets between two tokens.
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Persistent, as in the official model: its checkpoints carry this buffer.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: [B * nW, N, C] tokens of each window, N = window_size**2.
            mask: [nW, N, N] additive mask (see :func:`shifted_window_attention_mask`) or None.
        Returns:
            [B * nW, N, C].
        """
        windows, n, c = x.shape
        qkv = self.qkv(x).reshape(windows, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B * nW, heads, N, C / heads]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B * nW, heads, N, N]

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))

        x = (attn @ v).transpose(1, 2).reshape(windows, n, c)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention and an MLP, each pre-norm with a residual connection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"Swin: shift_size {shift_size} must be in [0, {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop=drop
        )
        # Per-sample stochastic depth ("row"), identity in eval mode; same as timm's DropPath.
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(
        self, x: torch.Tensor, height: int, width: int, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """
        Args:
            x: [B, H*W, C] tokens of an H x W map (``height``, ``width``).
            attn_mask: [nW, N, N] mask of the shifted windows; used only when this block shifts.
        Returns:
            [B, H*W, C].
        """
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)

        # Pad bottom/right (after the norm, so padded tokens are zeros) to whole windows.
        pad_b = _padded(height, self.window_size) - height
        pad_r = _padded(width, self.window_size) - width
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        padded_h, padded_w = x.shape[1:3]

        if self.shift_size > 0:
            # Cyclic shift: windows of the rolled map straddle the windows of the previous block.
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None

        windows = self.attn(window_partition(x, self.window_size), mask=attn_mask)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, height * width, c)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the resolution and double the channels: concatenate each 2x2 neighbourhood
    (4C channels), LayerNorm, then a bias-free Linear to 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, H*W, C] -> [B, ceil(H/2) * ceil(W/2), 2C] (odd sizes are zero-padded)."""
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # The channel order (top-left, bottom-left, top-right, bottom-right) is what the
        # pretrained `reduction` weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """One resolution of the backbone: ``depth`` blocks alternating regular and shifted
    windows, and optionally the patch merging that leads to the next stage."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ) -> None:
        """
        Args:
            drop_path: stochastic-depth rate of each of the ``depth`` blocks.
            downsample: end with a :class:`PatchMerging` (all stages but the last).
            use_checkpoint: recompute the blocks in the backward pass to save activation memory.
        """
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else self.shift_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, H*W, C] -> [B, H*W, C], before the patch merging (``self.downsample``)."""
        attn_mask = shifted_window_attention_mask(
            height, width, self.window_size, self.shift_size, x.device, x.dtype
        )
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, height, width, attn_mask, use_reentrant=False)
            else:
                x = block(x, height, width, attn_mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> ``embed_dim`` channels (a strided
    conv), optionally followed by LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> [B, embed_dim, ceil(H / p), ceil(W / p)]; the image is
        zero-padded bottom/right to a multiple of the patch size p."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, _padded(w, self.patch_size) - w, 0, _padded(h, self.patch_size) - h))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


class SwinTransformer(nn.Module):
    """Swin Transformer feature extractor: patch embedding, then stages at strides 4, 8, 16, 32
    with ``embed_dim * 2**i`` channels; every stage's output goes through its own LayerNorm
    ``norm{i}`` and is returned as ``res{i + 2}``."""

    def __init__(
        self,
        *,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        """
        Args:
            pretrain_img_size: image size of the pretraining; sets the grid of the absolute
                position embedding, which is resized to the input at run time.
            depths, num_heads: blocks and attention heads of each stage.
            drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over
                all blocks of all stages.
            ape: add a learned absolute position embedding to the patch embedding.
            patch_norm: LayerNorm after the patch embedding.
        """
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(
                f"Swin: DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} differ in length"
            )
        self.num_layers = len(depths)
        self.num_features = [embed_dim * 2**i for i in range(self.num_layers)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        self.ape = ape
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        # Python floats, so the schedule is computable under a `torch.device("meta")` context.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(self.num_layers)]
        self.layers = nn.ModuleList(
            SwinStage(
                self.num_features[i],
                depths[i],
                num_heads[i],
                window_size,
                mlp_ratio,
                qkv_bias,
                qk_scale,
                drop_rate,
                attn_drop_rate,
                drop_path=rates[starts[i] : starts[i] + depths[i]],
                downsample=i < self.num_layers - 1,
                use_checkpoint=use_checkpoint,
            )
            for i in range(self.num_layers)
        )
        for i, channels in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x: [B, in_chans, H, W], any H and W.
        Returns:
            ``res{i + 2}``: [B, embed_dim * 2**i, ceil(H / s), ceil(W / s)] with s = 4 * 2**i
            (for patch size 4).
        """
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(height, width), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # [B, H*W, C]

        outputs = {}
        for i, stage in enumerate(self.layers):
            x = stage(x, height, width)
            out = getattr(self, f"norm{i}")(x)
            outputs[f"res{i + 2}"] = out.view(-1, height, width, self.num_features[i]).permute(
                0, 3, 1, 2
            ).contiguous()
            if stage.downsample is not None:
                x = stage.downsample(x, height, width)
                height, width = (height + 1) // 2, (width + 1) // 2
        return outputs


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation: truncated normal (std 0.02) Linear weights, zero biases, unit
    LayerNorms. (The official Mask2Former file defines this but never applies it; it only
    matters when training without the ImageNet-pretrained weights.)"""
    transformer_init(module)


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer, Backbone):
    """:class:`SwinTransformer` as a detectron2 backbone built from ``MODEL.SWIN.*``.

    Its parameters sit at the top level of the module (``backbone.patch_embed...`` in a
    meta-architecture), like the official ``D2SwinTransformer``. Inputs are expected already
    normalised by the meta-architecture.
    """

    @configurable
    def __init__(self, *, out_features: Sequence[str], **swin_kwargs) -> None:
        """
        Args:
            out_features: subset of ``res2``..``res5`` to return.
            swin_kwargs: arguments of :class:`SwinTransformer`.
        """
        super().__init__(**swin_kwargs)
        names = [f"res{i + 2}" for i in range(self.num_layers)]
        unknown = [name for name in out_features if name not in names]
        if unknown:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES: {unknown} not among {names}")
        self._out_features = list(out_features)
        self._out_feature_strides = {
            name: self.patch_embed.patch_size * 2**i for i, name in enumerate(names)
        }
        self._out_feature_channels = dict(zip(names, self.num_features))

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict:
        swin = cfg.MODEL.SWIN
        return {
            "out_features": swin.OUT_FEATURES,
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "in_chans": input_shape.channels or 3,
            "embed_dim": swin.EMBED_DIM,
            "depths": swin.DEPTHS,
            "num_heads": swin.NUM_HEADS,
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "use_checkpoint": swin.USE_CHECKPOINT,
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            x: [B, C, H, W] normalised images (H, W are padded to ``size_divisibility`` by the
                meta-architecture; other sizes work too).
        Returns:
            The features named in ``out_features``, [B, C_i, H / s_i, W / s_i] (ceil).
        """
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes [B, C, H, W] images, got {tuple(x.shape)}")
        features = super().forward(x)
        return {name: features[name] for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32

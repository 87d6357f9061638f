"""ReSTR's multimodal fusion encoder and coarse-to-fine segmentation decoder (``fusion_module``
in the official code, whose parameter names are kept)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PreNormBlock, init_restr_weights

__all__ = ["MultimodalFusion", "UpsampleBlock"]


class UpsampleBlock(nn.Module):
    """x2 bilinear upsampling (align_corners) -> 1x1 convolution without bias -> LeakyReLU.
    ``up.1`` holds the convolution, as in the official ``uplinearBlock``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(mode="bilinear", scale_factor=2, align_corners=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.LeakyReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, C_out, 2H, 2W]."""
        return self.up(x)


class MultimodalFusion(nn.Module):
    """Visual-linguistic encoder, linguistic-seed encoder, patch logits and the decoder.

    1. Visual [B, N, D_v] and word [B, T, D_l] features are L2-normalised and projected to D
       (``proj_v``, ``proj_l``); word features at padding are zeroed.
    2. ``blocks_vl`` run over [visual; words]; ``blocks_ls`` over [words'; seed] with the learnt
       ``seed_emb``, then ``norm``. The seed's output is the sentence's adaptive classifier.
    3. Patch logits = (z_v' W_p)(seed' W_c)^T (``proj_patch``, ``proj_cls``), no sigmoid.
    4. The decoder takes cat(projected visual, logits * z_v' W_p) (2D channels at the patch
       stride) through ``num_upsampling`` x2 blocks, halving channels, then a 1x1 conv to 1.
    With ``shared``, one block per encoder is applied ``num_layers`` times.
    """

    def __init__(
        self,
        *,
        visual_dim: int,
        language_dim: int,
        dim: int,
        num_layers: int = 2,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path_rate: float = 0.1,
        shared: bool = False,
        num_upsampling: int = 4,
    ) -> None:
        super().__init__()
        self.proj_v = nn.Linear(visual_dim, dim)
        self.proj_l = nn.Linear(language_dim, dim)
        self.seed_emb = nn.Parameter(torch.zeros(1, 1, dim))
        scale = dim ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(dim, dim))
        self.proj_cls = nn.Parameter(scale * torch.randn(dim, dim))
        self.num_repeats = num_layers if shared else 1
        num_blocks = 1 if shared else num_layers
        rates = torch.linspace(0, drop_path_rate, num_blocks).tolist()
        hidden = int(dim * mlp_ratio)
        self.blocks_vl = nn.ModuleList(PreNormBlock(dim, num_heads, hidden, dropout, rate) for rate in rates)
        self.blocks_ls = nn.ModuleList(PreNormBlock(dim, num_heads, hidden, dropout, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        if dim % 2 ** (num_upsampling - 1):
            raise ValueError(f"fusion width {dim} cannot be halved {num_upsampling - 1} times")
        self.decoder = nn.ModuleList(
            UpsampleBlock(2 * dim // 2**i, dim // 2**i) for i in range(num_upsampling)
        )
        self.decoder.append(nn.Conv2d(dim // 2 ** (num_upsampling - 1), 1, kernel_size=1, bias=False))
        self.apply(init_restr_weights)
        nn.init.trunc_normal_(self.seed_emb, std=0.02)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_repeats):
            for block in blocks:
                x = block(x)
        return x

    def forward(
        self, visual: torch.Tensor, words: torch.Tensor, padding_mask: torch.Tensor, grid_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            visual: [B, h * w, D_v] patch features (no class token), row-major.
            words: [B, T, D_l] word features; padding_mask: [B, T] True at padding.
            grid_size: (h, w) of the patch grid.
        Returns:
            pixel logits [B, 1, h * 2^n, w * 2^n] and patch logits [B, 1, h, w].
        """
        visual = self.proj_v(F.normalize(visual, dim=2))
        words = self.proj_l(F.normalize(words, dim=2)).masked_fill(padding_mask[..., None], 0.0)
        num_patches = visual.shape[1]
        fused = self._run(self.blocks_vl, torch.cat([visual, words], dim=1))
        patches, words = fused[:, :num_patches], fused[:, num_patches:]
        seed = self.seed_emb.expand(visual.shape[0], -1, -1)
        classifier = self.norm(self._run(self.blocks_ls, torch.cat([words, seed], dim=1)))[:, -1:]
        patches = patches @ self.proj_patch
        classifier = classifier @ self.proj_cls
        patch_logits = patches @ classifier.transpose(1, 2)  # [B, N, 1]
        decoder_input = torch.cat([visual, patch_logits * patches], dim=2)
        height, width = grid_size
        x = decoder_input.transpose(1, 2).reshape(decoder_input.shape[0], -1, height, width)
        for layer in self.decoder:
            x = layer(x)
        return x, patch_logits.transpose(1, 2).reshape(-1, 1, height, width)

    @staticmethod
    def num_upsampling_for(patch_size: int) -> int:
        """log2(patch size): the x2 blocks that bring the patch grid back to input resolution."""
        steps = math.log2(patch_size)
        if steps != int(steps):
            raise ValueError(f"ReSTR's decoder needs a power-of-two patch size, got {patch_size}")
        return int(steps)

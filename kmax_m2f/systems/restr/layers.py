"""The transformer blocks of ReSTR's language and fusion encoders, with the official parameter
names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``)."""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ...layers import Mlp, transformer_init

__all__ = ["Attention", "PostNormBlock", "PreNormBlock", "init_restr_weights"]


def init_restr_weights(module: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) linear weights and zero biases,
    unit LayerNorms, Xavier-uniform convolutions."""
    transformer_init(module)
    if isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no padding mask, as in the official code)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(attended.transpose(1, 2).reshape(batch, tokens, channels)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden_dim: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp = Mlp(dim, hidden_dim, dropout)
        self.drop_path = StochasticDepth(drop_path, mode="row")


class PreNormBlock(_Block):
    """x + attn(norm1(x)), then x + mlp(norm2(x)): the fusion encoder's blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PostNormBlock(_Block):
    """norm1(x + attn(x)), then norm2(x + mlp(x)): the GloVe language encoder's blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]."""
        x = self.norm1(x + self.drop_path(self.attn(x)))
        return self.norm2(x + self.drop_path(self.mlp(x)))

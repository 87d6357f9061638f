"""LOCA's two heads on the ViT's patch tokens: the position predictor g (one cross-attention
block from query patches to reference patches, then a classifier over the reference positions)
and the MSN-style projection head onto weight-normalised prototypes."""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from ...layers import Mlp, transformer_init

__all__ = ["ClusterProjectionHead", "CrossAttentionBlock", "PositionPredictionHead"]


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention reads another sequence: query tokens attend to
    (separately normalised) context tokens, then an MLP; both with residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query [B, N, C], context [B, M, C] -> [B, N, C]."""
        context = self.norm_context(context)
        attended = self.attn(self.norm_query(query), context, context, need_weights=False)[0]
        query = query + self.drop_path(attended)
        return query + self.drop_path(self.mlp(self.norm_mlp(query)))


class PositionPredictionHead(nn.Module):
    """g: query patch tokens, with the visible reference tokens as context -> logits over the
    ``num_positions`` reference patches."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, num_positions: int) -> None:
        super().__init__()
        self.block = CrossAttentionBlock(dim, num_heads, mlp_dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.classifier = nn.Linear(dim, num_positions)
        self.apply(transformer_init)

    def forward(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """query [B, N, C], reference [B, M, C] -> position logits [B, N, num_positions]."""
        return self.classifier(self.norm(self.block(query, reference)))


class ClusterProjectionHead(nn.Module):
    """``num_layers`` x (Linear -> GELU) to ``hidden_dim``, Linear to ``bottleneck_dim``, L2
    normalisation, then cosine similarities to ``num_prototypes`` unit-norm prototypes (a
    weight-normalised linear layer without bias or gain)."""

    def __init__(self, dim: int, hidden_dim: int, bottleneck_dim: int, num_prototypes: int, num_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers += [nn.Linear(dim if index == 0 else hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim if num_layers else dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(transformer_init)
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., C] -> prototype similarities in [-1, 1], [..., num_prototypes]."""
        embedding = F.normalize(self.mlp(tokens), dim=-1)
        return F.linear(embedding, F.normalize(self.prototypes, dim=-1))

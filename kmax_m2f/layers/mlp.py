"""The transformer feed-forward block with timm's parameter names (``fc1``, ``fc2``)."""
import torch
from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Token-wise feed-forward network: Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., C] -> [..., C]."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

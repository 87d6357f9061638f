"""Weight initialisation shared by the transformer models."""
from torch import nn

__all__ = ["transformer_init"]


def transformer_init(module: nn.Module) -> None:
    """timm's transformer initialisation of one module (for ``model.apply``): truncated normal
    (std 0.02) Linear weights, zero biases, unit LayerNorms; other modules are left alone."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""detectron2's ResNet with configurable BatchNorm hyper-parameters, for kMaX-DeepLab.

kMaX-DeepLab trains its ResNet-50 with TensorFlow's BatchNorm settings: eps 1e-3 and a moving
average decay of 0.99, i.e. PyTorch momentum 0.01 (PyTorch's defaults are 1e-5 and 0.1), with
SyncBN across GPUs. The official port copies detectron2's ResNet to change its norm; here
detectron2's own ResNet is built and its BatchNorm layers are then re-configured. The module tree
is therefore detectron2's (``stem.conv1.norm``, ``res2.0.conv1``, ``res2.0.shortcut``, ...), which
is also the official port's: its checkpoints and detectron2's ImageNet R-50 load unchanged.
"""

from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone
from torch import nn

__all__ = ["custom_bn_build_resnet_backbone", "set_batch_norm_hyperparameters"]


def set_batch_norm_hyperparameters(module: nn.Module, eps: float, momentum: float) -> int:
    """Set ``eps`` and ``momentum`` of every BatchNorm layer inside ``module``, in place.

    Covers ``nn.BatchNorm*d``, ``nn.SyncBatchNorm`` and detectron2's ``NaiveSyncBatchNorm``;
    detectron2's ``FrozenBatchNorm2d`` (frozen stages) gets ``eps`` only, as its statistics never
    update.

    Returns:
        The number of layers changed.
    """
    changed = 0
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eps, layer.momentum = eps, momentum
            changed += 1
        elif isinstance(layer, FrozenBatchNorm2d):
            layer.eps = eps
            changed += 1
    return changed


@BACKBONE_REGISTRY.register()
def custom_bn_build_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNet from ``MODEL.RESNETS.*`` (``NORM``: "BN", "SyncBN", "naiveSyncBN",
    "FrozenBN") whose BatchNorm layers use ``MODEL.RESNETS.NORM_EPS`` and ``NORM_MOMENTUM``.

    Registered under the official port's name, so its YAMLs select it unchanged.

    Returns:
        A :class:`detectron2.modeling.ResNet` with the outputs of ``MODEL.RESNETS.OUT_FEATURES``.
    """
    resnets = cfg.MODEL.RESNETS
    backbone = build_resnet_backbone(cfg, input_shape)
    if set_batch_norm_hyperparameters(backbone, resnets.NORM_EPS, resnets.NORM_MOMENTUM) == 0:
        # Silently ignoring NORM_EPS / NORM_MOMENTUM would train a different model than asked.
        raise ValueError(
            f"custom_bn_build_resnet_backbone: MODEL.RESNETS.NORM={resnets.NORM!r} builds no "
            "BatchNorm layer for NORM_EPS / NORM_MOMENTUM to configure; use a BatchNorm norm "
            "(BN, SyncBN, naiveSyncBN, FrozenBN) or the plain build_resnet_backbone."
        )
    return backbone

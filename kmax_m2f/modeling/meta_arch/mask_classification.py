"""What the mask-classification meta-architectures share (Mask2Former, kMaX-DeepLab): each of Q
queries predicts a class (K + "no object") and a mask, a set criterion trains them, and
switches select the semantic / instance / panoptic outputs."""
import torch
from detectron2.config import CfgNode
from detectron2.modeling import Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import Instances
from torch import nn

from .common import INSTANCE, PANOPTIC, SEMANTIC, check_num_classes, training_metadata

__all__ = ["SEMANTIC", "INSTANCE", "PANOPTIC", "MaskClassificationModel"]


class MaskClassificationModel(nn.Module):
    """Base of the meta-architectures that read ``MODEL.<config_namespace>.TEST.{SEMANTIC,
    INSTANCE,PANOPTIC}_ON``: pixel normalisation (buffers that checkpoints do not store), the
    device, the output switches and the tasks they give the evaluators (:meth:`output_tasks`), the
    NUM_CLASSES check, and the ground-truth masks of the targets.

    A subclass sets ``config_namespace``, builds its criterion in ``from_config`` from
    :meth:`base_from_config`'s arguments, and implements ``forward``.
    """

    config_namespace: str = ""

    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        metadata,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        semantic_on: bool,
        instance_on: bool,
        panoptic_on: bool,
        test_topk_per_image: int,
    ):
        """
        Args:
            metadata: the training set's metadata (class names, thing ids) or None.
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            semantic_on, instance_on, panoptic_on: which outputs inference produces.
            test_topk_per_image: instances kept per image.
        """
        super().__init__()
        if not (semantic_on or instance_on or panoptic_on):
            raise ValueError(
                f"MODEL.{self.config_namespace}.TEST: switch on at least one of SEMANTIC_ON, INSTANCE_ON, PANOPTIC_ON"
            )
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.metadata = metadata
        # Not persistent: official checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.instance_on = instance_on
        self.panoptic_on = panoptic_on
        self.test_topk_per_image = test_topk_per_image

    @classmethod
    def output_tasks(cls, cfg: CfgNode) -> set[str]:
        """The tasks this model predicts under ``cfg`` (the evaluators to run)."""
        flags = cfg.MODEL[cls.config_namespace].TEST
        return {task for task in (SEMANTIC, INSTANCE, PANOPTIC) if flags[f"{task.upper()}_ON"]}

    @classmethod
    def base_from_config(cls, cfg: CfgNode) -> dict:
        """The constructor arguments every subclass reads the same way (the criterion excepted):
        checks NUM_CLASSES against the training set, builds the backbone and the head."""
        check_num_classes(cfg)
        backbone = build_backbone(cfg)
        test = cfg.MODEL[cls.config_namespace].TEST
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "metadata": training_metadata(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """[C, H, W] image (any dtype) on this model's device, normalised."""
        return (image.to(self.device) - self.pixel_mean) / self.pixel_std

    def require_instances(self, batched_inputs: list[dict], mapper_hint: str) -> None:
        """Training needs per-segment ground truth: say which mapper provides it when it is missing."""
        if "instances" not in batched_inputs[0]:
            raise ValueError(
                f"{type(self).__name__} training needs 'instances' in each input: use "
                f"INPUT.DATASET_MAPPER_NAME {mapper_hint}."
            )

    @staticmethod
    def gt_masks(instances: Instances) -> torch.Tensor:
        """[N, H, W] ground-truth masks of ``instances`` as a tensor (detectron2's own mappers
        give ``BitMasks``)."""
        masks = instances.gt_masks
        return masks if isinstance(masks, torch.Tensor) else masks.tensor


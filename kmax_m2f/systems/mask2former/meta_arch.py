"""MaskFormer meta-architecture (Mask2Former): backbone -> MaskFormerHead -> set criterion /
semantic, panoptic and instance post-processing."""

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances
from detectron2.utils.memory import retry_if_cuda_oom
from torch.nn import functional as F

from ...modeling.matcher import HungarianMatcher
from ...modeling.meta_arch.common import thing_ids
from ...modeling.meta_arch.mask_classification import MaskClassificationModel
from ...modeling.postprocess import resize_to_output
from ...modeling.set_criterion import build_weight_dict
from .criterion import SetCriterion
from .postprocess import instance_inference, panoptic_inference, semantic_inference


@META_ARCH_REGISTRY.register()
class MaskFormer(MaskClassificationModel):
    """Mask classification: each of Q queries predicts a class (K + "no object") and a mask.

    Training input: detectron2 dicts with "image" [3, H, W] and "instances" (gt_classes [N],
    gt_masks [N, H, W]). Inference output per image: "sem_seg" [K, H, W], "panoptic_seg"
    (ids [H, W], segments_info) and/or "instances", per the MODEL.MASK_FORMER.TEST.*_ON switches.
    """

    config_namespace = "MASK_FORMER"

    @configurable
    def __init__(
        self,
        *,
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        deep_supervision: bool = True,
        **kwargs,
    ):
        """
        Args:
            num_queries: Q.
            object_mask_threshold, overlap_threshold: panoptic inference thresholds.
            size_divisibility: pad inputs to a multiple of this (< 0: the backbone's).
            sem_seg_postprocess_before_inference: resize masks to the output size before
                inference (panoptic and instance outputs need it).
            deep_supervision: supervise every decoder layer's prediction.
            kwargs: :class:`MaskClassificationModel`'s arguments.
        """
        super().__init__(**kwargs)
        self.num_queries = num_queries
        self.overlap_threshold = overlap_threshold
        self.object_mask_threshold = object_mask_threshold
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.deep_supervision = deep_supervision

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        args = cls.base_from_config(cfg)
        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        weight_dict = build_weight_dict(
            {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT},
            # One auxiliary prediction per decoder output but the last.
            num_aux_outputs=mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0,
        )
        args["criterion"] = SetCriterion(
            args["sem_seg_head"].num_classes,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        )
        test = mf.TEST
        args.update(
            deep_supervision=mf.DEEP_SUPERVISION,
            num_queries=mf.NUM_OBJECT_QUERIES,
            object_mask_threshold=test.OBJECT_MASK_THRESHOLD,
            overlap_threshold=test.OVERLAP_THRESHOLD,
            size_divisibility=mf.SIZE_DIVISIBILITY,
            # Panoptic and instance results need masks at the input resolution first.
            sem_seg_postprocess_before_inference=(
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or test.PANOPTIC_ON or test.INSTANCE_ON
            ),
        )
        return args

    def forward(self, batched_inputs: list[dict]):
        images = [self.normalize(x["image"]) for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        outputs = self.sem_seg_head(self.backbone(images.tensor))

        if self.training:
            self.require_instances(batched_inputs, "mask_former_* or coco_*_lsj")
            targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images)
            if not self.deep_supervision:
                outputs.pop("aux_outputs", None)
            return self.criterion.weighted_losses(self.criterion(outputs, targets))

        # One image at a time, its masks upsampled to the padded input size only while needed: at
        # full resolution each image's [Q, H, W] logits are the largest tensors of inference.
        return [
            self._inference_single(
                class_logits,
                F.interpolate(masks[None], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)[0],
                inputs,
                image_size,
            )
            for class_logits, masks, inputs, image_size in zip(
                outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images.image_sizes
            )
        ]

    def _inference_single(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor, inputs: dict, image_size) -> dict:
        height = inputs.get("height", image_size[0])
        width = inputs.get("width", image_size[1])
        result = {}
        if self.sem_seg_postprocess_before_inference:
            mask_pred = retry_if_cuda_oom(resize_to_output)(mask_pred, image_size, height, width)
            mask_cls = mask_cls.to(mask_pred)
        # Each output takes the mask probabilities it needs and drops them: one [Q, H, W] sigmoid
        # kept for all three would be the largest tensor alive at full resolution.
        if self.semantic_on:
            semantic = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred)
            if not self.sem_seg_postprocess_before_inference:
                semantic = retry_if_cuda_oom(resize_to_output)(semantic, image_size, height, width)
            result["sem_seg"] = semantic
        if self.panoptic_on:
            result["panoptic_seg"] = retry_if_cuda_oom(panoptic_inference)(
                mask_cls, mask_pred, thing_ids(self.metadata), self.object_mask_threshold, self.overlap_threshold
            )
        if self.instance_on:
            result["instances"] = retry_if_cuda_oom(instance_inference)(
                mask_cls, mask_pred, self.test_topk_per_image, thing_ids(self.metadata) if self.panoptic_on else None
            )
        return result

    def prepare_targets(self, targets: list[Instances], images: ImageList) -> list[dict]:
        """Pad each image's gt masks to the batch's padded size: {"labels": [N], "masks": [N, H, W]}."""
        padded_height, padded_width = images.tensor.shape[-2:]
        prepared = []
        for instances in targets:
            gt_masks = self.gt_masks(instances)
            padded = gt_masks.new_zeros((gt_masks.shape[0], padded_height, padded_width))
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            prepared.append({"labels": instances.gt_classes, "masks": padded})
        return prepared

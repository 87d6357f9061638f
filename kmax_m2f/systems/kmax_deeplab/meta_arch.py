"""kMaX-DeepLab meta-architecture: backbone -> kMaXDeepLabHead (pixel decoder + kMaX decoder) ->
kMaX set criterion / panoptic, semantic and instance post-processing."""
import math
from typing import Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances
from detectron2.utils.memory import retry_if_cuda_oom
from torch.nn import functional as F

from ...config import ConfigError, fixed_image_size
from ...modeling.matcher import HungarianMatcher
from ...modeling.meta_arch.common import thing_ids
from ...modeling.meta_arch.mask_classification import MaskClassificationModel
from ...modeling.set_criterion import build_weight_dict
from .criterion import kMaXMatchingCost, kMaXSetCriterion
from .layers import recompute_activations, tf_align_corners
from .postprocess import instance_inference, panoptic_inference, semantic_inference
from .transformer_decoder import resize_aux_outputs

__all__ = ["kMaXDeepLab"]


# Queries upsampled to the image at once in inference: bounds the memory of the full-resolution
# intermediate (128 masks at 1281 x 1281 would be 840 MB in float32).
_UPSAMPLE_CHUNK = 16


def _real_rows(real: int, padded: int, stride_size: int) -> int:
    """Rows (or columns) of a stride-4 map of a ``padded``-pixel axis needed to interpolate its
    first ``real`` pixels exactly, for the odd (align-corners) and even (half-pixel) grids."""
    if padded % 2:
        return min(stride_size, math.ceil((real - 1) / 4) + 1)
    return min(stride_size, math.ceil(real / 4) + 1)


def masks_to_image(mask_logits: torch.Tensor, real_size: tuple[int, int], padded_size: tuple[int, int],
                   output_size: tuple[int, int]) -> torch.Tensor:
    """Stride-4 mask logits of a padded input -> logits at the output resolution.

    Equal to the official two steps (upsample to the padded input, crop the real image, resize to
    the output size), but only the rows / columns covering the real image are upsampled, and a
    few queries at a time.

    Args:
        mask_logits: [N, h, w] at stride 4 of the padded input.
        real_size: (H_r, W_r) of the resized image inside the padded input.
        padded_size: (H, W) of the padded input.
        output_size: (height, width) to return.

    Returns:
        [N, height, width].
    """
    align_corners = tf_align_corners(padded_size)
    rows = _real_rows(real_size[0], padded_size[0], mask_logits.shape[-2])
    cols = _real_rows(real_size[1], padded_size[1], mask_logits.shape[-1])
    cropped = mask_logits[:, :rows, :cols]
    # The size the full upsampling would give these rows: (k - 1) * 4 + 1 on the align-corners grid
    # (pixel 4i sits on row i), 4k on the half-pixel grid; both keep the full upsampling's scale.
    upsampled_size = ((rows - 1) * 4 + 1, (cols - 1) * 4 + 1) if align_corners else (rows * 4, cols * 4)
    # A resize to the size it already has is the identity, and is skipped.
    same_size = tuple(output_size) == tuple(real_size)
    if same_size and tuple(upsampled_size) == tuple(real_size):
        # Nothing to crop or resize: one upsampling straight into the result, no intermediate.
        return F.interpolate(cropped[None], size=upsampled_size, mode="bilinear", align_corners=align_corners)[0]
    chunks = []
    for chunk in cropped.split(_UPSAMPLE_CHUNK):
        full = F.interpolate(chunk[None], size=upsampled_size, mode="bilinear", align_corners=align_corners)
        real = full[0, :, : real_size[0], : real_size[1]]
        chunks.append(real if same_size else F.interpolate(
            real[None], size=output_size, mode="bilinear", align_corners=align_corners)[0])
    return torch.cat(chunks)


@META_ARCH_REGISTRY.register()
class kMaXDeepLab(MaskClassificationModel):
    """k-means mask transformer: N cluster centres each predict a class (K + void) and a mask;
    masks compete through a softmax over clusters.

    Every input is padded (bottom / right, zeros after normalisation) to the fixed
    INPUT.IMAGE_SIZE its relative position encodings were built for.

    Training input: dicts from the ``kmax_panoptic`` mapper: "image" [3, H, W], "instances"
    (gt_classes [M], gt_masks [M, H/4, W/4] at stride 4), "sem_seg_gt" [H/4, W/4] and
    "is_real_pixels" [H, W]. Inference output per image: "panoptic_seg" (ids [h, w],
    segments_info), "sem_seg" [K, h, w] and/or "instances", per MODEL.KMAX_DEEPLAB.TEST.*_ON.
    """

    config_namespace = "KMAX_DEEPLAB"
    # The official trainer's rule: no weight decay on biases, ConvNeXt's layer scales ("gamma"),
    # the axial attention's relative position encodings and the cluster centres (see
    # kmax_m2f.engine.optimizer.build_param_groups). Norms and embeddings follow
    # SOLVER.WEIGHT_DECAY_NORM / WEIGHT_DECAY_EMBED as for every model.
    no_weight_decay_keywords = ("bias", "gamma", "_rpe", "_cluster_centers")

    @configurable
    def __init__(
        self,
        *,
        num_queries: int,
        pixel_confidence_threshold: float,
        class_threshold_thing: float,
        class_threshold_stuff: float,
        overlap_threshold: float,
        reorder_class_weight: float,
        reorder_mask_weight: float,
        input_shape: tuple[int, int],
        ignore_value: int = 255,
        channel_last_format: bool = True,
        recompute_norm_act: bool = True,
        deep_supervision: bool = True,
        **kwargs,
    ):
        """
        Args:
            input_shape: the fixed (H, W) every input is padded to.
            ignore_value: semantic label of void pixels in the targets.
            channel_last_format: run the backbone (and so the pixel decoder) on channels-last tensors:
                the same results, faster on CPUs (BENCHMARKS.md).
            recompute_norm_act: in training, recompute in backward the output of every batch norm
                that feeds an activation, and of the GELUs that the pixel decoder's blocks and
                fuses begin with, instead of keeping them (:func:`recompute_activations`; less
                memory, the same gradients).
            deep_supervision: supervise every kMaX layer's prediction, not only the final one.
            kwargs: :class:`MaskClassificationModel`'s arguments.
            Others: as the MODEL.KMAX_DEEPLAB.TEST keys they come from.
        """
        super().__init__(**kwargs)
        self.num_queries = num_queries
        self.pixel_confidence_threshold = pixel_confidence_threshold
        self.class_threshold_thing = class_threshold_thing
        self.class_threshold_stuff = class_threshold_stuff
        self.overlap_threshold = overlap_threshold
        self.reorder_class_weight = reorder_class_weight
        self.reorder_mask_weight = reorder_mask_weight
        self.input_shape = tuple(input_shape)
        self.ignore_value = ignore_value
        self.channel_last_format = channel_last_format
        recompute_activations(self, recompute_norm_act)
        self.deep_supervision = deep_supervision
        # tools/demo.py --show-clusters switches this on, so that detectron2's DefaultPredictor
        # returns the cluster maps too (see :meth:`inference`).
        self.return_cluster_assignments = False

    @classmethod
    def from_config(cls, cfg):
        kmax = cfg.MODEL.KMAX_DEEPLAB
        args = cls.base_from_config(cfg)
        weights = {
            "loss_ce": kmax.CLASS_WEIGHT,
            "loss_mask": kmax.MASK_WEIGHT,
            "loss_dice": kmax.DICE_WEIGHT,
            "loss_pixel_insdis": kmax.INSDIS_WEIGHT,
        }
        weight_dict = build_weight_dict(
            weights, num_aux_outputs=sum(kmax.TRANS_DEC.DEC_LAYERS) if kmax.DEEP_SUPERVISION else 0
        )
        # The semantic loss is on the final output only.
        weight_dict["loss_aux_semantic"] = kmax.AUX_SEMANTIC_WEIGHT
        losses = ["labels", "masks"]
        if kmax.INSDIS_WEIGHT > 0:
            losses.append("pixels")
        if kmax.AUX_SEMANTIC_WEIGHT > 0:
            losses.append("aux_semantic")
        args["criterion"] = kMaXSetCriterion(
            num_classes=args["sem_seg_head"].num_classes,
            matcher=HungarianMatcher(cost_fn=kMaXMatchingCost(masking_void_pixel=kmax.MASKING_VOID_PIXEL)),
            weight_dict=weight_dict,
            eos_coef=kmax.NO_OBJECT_WEIGHT,
            losses=losses,
            share_final_matching=kmax.SHARE_FINAL_MATCHING,
            pixel_insdis_temperature=kmax.PIXEL_INSDIS_TEMPERATURE,
            pixel_insdis_sample_k=kmax.PIXEL_INSDIS_SAMPLE_K,
            aux_semantic_temperature=kmax.AUX_SEMANTIC_TEMPERATURE,
            aux_semantic_sample_k=kmax.AUX_SEMANTIC_SAMPLE_K,
            masking_void_pixel=kmax.MASKING_VOID_PIXEL,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        )
        test = kmax.TEST
        args.update(
            num_queries=kmax.TRANS_DEC.NUM_OBJECT_QUERIES,
            pixel_confidence_threshold=test.PIXEL_CONFIDENCE_THRESHOLD,
            class_threshold_thing=test.CLASS_THRESHOLD_THING,
            class_threshold_stuff=test.CLASS_THRESHOLD_STUFF,
            overlap_threshold=test.OVERLAP_THRESHOLD,
            reorder_class_weight=test.REORDER_CLASS_WEIGHT,
            reorder_mask_weight=test.REORDER_MASK_WEIGHT,
            input_shape=fixed_image_size(cfg),
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            channel_last_format=kmax.CHANNEL_LAST_FORMAT,
            recompute_norm_act=kmax.NORM_ACT_CHECKPOINT,
            deep_supervision=kmax.DEEP_SUPERVISION,
        )
        return args

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalise, zero the padded pixels the mapper marked, pad to the fixed input size.

        Returns an ImageList whose tensor is [B, 3, H, W] = input_shape and whose image_sizes are
        the real (unpadded) sizes.
        """
        height, width = self.input_shape
        images, sizes = [], []
        for inputs in batched_inputs:
            image = self.normalize(inputs["image"])
            if "is_real_pixels" in inputs:
                # The mapper's padding becomes 0 after normalisation, as the test-time padding.
                image = image * inputs["is_real_pixels"].to(image)
            image_height, image_width = image.shape[-2:]
            if image_height > height or image_width > width:
                raise ConfigError(
                    f"an input image of {image_height}x{image_width} exceeds the fixed input size "
                    f"INPUT.IMAGE_SIZE={height}x{width} kMaX-DeepLab was built for: resize test images to fit "
                    f"(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST at most {min(height, width)} / {max(height, width)})"
                )
            sizes.append((image_height, image_width))
            images.append(F.pad(image, (0, width - image_width, 0, height - image_height)))
        return ImageList(torch.stack(images), sizes)

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return self.inference(batched_inputs)
        self.require_instances(batched_inputs, "kmax_panoptic")
        images = self.preprocess_image(batched_inputs)
        outputs = self.sem_seg_head(self.backbone(self._backbone_input(images)))
        targets = self.prepare_targets(batched_inputs, outputs["pred_masks"].shape[-2:])
        outputs["aux_outputs"] = resize_aux_outputs(outputs, outputs["pred_masks"].shape[-2:]) if self.deep_supervision else []
        return self.criterion.weighted_losses(self.criterion(outputs, targets))

    def _backbone_input(self, images: ImageList) -> torch.Tensor:
        if self.channel_last_format:
            return images.tensor.to(memory_format=torch.channels_last)
        return images.tensor

    def inference(self, batched_inputs: list[dict], return_cluster_assignments: Optional[bool] = None) -> list[dict]:
        """Predictions per image at its "height" x "width" (default: the input size).

        Args:
            return_cluster_assignments: (default: the ``return_cluster_assignments`` attribute,
                which ``forward`` uses) also return "cluster_assignments": for every kMaX layer and
                the final prediction, the [h_i, w_i] int64 map of each pixel's cluster (argmax over
                the N mask logits) at that layer's stride, cropped to the image: the k-means
                assignment the layer used (paper's Figure 4).
        """
        if return_cluster_assignments is None:
            return_cluster_assignments = self.return_cluster_assignments
        images = self.preprocess_image(batched_inputs)
        outputs = self.sem_seg_head(self.backbone(self._backbone_input(images)))
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for index, (inputs, real_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            output_size = (inputs.get("height", real_size[0]), inputs.get("width", real_size[1]))
            mask_pred = retry_if_cuda_oom(masks_to_image)(
                outputs["pred_masks"][index], real_size, padded_size, output_size
            )
            result = self._postprocess(outputs["pred_logits"][index].to(mask_pred), mask_pred)
            if return_cluster_assignments:
                result["cluster_assignments"] = [
                    _assignment_map(stage["pred_masks"][index], real_size, padded_size)
                    for stage in outputs["aux_outputs"] + [outputs]
                ]
            results.append(result)
        return results

    def cluster_stage_labels(self) -> list[str]:
        """Names of the stages whose maps ``inference(..., return_cluster_assignments=True)``
        returns, in order: each kMaX layer with its stride, then the final prediction."""
        strides = [stride for stride, layers in zip((32, 16, 8), self.sem_seg_head.predictor._num_blocks)
                   for _ in range(layers)]
        return [f"kMaX layer {i} (stride {stride})" for i, stride in enumerate(strides, start=1)] + ["final (stride 4)"]

    def _postprocess(self, mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> dict:
        """Outputs from one image's class logits [Q, K+1] and mask logits [Q, H, W], which the
        panoptic output, computed last, may overwrite."""
        result = {}
        if self.semantic_on:
            result["sem_seg"] = retry_if_cuda_oom(semantic_inference)(mask_cls, mask_pred)
        if self.instance_on:
            result["instances"] = retry_if_cuda_oom(instance_inference)(
                mask_cls,
                mask_pred,
                self.test_topk_per_image,
                self.pixel_confidence_threshold,
                thing_ids(self.metadata) if self.panoptic_on else None,
            )
        if self.panoptic_on:
            result["panoptic_seg"] = retry_if_cuda_oom(panoptic_inference)(
                mask_cls,
                mask_pred,
                thing_ids(self.metadata),
                pixel_confidence_threshold=self.pixel_confidence_threshold,
                class_threshold_thing=self.class_threshold_thing,
                class_threshold_stuff=self.class_threshold_stuff,
                overlap_threshold=self.overlap_threshold,
                reorder_class_weight=self.reorder_class_weight,
                reorder_mask_weight=self.reorder_mask_weight,
                # On a CPU a fresh [Q, H, W] result costs first-touch page faults; a GPU's caching
                # allocator reuses memory, and retry_if_cuda_oom must find the logits intact.
                inplace=mask_pred.device.type == "cpu",
            )
        return result

    def prepare_targets(self, batched_inputs: list[dict], mask_size: tuple[int, int]) -> list[dict]:
        """{"labels" [M], "masks" [M, h, w] float, "semantic_masks" [h, w] int64} per image, at the
        predictions' stride-4 size ``mask_size``. Without "sem_seg_gt" the semantic target is drawn
        from the masks (void where none)."""
        targets = []
        for inputs in batched_inputs:
            instances: Instances = inputs["instances"].to(self.device)
            masks = self.gt_masks(instances)
            if tuple(masks.shape[-2:]) != tuple(mask_size):
                raise ValueError(
                    f"ground-truth masks of {tuple(masks.shape[-2:])} do not match the stride-4 predictions of "
                    f"{tuple(mask_size)}: kMaX-DeepLab trains on ground truth at stride 4 of INPUT.IMAGE_SIZE, "
                    "which INPUT.DATASET_MAPPER_NAME kmax_panoptic provides"
                )
            masks = masks.float()
            labels = instances.gt_classes.long()
            if "sem_seg_gt" in inputs:
                semantic = inputs["sem_seg_gt"].to(self.device).long()
            else:
                semantic = torch.full(tuple(mask_size), self.ignore_value, dtype=torch.long, device=self.device)
                for label, mask in zip(labels, masks.bool()):
                    semantic[mask] = label
            targets.append({"labels": labels, "masks": masks, "semantic_masks": semantic})
        return targets


def _assignment_map(mask_logits: torch.Tensor, real_size: tuple[int, int], padded_size: tuple[int, int]) -> torch.Tensor:
    """[N, h, w] mask logits of one layer -> [h', w'] cluster index per pixel, cropped to the
    part of the stride-(H / h) map that covers the real image."""
    height, width = mask_logits.shape[-2:]
    rows = min(height, math.ceil(real_size[0] * height / padded_size[0]))
    cols = min(width, math.ceil(real_size[1] * width / padded_size[1]))
    return mask_logits[:, :rows, :cols].argmax(0)


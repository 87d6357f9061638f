"""LOCA (Caron et al., 2022): self-supervised ViT pre-training by patch localisation.

The student ViT encodes query views; an EMA copy of it (the teacher) encodes the reference view.
The position head g lets each query patch attend to a contiguous run of the reference's tokens
and classifies which reference patch it shows; a projection head onto prototypes predicts, for
each query patch, the teacher's (Sinkhorn-balanced) cluster assignment at the matching reference
patch. The backbone is the project's ``D2VisionTransformer`` (``MODEL.VIT``), so its weights
load into StructToken, ReSTR or any ViT config (``tools/export_loca_backbone.py``).
"""
import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.engine import HookBase
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.utils.events import get_event_storage
from torch import nn

from ...modeling.meta_arch.common import LOCALIZATION
from .heads import ClusterProjectionHead, PositionPredictionHead
from .losses import cluster_prediction_losses, localization_loss, sinkhorn

__all__ = ["LOCA", "TeacherEMAHook", "teacher_momentum"]


def teacher_momentum(iteration: int, max_iter: int, base_momentum: float) -> float:
    """The EMA momentum at ``iteration``: ``base_momentum`` at the start, rising to 1 along a
    half cosine over ``max_iter`` iterations."""
    progress = min(max(iteration / max(max_iter, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base_momentum) * (1.0 + math.cos(math.pi * progress)) / 2.0


class TeacherEMAHook(HookBase):
    """After every optimiser step, moves ``model``'s teacher towards its student with the
    momentum of :func:`teacher_momentum` at that iteration (the trainer places it before the
    checkpointer, so that a checkpoint holds the matching teacher)."""

    def __init__(self, model: "LOCA") -> None:
        self.model = model

    def after_step(self) -> None:
        self.model.update_teacher(teacher_momentum(self.trainer.iter, self.trainer.max_iter, self.model.base_momentum))


@META_ARCH_REGISTRY.register()
class LOCA(nn.Module):
    """LOCA pre-training on the ``loca`` mapper's views.

    Training returns ``loss_localization``, ``loss_cluster`` and ``loss_me_max`` (the last two
    with ``MODEL.LOCA.CLUSTER_LOSS``). Inference returns, per image, the number of valid query
    patches and of those localised correctly (top-1), for :class:`LocalizationEvaluator`.

    Parameter names: ``backbone.*`` (the student ViT), ``position_head.*`` (g),
    ``projection_head.*`` (MLP and ``prototypes``), ``teacher.backbone.*`` /
    ``teacher.projection_head.*`` (the EMA copies).
    """

    # The official recipe decays no 1-D parameter (biases, norms); see build_param_groups.
    no_weight_decay_on_vectors = True

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        position_head: PositionPredictionHead,
        projection_head: Optional[ClusterProjectionHead],
        num_reference_positions: int,
        reference_tokens_kept: int,
        student_temperature: float,
        teacher_temperature: float,
        sinkhorn_iterations: int,
        me_max_weight: float,
        base_momentum: float,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
    ) -> None:
        """
        Args:
            backbone: a ViT with ``forward_tokens(images, keep_index)`` (D2VisionTransformer).
            position_head: g, over ``num_reference_positions`` classes.
            projection_head: the cluster head; None switches the cluster loss off.
            num_reference_positions: patches of the reference view (196 at 224 px, patch 16).
            reference_tokens_kept: contiguous reference tokens g sees (39 of 196).
            student_temperature, teacher_temperature: softmax temperatures of the cluster loss.
            sinkhorn_iterations: balancing iterations of the teacher's assignments.
            me_max_weight: weight of the mean-entropy regulariser.
            base_momentum: the teacher's EMA momentum at the start (rising to 1).
            pixel_mean, pixel_std: input normalisation (0-255 RGB values).
        """
        super().__init__()
        if not hasattr(backbone, "forward_tokens"):
            raise ValueError(
                f"LOCA needs a ViT backbone with forward_tokens (MODEL.BACKBONE.NAME D2VisionTransformer), "
                f"got {type(backbone).__name__}."
            )
        self.backbone = backbone
        self.position_head = position_head
        self.projection_head = projection_head
        teacher = {"backbone": copy.deepcopy(backbone)}
        if projection_head is not None:
            teacher["projection_head"] = copy.deepcopy(projection_head)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.requires_grad_(False)
        self.num_reference_positions = num_reference_positions
        self.reference_tokens_kept = reference_tokens_kept
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.me_max_weight = me_max_weight
        self.base_momentum = base_momentum
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        loca = cfg.MODEL.LOCA
        vit = cfg.MODEL.VIT
        if cfg.INPUT.DATASET_MAPPER_NAME != "loca":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE LOCA trains on the 'loca' mapper's views; set INPUT.DATASET_MAPPER_NAME "
                f"loca (got {cfg.INPUT.DATASET_MAPPER_NAME!r})."
            )
        num_positions = (cfg.INPUT.LOCA.REFERENCE_SIZE // vit.PATCH_SIZE) ** 2
        mlp_dim = int(vit.EMBED_DIM * vit.MLP_RATIO)
        projection_head = None
        if loca.CLUSTER_LOSS:
            projection_head = ClusterProjectionHead(
                vit.EMBED_DIM, loca.PROJECTION_HIDDEN_DIM, loca.PROJECTION_BOTTLENECK_DIM, loca.NUM_PROTOTYPES,
                loca.PROJECTION_NUM_LAYERS,
            )
        return {
            "backbone": build_backbone(cfg),
            "position_head": PositionPredictionHead(
                vit.EMBED_DIM, loca.POSITION_HEAD_NUM_HEADS or vit.NUM_HEADS, mlp_dim, num_positions
            ),
            "projection_head": projection_head,
            "num_reference_positions": num_positions,
            "reference_tokens_kept": max(1, int(loca.REFERENCE_KEEP_RATIO * num_positions)),
            "student_temperature": loca.STUDENT_TEMPERATURE,
            "teacher_temperature": loca.TEACHER_TEMPERATURE,
            "sinkhorn_iterations": loca.SINKHORN_ITERATIONS,
            "me_max_weight": loca.ME_MAX_WEIGHT,
            "base_momentum": loca.TEACHER_MOMENTUM,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
        }

    @classmethod
    def output_tasks(cls, cfg: CfgNode) -> set[str]:
        return {LOCALIZATION}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def training_hooks(self) -> list[HookBase]:
        """Hooks the trainer runs with this model: the teacher's EMA update."""
        return [TeacherEMAHook(self)]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        for name, teacher_module in self.teacher.items():
            student = list(getattr(self, name).parameters())
            teacher = list(teacher_module.parameters())
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1.0 - momentum)

    def _images(self, batched_inputs: list[dict], key: str) -> torch.Tensor:
        images = torch.stack([x[key] for x in batched_inputs]).to(self.device, non_blocking=True)
        if images.dim() == 5:  # [B, F, 3, S, S] focal queries -> [B * F, 3, S, S]
            images = images.flatten(0, 1)
        return (images.float() - self.pixel_mean) / self.pixel_std

    def _stacked(self, batched_inputs: list[dict], key: str) -> torch.Tensor:
        return torch.stack([torch.as_tensor(x[key]) for x in batched_inputs]).to(self.device)

    def forward(self, batched_inputs: list[dict]):
        """``batched_inputs``: the ``loca`` mapper's dicts (see LocaViewMapper).

        Returns the loss dict in training, else one ``{"localization": {"correct", "valid"}}``
        per image."""
        num_images = len(batched_inputs)
        query_keep = self._stacked(batched_inputs, "query_keep")  # [B, K]
        query_positions = torch.gather(self._stacked(batched_inputs, "query_positions"), 1, query_keep)  # [B, K]
        focal_positions = self._stacked(batched_inputs, "focal_positions")  # [B, F, S]
        num_focal = focal_positions.shape[1]

        with torch.no_grad():
            reference_tokens, _ = self.teacher["backbone"].forward_tokens(self._images(batched_inputs, "reference"))
            targets = None
            if self.projection_head is not None and self.training:
                teacher_logits = self.teacher["projection_head"](reference_tokens).float()  # [B, P, K]
                assignments = F.softmax(teacher_logits / self.teacher_temperature, dim=-1).flatten(0, 1)
                targets = sinkhorn(assignments, self.sinkhorn_iterations)  # [B * P, K]
        start = self._stacked(batched_inputs, "reference_keep_start")  # [B]
        visible_index = start[:, None] + torch.arange(self.reference_tokens_kept, device=self.device)
        visible = torch.gather(
            reference_tokens, 1, visible_index[..., None].expand(-1, -1, reference_tokens.shape[-1])
        )  # [B, M, C]

        query_tokens, _ = self.backbone.forward_tokens(self._images(batched_inputs, "query"), query_keep)  # [B, K, C]
        query_logits = self.position_head(query_tokens, visible)  # [B, K, P]
        position_logits = [query_logits.flatten(0, 1)]
        positions = [query_positions.flatten()]
        image_of_patch = [torch.arange(num_images, device=self.device).repeat_interleave(query_keep.shape[1])]
        student_tokens = [query_tokens.flatten(0, 1)]
        if num_focal:
            focal_tokens, _ = self.backbone.forward_tokens(self._images(batched_inputs, "focal_queries"))  # [B*F, S, C]
            focal_logits = self.position_head(focal_tokens, visible.repeat_interleave(num_focal, dim=0))
            position_logits.append(focal_logits.flatten(0, 1))
            positions.append(focal_positions.flatten())
            patches_per_image = focal_positions[0].numel()
            image_of_patch.append(torch.arange(num_images, device=self.device).repeat_interleave(patches_per_image))
            student_tokens.append(focal_tokens.flatten(0, 1))
        position_logits = torch.cat(position_logits)  # [N, P]
        positions = torch.cat(positions)  # [N]
        image_of_patch = torch.cat(image_of_patch)  # [N]

        if not self.training:
            return self._localization_counts(position_logits, positions, image_of_patch, num_images)

        loss_localization, correct = localization_loss(position_logits, positions)
        losses = {"loss_localization": loss_localization}
        num_valid = int((positions >= 0).sum())
        self._log_accuracy(int(correct), num_valid)
        if self.projection_head is not None:
            student_logits = self.projection_head(torch.cat(student_tokens))  # [N, K]
            target_rows = image_of_patch * self.num_reference_positions + positions.clamp(min=0)
            loss_cluster, neg_entropy = cluster_prediction_losses(
                student_logits, targets[target_rows], positions, self.student_temperature
            )
            losses["loss_cluster"] = loss_cluster
            losses["loss_me_max"] = self.me_max_weight * neg_entropy
        return losses

    @staticmethod
    def _localization_counts(
        logits: torch.Tensor, positions: torch.Tensor, image_of_patch: torch.Tensor, num_images: int
    ) -> list[dict]:
        valid = positions >= 0
        correct = (logits.argmax(dim=-1) == positions) & valid
        valid_per_image = torch.zeros(num_images, dtype=torch.long, device=logits.device).index_add_(
            0, image_of_patch, valid.long()
        )
        correct_per_image = torch.zeros_like(valid_per_image).index_add_(0, image_of_patch, correct.long())
        return [
            {"localization": {"correct": int(c), "valid": int(v)}}
            for c, v in zip(correct_per_image.tolist(), valid_per_image.tolist())
        ]

    @staticmethod
    def _log_accuracy(correct: int, valid: int) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # called outside a trainer (no event storage): nothing to log to
            return
        if valid:
            storage.put_scalar("loca/train_localization_top1", 100.0 * correct / valid)

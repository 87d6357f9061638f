"""kMaX-DeepLab's transformer decoder: cluster centres refined by k-means cross-attention.

Standard cross-attention updates object queries (here: cluster centres C) with a softmax over all
pixels. kMaX replaces that softmax over pixels by a hard assignment over clusters:

    M = mask logits of C against the pixel features           [B, N, HW]
    A = onehot(argmax_N M)        (no gradient)                each pixel goes to one cluster
    C <- C + A V_p^T                                           each cluster gathers its pixels

which is one k-means step. M is also the layer's mask prediction, so the deep supervision of every
layer's masks is what trains the (non-differentiable) assignment.

Six layers (2 per pixel stride 32, 16, 8) refine the centres; a final predictor reads the stride-4
pixel features. An auxiliary semantic head (Panoptic-DeepLab style ASPP decoder, or a light head)
is trained on the backbone features.

Module and parameter names are those of the official PyTorch port (bytedance/kmax-deeplab),
including its spelling ``_predcitor``, so that its checkpoints load with no missing or unexpected
keys.
"""
import math
from collections.abc import Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from detectron2.utils.registry import Registry

from ...layers.precision import at_least_float32
from .layers import ConvBN, get_kmax_norm, tf_align_corners, trunc_normal_tf_
from .semantic_decoder import SemanticPredictor, light_semantic_head

__all__ = [
    "KMAX_DECODER_REGISTRY",
    "kMaXPredictor",
    "kMaXTransformerDecoder",
    "kMaXTransformerLayer",
    "kmeans_cross_attention",
    "void_prior_bias",
]

KMAX_DECODER_REGISTRY = Registry("KMAX_DECODER")
KMAX_DECODER_REGISTRY.__doc__ = """kMaX-DeepLab's transformer decoders, named by MODEL.KMAX_DEEPLAB.TRANS_DEC.NAME.

Contract: ``KMAX_DECODER_REGISTRY.get(name)(cfg, input_shape)``, ``input_shape`` being the
backbone's ``{name: ShapeSpec}`` (the auxiliary semantic head reads backbone features); the module's
``forward(multi_scale_features, panoptic_features, semantic_features)`` takes the pixel decoder's
three outputs and returns {"pred_logits" [B, N, K+1], "pred_masks" [B, N, H/4, W/4],
"pixel_feature", "aux_semantic_pred", "aux_outputs": one such dict per kMaX layer}.
"""

# Prior probability of the void class at initialisation (deeplab2's MaX-DeepLab decoder): almost
# every cluster predicts void at first, so that the early, poor masks do not claim classes.
VOID_PRIOR_PROBABILITY = 0.9


def void_prior_bias(num_classes_with_void: int, void_prior_prob: float = VOID_PRIOR_PROBABILITY) -> torch.Tensor:
    """Bias [K+1] that makes softmax give the void class (last) ``void_prior_prob`` at zero logits:
    log((K) * p / (1 - p)) on void, 0 elsewhere, with K = ``num_classes_with_void - 1``."""
    # float64, so that a float64 model adds the exact value (a float32 model rounds it once).
    bias = torch.zeros(num_classes_with_void, dtype=torch.float64)
    bias[-1] = math.log((num_classes_with_void - 1) * void_prior_prob / (1 - void_prior_prob))
    return bias


def kmeans_cross_attention(mask_logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The k-means update of the cluster centres.

    Args:
        mask_logits: [B, N, HW] affinity of every cluster with every pixel.
        pixel_values: [B, C, HW] pixel values V_p.

    Returns:
        [B, C, N]: for every cluster, the sum of the values of the pixels whose best cluster it is
        (``onehot(argmax_N mask_logits) @ V_p^T``), in float32. The assignment carries no gradient;
        the values do.
    """
    with torch.no_grad():
        best_cluster = mask_logits.argmax(dim=1, keepdim=True)
        assignment = torch.zeros_like(at_least_float32(mask_logits)).scatter_(1, best_cluster, 1.0)
    # Sums over up to HW pixels: in half precision they would overflow / lose the small clusters.
    with torch.autocast(device_type=pixel_values.device.type, enabled=False):
        return torch.einsum("bnm,bcm->bcn", assignment, at_least_float32(pixel_values))


class AttentionOperation(nn.Module):
    """Multi-head attention core with batch-normalised logits (instead of 1/sqrt(d)) and a BN +
    GELU on the retrieved values (deeplab2's dual-path transformer attention)."""

    def __init__(self, channels_v: int, num_heads: int, norm: str = "SyncBN"):
        super().__init__()
        self._batch_norm_similarity = get_kmax_norm(norm, num_heads, ndim=2)
        self._batch_norm_retrieved_value = get_kmax_norm(norm, channels_v, ndim=1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query, key: [B, heads, d_k, L]; value: [B, heads, d_v, L] -> [B, heads * d_v, L]."""
        batch, heads, value_depth, length = value.shape
        similarity = self._batch_norm_similarity(torch.einsum("bhdl,bhdm->bhlm", query, key))
        # float32 softmax even under autocast, as in the official port.
        with torch.autocast(device_type=query.device.type, enabled=False):
            weights = F.softmax(at_least_float32(similarity), dim=-1)
        retrieved = torch.einsum("bhlm,bhdm->bhdl", weights.to(value.dtype), value)
        retrieved = self._batch_norm_retrieved_value(retrieved.reshape(batch, heads * value_depth, length))
        return F.gelu(retrieved)


class kMaXPredictor(nn.Module):
    """Class and mask prediction from cluster centres and pixel features.

    pixel head: depthwise 5x5 + BN + GELU -> 1x1 + BN + GELU -> 1x1 (bias) + BN -> L2-normalise
    (the pixel embedding, ``mask_dim`` channels); mask logits = BN_1(<pixel embedding, mask kernel>)
    with a one-channel BN whose gamma starts at 0.1; class logits = 1x1 conv (K+1), biased
    towards void.
    """

    def __init__(
        self,
        in_channel_pixel: int,
        in_channel_query: int,
        num_classes: int,
        *,
        hidden_dim: int = 256,
        mask_dim: int = 128,
        norm: str = "SyncBN",
    ):
        """
        Args:
            in_channel_pixel: channels of the pixel features.
            in_channel_query: channels of the mask / class embeddings.
            num_classes: K+1, void included.
            hidden_dim: width of the pixel head's middle layer.
            mask_dim: channels of the pixel embedding and mask kernels.
        """
        super().__init__()
        self._pixel_space_head_conv0bnact = ConvBN(
            in_channel_pixel, in_channel_pixel, 5, padding=2, groups=in_channel_pixel, norm=norm, act="gelu",
            conv_init="xavier_uniform",
        )
        self._pixel_space_head_conv1bnact = ConvBN(in_channel_pixel, hidden_dim, 1, norm=norm, act="gelu")
        self._pixel_space_head_last_convbn = ConvBN(hidden_dim, mask_dim, 1, bias=True, norm=norm)
        trunc_normal_tf_(self._pixel_space_head_last_convbn.conv.weight, std=0.01)

        self._transformer_mask_head = ConvBN(in_channel_query, mask_dim, 1, norm=norm, ndim=1)
        self._transformer_class_head = ConvBN(in_channel_query, num_classes, 1, bias=True, norm="", ndim=1)
        trunc_normal_tf_(self._transformer_class_head.conv.weight, std=0.01)
        # Starts the mask logits small (cosine similarities x 0.1), so the softmax over clusters
        # starts near uniform.
        # Normalises the [B, 1, N, H, W] stack of all masks as one channel.
        self._pixel_space_mask_batch_norm = get_kmax_norm(norm, 1, ndim=3)
        if isinstance(self._pixel_space_mask_batch_norm, nn.modules.batchnorm._BatchNorm):
            nn.init.constant_(self._pixel_space_mask_batch_norm.weight, 0.1)
        self.register_buffer("_void_prior_bias", void_prior_bias(num_classes), persistent=False)

    def forward(
        self, mask_embeddings: torch.Tensor, class_embeddings: torch.Tensor, pixel_feature: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            mask_embeddings, class_embeddings: [B, C_q, N].
            pixel_feature: [B, C_p, H, W].

        Returns:
            "class_logits" [B, N, K+1], "mask_logits" [B, N, H, W], "pixel_feature" [B, mask_dim, H, W]
            (L2-normalised over channels).
        """
        pixel_space = self._pixel_space_head_conv0bnact(pixel_feature)
        pixel_space = self._pixel_space_head_conv1bnact(pixel_space)
        pixel_space = F.normalize(self._pixel_space_head_last_convbn(pixel_space), p=2, dim=1)

        class_logits = self._transformer_class_head(class_embeddings).transpose(1, 2)
        class_logits = class_logits + self._void_prior_bias.to(class_logits.dtype)
        mask_kernels = self._transformer_mask_head(mask_embeddings)
        mask_logits = torch.einsum("bchw,bcn->bnhw", pixel_space, mask_kernels)
        mask_logits = self._pixel_space_mask_batch_norm(mask_logits.unsqueeze(1)).squeeze(1)
        return {"class_logits": class_logits, "mask_logits": mask_logits, "pixel_feature": pixel_space}


class kMaXTransformerLayer(nn.Module):
    """One kMaX layer: k-means cross-attention, query self-attention, FFN (all residual, GELU
    after each residual sum, each residual branch ending in a gamma-0 BN and drop path)."""

    def __init__(
        self,
        num_classes: int,
        in_channel_pixel: int,
        in_channel_query: int = 256,
        base_filters: int = 128,
        num_heads: int = 8,
        bottleneck_expansion: float = 2.0,
        key_expansion: float = 1.0,
        value_expansion: float = 2.0,
        dim_feedforward: int = 2048,
        drop_path_prob: float = 0.0,
        norm: str = "SyncBN",
    ):
        """
        Args:
            num_classes: K+1, void included.
            in_channel_pixel: channels of this layer's pixel features.
            in_channel_query: channels of the cluster centres.
            base_filters: the bottleneck is ``base_filters * bottleneck_expansion`` wide, the
                self-attention's keys ``* key_expansion`` and values ``* value_expansion``.
        """
        super().__init__()
        self._num_heads = num_heads
        self._bottleneck_channels = int(round(base_filters * bottleneck_expansion))
        self._total_key_depth = int(round(base_filters * key_expansion))
        self._total_value_depth = int(round(base_filters * value_expansion))
        if self._total_key_depth % num_heads or self._total_value_depth % num_heads:
            raise ValueError(
                f"key depth {self._total_key_depth} and value depth {self._total_value_depth} must be multiples of "
                f"num_heads={num_heads}"
            )
        bottleneck = self._bottleneck_channels

        self._pixel_conv1_bn_act = ConvBN(in_channel_pixel, bottleneck, 1, norm=norm, act="gelu")
        self._pixel_v_conv_bn = ConvBN(bottleneck, self._total_value_depth, 1, norm=norm)
        trunc_normal_tf_(self._pixel_v_conv_bn.conv.weight, std=bottleneck**-0.5)
        self._query_conv1_bn_act = ConvBN(in_channel_query, bottleneck, 1, norm=norm, act="gelu", ndim=1)
        self._predcitor = kMaXPredictor(
            bottleneck, bottleneck, num_classes, hidden_dim=bottleneck, mask_dim=base_filters, norm=norm
        )
        self._kmeans_query_batch_norm_retrieved_value = get_kmax_norm(norm, self._total_value_depth, ndim=1)
        self._kmeans_query_conv3_bn = ConvBN(
            self._total_value_depth, in_channel_query, 1, norm=norm, ndim=1, norm_init=0.0
        )

        self._query_qkv_conv_bn = ConvBN(
            bottleneck, 2 * self._total_key_depth + self._total_value_depth, 1, norm=norm, ndim=1
        )
        trunc_normal_tf_(self._query_qkv_conv_bn.conv.weight, std=bottleneck**-0.5)
        self._query_self_attention = AttentionOperation(self._total_value_depth, num_heads, norm=norm)
        self._query_conv3_bn = ConvBN(self._total_value_depth, in_channel_query, 1, norm=norm, ndim=1, norm_init=0.0)

        self._query_ffn_conv1_bn_act = ConvBN(in_channel_query, dim_feedforward, 1, norm=norm, act="gelu", ndim=1)
        self._query_ffn_conv2_bn = ConvBN(dim_feedforward, in_channel_query, 1, norm=norm, ndim=1, norm_init=0.0)

        # One rate for the three residual branches, as deeplab2; separate modules so that each
        # branch drops independently.
        self.drop_path_kmeans = StochasticDepth(drop_path_prob, mode="row")
        self.drop_path_attn = StochasticDepth(drop_path_prob, mode="row")
        self.drop_path_ffn = StochasticDepth(drop_path_prob, mode="row")

    def forward(
        self, pixel_feature: torch.Tensor, query_feature: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            pixel_feature: [B, C_p, H, W] (un-activated pixel-decoder output).
            query_feature: [B, C_q, N] cluster centres.

        Returns:
            the updated centres [B, C_q, N] and the layer's prediction (see kMaXPredictor), made
            from the centres *before* this layer's update: that prediction is the assignment.
        """
        batch, _, height, width = pixel_feature.shape
        num_clusters = query_feature.shape[-1]
        pixel_space = self._pixel_conv1_bn_act(F.gelu(pixel_feature))
        query_space = self._query_conv1_bn_act(query_feature)

        pixel_values = self._pixel_v_conv_bn(pixel_space).reshape(batch, self._total_value_depth, height * width)
        prediction = self._predcitor(
            mask_embeddings=query_space, class_embeddings=query_space, pixel_feature=pixel_space
        )
        kmeans_update = kmeans_cross_attention(prediction["mask_logits"].flatten(2), pixel_values)
        kmeans_update = self._kmeans_query_conv3_bn(self._kmeans_query_batch_norm_retrieved_value(kmeans_update))
        query_feature = query_feature + self.drop_path_kmeans(kmeans_update.to(query_feature.dtype))

        heads = self._num_heads
        qkv = self._query_qkv_conv_bn(query_space)
        query, key, value = torch.split(
            qkv, [self._total_key_depth, self._total_key_depth, self._total_value_depth], dim=1
        )
        attention = self._query_self_attention(
            query.reshape(batch, heads, -1, num_clusters),
            key.reshape(batch, heads, -1, num_clusters),
            value.reshape(batch, heads, -1, num_clusters),
        )
        query_feature = F.gelu(query_feature + self.drop_path_attn(self._query_conv3_bn(attention)))

        ffn = self._query_ffn_conv2_bn(self._query_ffn_conv1_bn_act(query_feature))
        query_feature = F.gelu(query_feature + self.drop_path_ffn(ffn))
        return query_feature, prediction


@KMAX_DECODER_REGISTRY.register()
class kMaXTransformerDecoder(nn.Module):
    """Cluster centres refined by kMaX layers over the stride-32/16/8 pixel features, then
    predicted against the stride-4 features (see the module docstring).

    Built through :data:`KMAX_DECODER_REGISTRY` (see its contract).
    """

    @configurable
    def __init__(
        self,
        *,
        dec_layers: Sequence[int],
        in_channels: Sequence[int],
        num_classes: int,
        num_queries: int,
        drop_path_prob: float,
        add_aux_semantic_pred: bool,
        use_aux_semantic_decoder: bool,
        input_shape_from_backbone: dict[str, ShapeSpec],
        aux_semantic_decoder_channels: int = 256,
        hidden_dim: int = 256,
        dim_feedforward: int = 2048,
        num_heads: int = 8,
        norm: str = "SyncBN",
    ):
        """
        Args:
            dec_layers: kMaX layers on the stride-32, 16 and 8 features ([2, 2, 2]).
            in_channels: channels of the pixel features at strides 32, 16, 8 and 4.
            num_classes: K (things + stuff), without void.
            num_queries: number of cluster centres N.
            drop_path_prob: stochastic depth of every residual branch of the kMaX layers.
            add_aux_semantic_pred: build the auxiliary semantic head (trained only).
            use_aux_semantic_decoder: the ASPP decoder (K+1 outputs, COCO / ADE20K) rather than the
                light head (K outputs, Cityscapes), as in the official port.
            input_shape_from_backbone: backbone shapes; the semantic head reads res5, res3, res2.
            aux_semantic_decoder_channels: width of the ASPP decoder's ASPP and head.
            hidden_dim: channels of the cluster centres (and of the layers' bottleneck; keys are
                half as wide, as are the mask embeddings).
            dim_feedforward: hidden width of the cluster FFN.
        """
        super().__init__()
        if len(dec_layers) != 3 or len(in_channels) != 4:
            raise ValueError(
                "TRANS_DEC.DEC_LAYERS needs 3 entries (layers at strides 32, 16, 8) and TRANS_DEC.IN_CHANNELS 4 "
                f"(pixel-decoder channels at strides 32, 16, 8, 4); got {list(dec_layers)} and {list(in_channels)}"
            )
        if hidden_dim % 2:
            raise ValueError(f"TRANS_DEC.HIDDEN_DIM must be even, got {hidden_dim}")
        self._num_blocks = list(dec_layers)
        self._num_queries = num_queries
        base_filters = hidden_dim // 2
        self._kmax_transformer_layers = nn.ModuleList(
            kMaXTransformerLayer(
                num_classes + 1,
                in_channel_pixel=channels,
                in_channel_query=hidden_dim,
                base_filters=base_filters,
                num_heads=num_heads,
                dim_feedforward=dim_feedforward,
                drop_path_prob=drop_path_prob,
                norm=norm,
            )
            for channels, num_layers in zip(in_channels[:3], dec_layers)
            for _ in range(num_layers)
        )
        # [C, N], the official layout: an Embedding whose "vocabulary" is the channel axis.
        self._cluster_centers = nn.Embedding(hidden_dim, num_queries)
        trunc_normal_tf_(self._cluster_centers.weight, std=1.0)
        self._class_embedding_projection = ConvBN(hidden_dim, hidden_dim, 1, norm=norm, act="gelu", ndim=1)
        self._mask_embedding_projection = ConvBN(hidden_dim, hidden_dim, 1, norm=norm, act="gelu", ndim=1)
        self._predcitor = kMaXPredictor(
            in_channels[-1], hidden_dim, num_classes + 1, hidden_dim=hidden_dim, mask_dim=base_filters, norm=norm
        )

        self._add_aux_semantic_pred = add_aux_semantic_pred
        self._use_aux_semantic_decoder = use_aux_semantic_decoder
        if add_aux_semantic_pred:
            for name in ("res2", "res3", "res5") if use_aux_semantic_decoder else ("res5",):
                if name not in input_shape_from_backbone:
                    raise ValueError(
                        f"the auxiliary semantic head reads the backbone feature {name!r}, which the backbone does not "
                        f"output ({sorted(input_shape_from_backbone)})"
                    )
            res5 = input_shape_from_backbone["res5"].channels
            if use_aux_semantic_decoder:
                self._auxiliary_semantic_predictor = SemanticPredictor(
                    res5,
                    input_shape_from_backbone["res3"].channels,
                    input_shape_from_backbone["res2"].channels,
                    num_classes + 1,
                    norm=norm,
                    aspp_channels=aux_semantic_decoder_channels,
                )
            else:
                self._auxiliary_semantic_predictor = light_semantic_head(res5, num_classes, norm)

    @classmethod
    def from_config(cls, cfg, input_shape_from_backbone: dict[str, ShapeSpec]):
        dec = cfg.MODEL.KMAX_DEEPLAB.TRANS_DEC
        return {
            "dec_layers": dec.DEC_LAYERS,
            "in_channels": dec.IN_CHANNELS,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "num_queries": dec.NUM_OBJECT_QUERIES,
            "drop_path_prob": dec.DROP_PATH_PROB,
            "add_aux_semantic_pred": cfg.MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_WEIGHT > 0,
            "use_aux_semantic_decoder": cfg.MODEL.KMAX_DEEPLAB.USE_AUX_SEMANTIC_DECODER,
            "input_shape_from_backbone": input_shape_from_backbone,
            "aux_semantic_decoder_channels": cfg.MODEL.KMAX_DEEPLAB.AUX_SEMANTIC_DECODER_CHANNELS,
            "hidden_dim": dec.HIDDEN_DIM,
            "dim_feedforward": dec.DIM_FEEDFORWARD,
            "num_heads": dec.NUM_HEADS,
            "norm": cfg.MODEL.KMAX_DEEPLAB.NORM,
        }

    def forward(
        self,
        multi_scale_features: Sequence[torch.Tensor],
        panoptic_features: torch.Tensor,
        semantic_features: Sequence[torch.Tensor],
    ) -> dict:
        """
        Args:
            multi_scale_features: pixel-decoder outputs at strides 32, 16, 8, [B, C_i, h_i, w_i].
            panoptic_features: pixel-decoder output at stride 4, [B, C_4, H, W].
            semantic_features: backbone features at strides 32, 8, 4 (for the semantic head).

        Returns:
            "pred_logits" [B, N, K+1], "pred_masks" [B, N, H, W] (logits), "pixel_feature"
            [B, D, H, W]: the final prediction; "aux_outputs": one such dict per kMaX layer at its
            own stride (h_i, w_i), whose "pred_masks" argmax over N is that layer's pixel-to-cluster
            assignment; in training, "aux_semantic_pred" [B, K+1 (or K), H, W] when the semantic
            head exists.
        """
        batch = panoptic_features.shape[0]
        cluster_centers = self._cluster_centers.weight.unsqueeze(0).expand(batch, -1, -1)
        layers = iter(self._kmax_transformer_layers)
        aux_outputs = []
        for features, num_layers in zip(multi_scale_features, self._num_blocks):
            for _ in range(num_layers):
                cluster_centers, prediction = next(layers)(features, cluster_centers)
                aux_outputs.append(
                    {
                        "pred_logits": prediction["class_logits"],
                        "pred_masks": prediction["mask_logits"],
                        "pixel_feature": prediction["pixel_feature"],
                    }
                )
        prediction = self._predcitor(
            mask_embeddings=self._mask_embedding_projection(cluster_centers),
            class_embeddings=self._class_embedding_projection(cluster_centers),
            pixel_feature=panoptic_features,
        )
        outputs = {
            "pred_logits": prediction["class_logits"],
            "pred_masks": prediction["mask_logits"],
            "pixel_feature": prediction["pixel_feature"],
            "aux_outputs": aux_outputs,
        }
        if self._add_aux_semantic_pred and self.training:
            coarse, os8, os4 = semantic_features
            if self._use_aux_semantic_decoder:
                outputs["aux_semantic_pred"] = self._auxiliary_semantic_predictor(coarse, os8, os4)
            else:
                outputs["aux_semantic_pred"] = self._auxiliary_semantic_predictor(coarse)
        return outputs


def resize_aux_outputs(outputs: dict, size: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """The per-layer predictions of ``outputs["aux_outputs"]`` with masks and pixel features
    bilinearly resized to ``size`` (the final prediction's), as the losses compare them there."""
    align_corners = tf_align_corners(size)
    resized = []
    for aux in outputs["aux_outputs"]:
        entry = dict(aux)
        for key in ("pred_masks", "pixel_feature"):
            entry[key] = F.interpolate(aux[key], size=tuple(size), mode="bilinear", align_corners=align_corners)
        resized.append(entry)
    return resized

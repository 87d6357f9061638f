"""Layers shared by kMaX-DeepLab's pixel decoder and kMaX transformer decoder.

kMaX-DeepLab was designed in TensorFlow (deeplab2); its PyTorch port keeps the TF numerics that
matter for training and for loading its checkpoints, and so do these layers:

- batch norm with TF's defaults, eps 1e-3 and momentum 0.01 (PyTorch counts momentum the other
  way round: TF's decay 0.99 is PyTorch's 0.01);
- TF-style truncated-normal initialisation (cut at two standard deviations *of the draw*);
- the BN that ends a residual branch starts with gamma 0, so every residual block starts as its
  shortcut;
- attention softmax in float32 even under mixed precision.

Module and attribute names (``conv`` / ``norm`` / ``act``, ``qkv_transform``, ``_query_rpe``,
``_batch_norm_similarity``, ...) are those of the official port (bytedance/kmax-deeplab), so its
state dicts load unchanged.
"""
import math
from collections.abc import Sequence
from typing import Optional

import torch
from detectron2.utils import comm
from torch import nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from ...layers.precision import at_least_float32
from ...layers.recompute import checkpointed_call

__all__ = [
    "MAX_SPAN",
    "TF_BN_EPS",
    "TF_BN_MOMENTUM",
    "AxialAttention",
    "AxialAttention2D",
    "BlockGroup",
    "ConvBN",
    "DepthwiseConv2d",
    "RelativePositionalEncoding",
    "SingleBlock",
    "get_kmax_norm",
    "gelu_then_convolutions",
    "recompute_activations",
    "tf_align_corners",
    "trunc_normal_tf_",
]

TF_BN_EPS = 1e-3
TF_BN_MOMENTUM = 0.01
# Largest relative distance an encoding can represent is MAX_SPAN - 1, so one axis of an axial
# attention layer can be at most MAX_SPAN long (the table has 2 * MAX_SPAN - 1 rows).
MAX_SPAN = 255


def tf_align_corners(size: Sequence[int]) -> bool:
    """Bilinear resizing convention for a map of ``size`` (..., W): kMaX's odd sizes
    (k * stride + 1) follow TF's align-corners grid, where coarse pixel i sits exactly on fine pixel
    i * stride; even sizes use the half-pixel grid. Decided on the width, as the official port."""
    return size[-1] % 2 == 1


def trunc_normal_tf_(tensor: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """TensorFlow's truncated normal: draw N(0, 1) cut at +-2, then scale by ``std``.

    ``nn.init.trunc_normal_(std=s, a=-2, b=2)`` cuts at +-2 in absolute units, which for small ``s``
    is no cut at all; TF (and the official port, through timm's ``trunc_normal_tf_``) cuts at 2 s.
    """
    with torch.no_grad():
        nn.init.trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0)
        return tensor.mul_(std)


def get_kmax_norm(norm: str, channels: int, ndim: int = 2) -> nn.Module:
    """A TF-style batch norm (eps 1e-3, momentum 0.01).

    Args:
        norm: "SyncBN" (statistics over all processes; the published recipe), "BN" (per-process
            statistics; needed for multi-process CPU training, which SyncBatchNorm does not support)
            or "" for none (identity).
        channels: number of channels C.
        ndim: 1 for [B, C, L] inputs, 2 for [B, C, H, W], 3 for [B, C, D, H, W] (only matters
            for "BN").
    """
    if norm == "":
        return nn.Identity()
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels, eps=TF_BN_EPS, momentum=TF_BN_MOMENTUM)
    if norm == "BN":
        batch_norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim]
        return batch_norm(channels, eps=TF_BN_EPS, momentum=TF_BN_MOMENTUM)
    raise ValueError(f"kMaX norm must be 'SyncBN', 'BN' or '' (none), got {norm!r}")


def _activation(name: str) -> nn.Module:
    activations = {"": nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU}
    if name not in activations:
        raise ValueError(f"activation must be one of {sorted(activations)}, got {name!r}")
    return activations[name]()


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, groups=channels, ...)`` that computes in
    float32 on channels-last memory for CPU maps of at most ``CHANNELS_LAST_MAX_PIXELS`` pixels.

    On small maps oneDNN's backward pass of a depthwise convolution in bfloat16 (autocast) or on
    NCHW memory is several times slower than in float32 channels-last: forward and backward of a
    5x5 kernel on [8, 64, 32, 32] take 11.0 ms under autocast against 6.9 ms this way (2 threads,
    layout changes included). On large maps the layout changes cost more than the kernel saves:
    [1, 256, 81, 81] takes 24.7 against 43.5 ms, so those, and every other device, run
    ``nn.Conv2d`` as is (BENCHMARKS.md, "CPU training step"). Same parameters, output dtype and
    NCHW layout as ``nn.Conv2d`` either way, in and out of autocast.
    """

    # 45x45: channels-last won on every measured map up to 41x41 and lost from 64x64 on at batch 1.
    CHANNELS_LAST_MAX_PIXELS = 2048

    def __init__(self, channels: int, kernel_size: int, **kwargs):
        super().__init__(channels, channels, kernel_size, groups=channels, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H', W']."""
        if x.device.type != "cpu" or x.shape[-2] * x.shape[-1] > self.CHANNELS_LAST_MAX_PIXELS:
            return super().forward(x)
        out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        # float32 under autocast (bfloat16 input, float32 weight); float64 stays float64.
        compute_dtype = torch.promote_types(x.dtype, self.weight.dtype)
        x_channels_last = x.to(compute_dtype, memory_format=torch.channels_last)
        if x_channels_last.requires_grad:
            # The input gradient comes out channels-last; the layer before expects NCHW.
            x_channels_last.register_hook(lambda grad: grad.contiguous())
        with torch.autocast("cpu", enabled=False):
            out = super().forward(x_channels_last)
        return out.to(dtype=out_dtype, memory_format=torch.contiguous_format)


class ConvBN(nn.Module):
    """Convolution, then optional TF-style batch norm, then optional activation.

    Submodules ``conv``, ``norm``, ``act`` (the latter two are parameter-free identities when
    disabled), as in the official port. With ``recompute_norm_act`` (set by
    :func:`recompute_activations`) the norm's output, which the activation would keep for
    backward, is computed again there from the convolution's output, which the norm keeps anyway.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: str = "SyncBN",
        act: str = "",
        ndim: int = 2,
        conv_init: str = "he_normal",
        norm_init: float = 1.0,
    ):
        """
        Args:
            ndim: 2 for a Conv2d on [B, C, H, W], 1 for a Conv1d on [B, C, L].
            bias: off by default, as a BN follows almost every conv here. (The official ConvBN
                defaults to True: its calls that omit ``bias`` need ``bias=True``.)
            norm: see :func:`get_kmax_norm`; "" disables it.
            act: "gelu", "relu" or "" (none).
            conv_init: "he_normal" (TF-truncated normal with std sqrt(2 / in_channels), as the
                official port computes it: without the kernel area) or "xavier_uniform".
            norm_init: initial BN gamma; 0 for the BN that ends a residual branch.
        """
        super().__init__()
        if ndim == 2 and groups == in_channels == out_channels and groups > 1:
            self.conv = DepthwiseConv2d(
                in_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=bias
            )
        else:
            conv = {1: nn.Conv1d, 2: nn.Conv2d}[ndim]
            self.conv = conv(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=bias,
            )
        self.norm = get_kmax_norm(norm, out_channels, ndim)
        self.act = _activation(act)
        self.recompute_norm_act = False

        if conv_init == "he_normal":
            trunc_normal_tf_(self.conv.weight, std=math.sqrt(2.0 / in_channels))
        elif conv_init == "xavier_uniform":
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            raise ValueError(f"conv_init must be 'he_normal' or 'xavier_uniform', got {conv_init!r}")
        if bias:
            nn.init.zeros_(self.conv.bias)
        if norm:
            nn.init.constant_(self.norm.weight, norm_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, C_out, H', W'] (or [B, C, L] for ndim=1)."""
        return self.norm_act(self.conv(x))

    def norm_act(self, conv_output: torch.Tensor) -> torch.Tensor:
        """The norm and activation of ``conv_output``, the output of ``self.conv``."""
        return checkpointed_call(self._norm_then_act, conv_output, enabled=self.recompute_norm_act)

    def _norm_then_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))


def gelu_then_convolutions(
    x: torch.Tensor, convolutions: Sequence[Optional[nn.Module]], recompute: bool = False
) -> tuple[torch.Tensor, ...]:
    """``conv(GELU(x))`` for each of ``convolutions``; GELU(x) itself for a None.

    The GELU keeps x for its backward and each convolution would keep the GELU's output, a second
    map as large; with ``recompute`` that output runs again in backward instead (the convolution
    outputs are kept, as the norms after them keep them anyway).
    """

    def convolve(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        activated = F.gelu(x)
        return tuple(activated if conv is None else conv(activated) for conv in convolutions)

    return checkpointed_call(convolve, x, enabled=recompute, cheap_only=True)


def recompute_activations(model: nn.Module, enabled: bool = True) -> int:
    """Recompute in backward, instead of keeping, two kinds of activation map of ``model``:

    - the output of the batch norm in every :class:`ConvBN` whose norm feeds an activation
      (``recompute_norm_act``): the norm runs again on the kept convolution output;
    - the GELU output that the convolutions of a pixel-decoder block or fuse read (modules with a
      ``recompute_input_activation`` switch): the GELU runs again on its kept input.

    Each is one map less per place for one more pass of a norm or a GELU; the gradients and
    running statistics stay the same. Modules inside a block group that recomputes whole blocks
    are left alone (they run again in backward anyway), and so are sync batch norms when this
    process is one of several (they would gather their statistics across processes again inside
    the backward pass); alone, they are plain batch norms. Returns how many were switched.
    """
    several_processes = comm.get_world_size() > 1
    recomputed_whole = {
        inner
        for group in model.modules()
        if isinstance(group, BlockGroup) and group.activation_checkpoint
        for inner in group.modules()
    }
    switched = 0
    for module in model.modules():
        if module in recomputed_whole:
            continue
        if hasattr(module, "recompute_input_activation"):
            module.recompute_input_activation = enabled
            switched += 1
        elif (
            isinstance(module, ConvBN)
            and isinstance(module.norm, nn.modules.batchnorm._BatchNorm)
            and not (several_processes and isinstance(module.norm, nn.SyncBatchNorm))
            and not isinstance(module.act, nn.Identity)
        ):
            module.recompute_norm_act = enabled
            switched += 1
    return switched


class RelativePositionalEncoding(nn.Module):
    """1-D relative position encodings for one attention axis.

    A table of ``2 * MAX_SPAN - 1`` learned vectors (``_embeddings``, TF-truncated normal with
    std 1), one per signed distance key - query. The query/key lengths are fixed at construction
    (kMaX pads every input to one size), so the distance -> row index map is precomputed.
    Keys may extend past the queries by an equal margin on both sides.
    """

    def __init__(self, query_length: int, key_length: int, depth: int):
        super().__init__()
        if (key_length - query_length) % 2 or key_length < query_length:
            raise ValueError(
                f"key_length ({key_length}) must be query_length ({query_length}) plus an equal margin on both sides"
            )
        margin = (key_length - query_length) // 2
        # Distances key - query span +-(query_length - 1 + margin); the table holds +-(MAX_SPAN - 1).
        if query_length + margin > MAX_SPAN:
            raise ValueError(
                f"an axial-attention axis of {key_length} positions exceeds the maximum "
                f"relative span of {MAX_SPAN}; use a smaller fixed input size (INPUT.IMAGE_SIZE)"
            )
        self._embeddings = nn.Embedding(2 * MAX_SPAN - 1, depth)
        trunc_normal_tf_(self._embeddings.weight, std=1.0)
        query_position = torch.arange(query_length) + margin
        index = torch.arange(key_length)[None, :] - query_position[:, None] + (MAX_SPAN - 1)
        # Derived from the lengths, so kept out of the state dict (the official one has no such key).
        self.register_buffer("_relative_distance_matrix", index, persistent=False)

    def forward(self) -> torch.Tensor:
        """Returns [query_length, key_length, depth]: the encoding of key m seen from query l."""
        return self._embeddings.weight[self._relative_distance_matrix]


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis, with relative position terms on query, key and
    value (deeplab2's axial attention).

    For each head, with q, k, v the projected features and r_q, r_k, r_v the encodings of the
    relative distance m - l:
        logit[l, m] = BN_c(q_l . k_m) + BN_q(q_l . r_q[l, m]) + BN_k(k_m . r_k[l, m])
        out[l]      = BN_v(sum_m w[l, m] v_m) + BN_r(sum_m w[l, m] r_v[l, m]),  w = softmax_m(logit)
    The batch norms (one per head and term) replace the 1/sqrt(d) scaling. No output projection:
    the enclosing block has one.
    """

    def __init__(
        self,
        in_planes: int,
        query_shape: int,
        total_key_depth: int,
        total_value_depth: int,
        num_heads: int = 8,
        norm: str = "SyncBN",
    ):
        """
        Args:
            in_planes: input channels C.
            query_shape: length L of the attended axis (fixed; sizes the relative encodings).
            total_key_depth, total_value_depth: query/key and value channels over all heads.
        """
        super().__init__()
        if total_key_depth % num_heads or total_value_depth % num_heads:
            raise ValueError(
                f"key depth {total_key_depth} and value depth {total_value_depth} must be multiples of "
                f"num_heads={num_heads}"
            )
        self.query_shape = query_shape
        self.num_heads = num_heads
        self.total_key_depth = total_key_depth
        self.total_value_depth = total_value_depth
        qkv_channels = 2 * total_key_depth + total_value_depth
        # Plain projection; its BN is the separate ``_batch_norm_qkv`` (official layout).
        self.qkv_transform = ConvBN(in_planes, qkv_channels, 1, norm="", ndim=1)
        trunc_normal_tf_(self.qkv_transform.conv.weight, std=in_planes**-0.5)

        key_depth, value_depth = total_key_depth // num_heads, total_value_depth // num_heads
        self._query_rpe = RelativePositionalEncoding(query_shape, query_shape, key_depth)
        self._key_rpe = RelativePositionalEncoding(query_shape, query_shape, key_depth)
        self._value_rpe = RelativePositionalEncoding(query_shape, query_shape, value_depth)

        self._batch_norm_qkv = get_kmax_norm(norm, qkv_channels, ndim=1)
        # Channels: [content | query-rpe | key-rpe] x heads.
        self._batch_norm_similarity = get_kmax_norm(norm, 3 * num_heads, ndim=2)
        # Channels: [content | value-rpe] x total_value_depth.
        self._batch_norm_retrieved_output = get_kmax_norm(norm, 2 * total_value_depth, ndim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, L] -> [B, total_value_depth, L] (B counts every row/column of the images)."""
        batch, _, length = x.shape
        if length != self.query_shape:
            raise ValueError(
                f"axial attention built for an axis of {self.query_shape} positions got {length}: inputs must be "
                f"padded to the fixed size the decoder was built for (INPUT.IMAGE_SIZE)"
            )
        heads = self.num_heads
        qkv = self._batch_norm_qkv(self.qkv_transform(x))
        q, k, v = torch.split(qkv, [self.total_key_depth, self.total_key_depth, self.total_value_depth], dim=1)
        q = q.reshape(batch, heads, -1, length)
        k = k.reshape(batch, heads, -1, length)
        v = v.reshape(batch, heads, -1, length)

        similarity = torch.cat(
            [
                torch.einsum("bhdl,bhdm->bhlm", q, k),
                torch.einsum("bhdl,lmd->bhlm", q, self._query_rpe()),
                torch.einsum("bhdm,lmd->bhlm", k, self._key_rpe()),
            ],
            dim=1,
        )
        similarity = self._batch_norm_similarity(similarity).reshape(batch, 3, heads, length, length).sum(1)
        # Softmax in float32 even under autocast, as the official port: in half precision the
        # normalised weights lose most of their mantissa. Cast back so that a model run in half
        # precision without autocast still multiplies matching dtypes.
        weights = F.softmax(at_least_float32(similarity), dim=-1).to(v.dtype)

        retrieved = torch.cat(
            [
                torch.einsum("bhlm,bhdm->bhdl", weights, v),
                torch.einsum("bhlm,lmd->bhdl", weights, self._value_rpe()),
            ],
            dim=1,
        ).reshape(batch, 2 * self.total_value_depth, length)
        retrieved = self._batch_norm_retrieved_output(retrieved)
        return retrieved.reshape(batch, 2, self.total_value_depth, length).sum(1)


class AxialAttention2D(nn.Module):
    """Height-axis attention, then width-axis attention (``_height_axis``, ``_width_axis``)."""

    def __init__(
        self,
        in_planes: int,
        query_shape: tuple[int, int],
        filters: int,
        key_expansion: float = 1.0,
        value_expansion: float = 2.0,
        num_heads: int = 8,
        norm: str = "SyncBN",
    ):
        """
        Args:
            query_shape: the fixed (H, W) of the feature map.
            filters: base width; key depth = filters * key_expansion, value depth (the output
                channels) = filters * value_expansion.
        """
        super().__init__()
        self.total_value_depth = int(round(filters * value_expansion))
        total_key_depth = int(round(filters * key_expansion))
        self._height_axis = AxialAttention(
            in_planes, query_shape[0], total_key_depth, self.total_value_depth, num_heads, norm
        )
        self._width_axis = AxialAttention(
            self.total_value_depth, query_shape[1], total_key_depth, self.total_value_depth, num_heads, norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, total_value_depth, H, W]."""
        batch, channels, height, width = x.shape
        value = self.total_value_depth
        # Every column becomes a sequence along H: [B * W, C, H].
        x = x.permute(0, 3, 1, 2).reshape(batch * width, channels, height)
        x = self._height_axis(x)
        # Every row becomes a sequence along W: [B * H, V, W].
        x = x.reshape(batch, width, value, height).permute(0, 3, 2, 1).reshape(batch * height, value, width)
        x = self._width_axis(x)
        return x.reshape(batch, height, value, width).permute(0, 2, 1, 3).contiguous()


class SingleBlock(nn.Module):
    """Residual block of kMaX's pixel decoder: an axial-attention block or a ResNet bottleneck.

    ``out = DropPath(conv3_bn(body(conv1_bn_act(gelu(x))))) + shortcut(gelu(x))``, where body is
    axial attention + GELU (``_attention``) or a 3x3 conv+BN+GELU (``_conv2_bn_act``). The input,
    not the output, is activated (pre-activation style: the decoder's stages and fuses hand on
    un-activated sums). ``_conv3_bn`` starts with gamma 0, so the block starts as its shortcut.
    """

    def __init__(
        self,
        inplanes: int,
        filter_list: tuple[int, int, int],
        block_type: str,
        query_shape: tuple[int, int],
        *,
        key_expansion: float = 1.0,
        value_expansion: float = 2.0,
        num_heads: int = 8,
        drop_path_prob: float = 0.0,
        norm: str = "SyncBN",
    ):
        """
        Args:
            filter_list: (conv1 output, body width, block output) channels.
            block_type: "axial" or "bottleneck".
            query_shape: fixed (H, W) of the map; used by axial blocks only.
        """
        super().__init__()
        self.block_type = block_type
        conv1_channels, body_channels, out_channels = filter_list
        self._conv1_bn_act = ConvBN(inplanes, conv1_channels, 1, norm=norm, act="gelu")
        if block_type == "axial":
            self._attention = AxialAttention2D(
                conv1_channels, query_shape, body_channels, key_expansion, value_expansion, num_heads, norm
            )
            body_out = self._attention.total_value_depth
        elif block_type == "bottleneck":
            self._conv2_bn_act = ConvBN(conv1_channels, body_channels, 3, padding=1, norm=norm, act="gelu")
            body_out = body_channels
        else:
            raise ValueError(f"block type must be 'axial' or 'bottleneck', got {block_type!r}")
        self._conv3_bn = ConvBN(body_out, out_channels, 1, norm=norm, norm_init=0.0)
        self._shortcut = ConvBN(inplanes, out_channels, 1, norm=norm) if inplanes != out_channels else None
        self.drop_path = StochasticDepth(drop_path_prob, mode="row")
        self.recompute_input_activation = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, inplanes, H, W] -> [B, filter_list[2], H, W]."""
        shortcut_conv = None if self._shortcut is None else self._shortcut.conv
        shortcut, x = gelu_then_convolutions(
            x, (shortcut_conv, self._conv1_bn_act.conv), recompute=self.recompute_input_activation
        )
        if self._shortcut is not None:
            shortcut = self._shortcut.norm_act(shortcut)
        x = self._conv1_bn_act.norm_act(x)
        if self.block_type == "axial":
            x = F.gelu(self._attention(x))
        else:
            x = self._conv2_bn_act(x)
        return self.drop_path(self._conv3_bn(x)) + shortcut


class BlockGroup(nn.Module):
    """``num_blocks`` :class:`SingleBlock` of one type (``_blocks``), widths from one base.

    axial: conv1 2b -> attention (key depth b, value depth 2b) -> 4b;
    bottleneck: conv1 b -> 3x3 b -> 4b  (deeplab2's axial_block_groups).
    With ``activation_checkpoint`` each block keeps only its input for backward and runs again
    there.
    """

    def __init__(
        self,
        inplanes: int,
        base_filter: int,
        num_blocks: int,
        block_type: str,
        query_shape: tuple[int, int],
        *,
        drop_path_prob: float = 0.0,
        norm: str = "SyncBN",
        activation_checkpoint: bool = False,
    ):
        super().__init__()
        self.activation_checkpoint = activation_checkpoint
        if block_type == "axial":
            filter_list = (2 * base_filter, base_filter, 4 * base_filter)
        else:
            filter_list = (base_filter, base_filter, 4 * base_filter)
        blocks = []
        for _ in range(num_blocks):
            blocks.append(
                SingleBlock(
                    inplanes, filter_list, block_type, query_shape, drop_path_prob=drop_path_prob, norm=norm
                )
            )
            inplanes = filter_list[-1]
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, inplanes, H, W] -> [B, 4 * base_filter, H, W]."""
        for block in self._blocks:
            x = checkpointed_call(block, x, enabled=self.activation_checkpoint)
        return x

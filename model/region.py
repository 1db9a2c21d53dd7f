"""The region encoder (the official ``spi_module``): a fused feature pyramid and a RoI head.

Module and parameter names follow the official checkpoint so its keys load unchanged:
``mlvl_fuse.{input_conv.N, fuse_convs.N.conv, fuse_convs.N.gn}`` and
``roi_align.{pconvs.N, pos_embedd.{0,2,3,5}, flatten_linear, updims}``.

Precision follows the released model, which ran fp16 weights under fp16 autocast: convolutions and
linear layers compute in the weights' dtype, while GroupNorm, LayerNorm, the bilinear resizes and
RoIAlign compute in float32 (autocast's float32 list), their float32 results feeding the next layer
(which casts them back). So the fused pyramid is float32, and a region token is
``updims(flatten_linear(...) + pos_embedd(box))`` with the sum taken in float32. In float32 nothing
changes; in fp16 or bf16 this keeps the normalisations from rounding.

Shapes for the paper's model (B images, N boxes in all, C = 1024):
pyramid tokens (B, 256, C) x 4 -> maps (B, C, 128|64|32|16, ...) -> fuse -> RoIAlign
(N, C, 14, 14) per level -> conv, sum, ReLU -> flatten (N, C*14*14) -> (N, 1024) -> (N, 4096).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .config import GPT4RoIConfig


def _resize_fp32(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners=True) computed in float32, as the official code does."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True).to(x.dtype)


def _in(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` cast to the dtype of ``module``'s weights (what autocast does before a conv or linear)."""
    return x.to(module.weight.dtype)


def _group_norm_fp32(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm computed and returned in float32, whatever the weights' dtype (autocast's rule)."""
    return F.group_norm(x.float(), gn.num_groups, gn.weight.float(), gn.bias.float(), gn.eps)


def _layer_norm_fp32(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed and returned in float32, whatever the weights' dtype (autocast's rule)."""
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)


def coordinate_channels(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): channel 0 is x in [-1, 1] along the width, channel 1 is y along the height."""
    ys = torch.linspace(-1, 1, height, device=like.device)
    xs = torch.linspace(-1, 1, width, device=like.device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y])[None].expand(batch, -1, -1, -1).to(like.dtype)


class ConvGNReLU(nn.Module):
    """Conv3x3 (no bias) -> GroupNorm -> ReLU, named like mmcv's ConvModule (conv, gn)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, channels, eps=1e-5)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> float32 (the GroupNorm's output dtype under autocast)."""
        return self.activate(_group_norm_fp32(self.gn, self.conv(_in(self.conv, x))))


class PyramidFuse(nn.Module):
    """Coordinate channels, a 1x1 conv per level, then scale-shuffle rounds (official MLVLFuseModule).

    In each round every level keeps channels [0, C/2), takes [3C/4, C) of its coarser neighbour
    and [C/2, 3C/4) of its finer neighbour (resized to its size; the end levels use themselves),
    then passes through that round's ConvGNReLU, which all levels share.
    """

    def __init__(self, channels: int, num_levels: int, num_rounds: int, gn_groups: int):
        super().__init__()
        self.num_levels = num_levels
        self.input_conv = nn.ModuleList(nn.Conv2d(channels + 2, channels, 1) for _ in range(num_levels))
        self.fuse_convs = nn.ModuleList(ConvGNReLU(channels, gn_groups) for _ in range(num_rounds))
        self.shuffle = channels // 4
        self.remain = channels - 2 * self.shuffle

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [
            conv(_in(conv, torch.cat([f, coordinate_channels(f.shape[0], f.shape[2], f.shape[3], f)], dim=1)))
            for conv, f in zip(self.input_conv, levels)
        ]
        for block in self.fuse_convs:
            x = [block(self._shuffle(x, lvl)) for lvl in range(self.num_levels)]
        return x

    def _shuffle(self, x: list[torch.Tensor], lvl: int) -> torch.Tensor:
        coarser = x[min(lvl + 1, self.num_levels - 1)]
        finer = x[max(lvl - 1, 0)]
        size = x[lvl].shape[-2:]
        r, s = self.remain, self.shuffle
        return torch.cat(
            [x[lvl][:, :r], _resize_fp32(coarser[:, r + s:], size), _resize_fp32(finer[:, r:r + s], size)], dim=1
        )


class RoIHead(nn.Module):
    """RoIAlign on every level, a 3x3 conv per level, sum, ReLU, flatten linear, box MLP, output.

    Official MlvlRoIExtractor. One output token per box.
    """

    def __init__(self, config: GPT4RoIConfig):
        super().__init__()
        r = config.region
        self.image_size = config.vision.image_size
        self.strides = config.pyramid_strides
        self.output_size = r.roi_output_size
        self.sampling_ratio = r.roi_sampling_ratio
        self.pconvs = nn.ModuleList(nn.Conv2d(r.embed_dim, r.embed_dim, 3, padding=1) for _ in self.strides)
        self.pos_embedd = nn.Sequential(
            nn.Linear(4, r.pos_hidden_dim),
            nn.ReLU(inplace=True),
            nn.LayerNorm(r.pos_hidden_dim),
            nn.Linear(r.pos_hidden_dim, r.hidden_dim),
            nn.ReLU(inplace=True),
            nn.LayerNorm(r.hidden_dim),
        )
        self.flatten_linear = nn.Linear(r.embed_dim * r.roi_output_size**2, r.hidden_dim)
        self.updims = nn.Linear(r.hidden_dim, r.out_dim)

    def pool(self, pyramid: Sequence[torch.Tensor], boxes: torch.Tensor, batch_index: torch.Tensor) -> list[torch.Tensor]:
        """RoIAlign of every box on every level -> (N, C, S, S) per level, float32.

        ``boxes`` (N, 4) normalised xyxy; they are scaled to ``image_size`` pixels, and each level
        samples them at ``1 / stride`` (aligned=True: the Detectron2 / mmcv kernel the original used).
        """
        rois = torch.cat([batch_index[:, None].float(), boxes.float() * self.image_size], dim=1)  # (N, 5)
        return [
            roi_align(feat.float(), rois, self.output_size, 1.0 / stride, self.sampling_ratio, aligned=True)
            for feat, stride in zip(pyramid, self.strides)
        ]

    def forward(self, pyramid: Sequence[torch.Tensor], boxes: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """``boxes`` (N, 4) normalised xyxy, ``batch_index`` (N,) image of each box -> (N, out_dim)."""
        summed = None
        for pooled, conv in zip(self.pool(pyramid, boxes, batch_index), self.pconvs):
            y = conv(_in(conv, pooled))  # (N, C, S, S)
            summed = y if summed is None else summed + y
        feats = self.flatten_linear(F.relu(summed).flatten(1))  # (N, hidden)
        return self.updims(_in(self.updims, feats.float() + self.box_embedding(boxes)))

    def box_embedding(self, boxes: torch.Tensor) -> torch.Tensor:
        """``pos_embedd`` of the boxes -> (N, hidden) float32: its linears in the weights' dtype, its
        LayerNorms in float32."""
        x = boxes
        for layer in self.pos_embedd:
            if isinstance(layer, nn.LayerNorm):
                x = _layer_norm_fp32(layer, x)
            elif isinstance(layer, nn.Linear):
                x = layer(_in(layer, x))
            else:
                x = layer(x)
        return x


class RegionEncoder(nn.Module):
    """``spi_module``: hidden states -> fused pyramid (once per image) -> one token per box."""

    def __init__(self, config: GPT4RoIConfig):
        super().__init__()
        r = config.region
        self.grid = config.vision.grid_size
        self.sizes = config.pyramid_sizes
        self.mlvl_fuse = PyramidFuse(r.embed_dim, r.num_levels, r.num_fuse_rounds, r.gn_groups)
        self.roi_align = RoIHead(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: conv weights N(0, 0.01), conv biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def build_pyramid(self, level_tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Patch tokens (B, g*g, C) per level, CLS dropped -> fused maps (B, C, size_l, size_l)."""
        maps = []
        for tokens, size in zip(level_tokens, self.sizes):
            b, n, c = tokens.shape
            if n != self.grid * self.grid:
                raise ValueError(f"expected {self.grid * self.grid} patch tokens per level, got {n}")
            m = tokens.reshape(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
            maps.append(_resize_fp32(m, (size, size)))
        return self.mlvl_fuse(maps)

    def encode_boxes(self, pyramid: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Boxes per image (n_i, 4) normalised xyxy -> region tokens per image (n_i, out_dim)."""
        counts = [len(b) for b in boxes]
        device = pyramid[0].device
        if sum(counts) == 0:
            return [pyramid[0].new_zeros(0, self.roi_align.updims.out_features) for _ in boxes]
        flat = torch.cat([torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4) for b in boxes])
        index = torch.repeat_interleave(torch.arange(len(boxes), device=device), torch.tensor(counts, device=device))
        return list(self.roi_align(pyramid, flat, index).split(counts))

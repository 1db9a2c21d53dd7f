"""The CLIP vision tower and image preprocessing.

Preprocessing follows the official inference path: CLIP's processor without centre crop (resize
the shortest side to ``image_size`` with bicubic, rescale, normalise), then a bilinear resize to
``image_size x image_size``. The net effect is a stretch with no crop and no padding, so boxes
normalised by the original width and height stay valid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from .config import VisionConfig

if TYPE_CHECKING:  # PIL is imported where it is used: model/ imports only torch & co. at module level
    from PIL import Image

ImageLike = Union["Image.Image", np.ndarray]


def clip_config(v: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
    )


def build_vision_tower(v: VisionConfig) -> CLIPVisionModel:
    tower = CLIPVisionModel(clip_config(v))
    tower.requires_grad_(False)
    return tower


def check_vision_tower(tower: CLIPVisionModel, v: VisionConfig) -> None:
    """A CLIP tower loaded from a directory must have the sizes the config expects."""
    c = tower.config
    got = (c.hidden_size, c.num_hidden_layers, c.image_size, c.patch_size)
    want = (v.hidden_size, v.num_layers, v.image_size, v.patch_size)
    if got != want:
        raise ValueError(
            "CLIP tower does not match the config: (hidden, layers, image_size, patch) "
            f"expected {want}, got {got}"
        )


def to_pil(image: ImageLike) -> "Image.Image":
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def preprocess(images: Sequence[ImageLike], v: VisionConfig) -> torch.Tensor:
    """Images -> (B, 3, S, S) float32 pixel values, S = ``v.image_size``."""
    from PIL import Image

    mean = torch.tensor(v.image_mean).view(3, 1, 1)
    std = torch.tensor(v.image_std).view(3, 1, 1)
    out = []
    for image in images:
        pil = to_pil(image)
        w, h = pil.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(v.image_size * long / short)
        size = (v.image_size, new_long) if w <= h else (new_long, v.image_size)  # PIL: (w, h)
        pil = pil.resize(size, Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - mean) / std
        x = F.interpolate(x[None], size=(v.image_size, v.image_size), mode="bilinear", align_corners=False)
        out.append(x[0])
    return torch.stack(out)


def normalize_boxes(boxes_xyxy: torch.Tensor | Sequence[Sequence[float]], width: int, height: int) -> torch.Tensor:
    """Pixel ``xyxy`` boxes of a ``width x height`` image -> ``xyxy`` in [0, 1]."""
    b = torch.as_tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return (b / scale).clamp(0.0, 1.0)

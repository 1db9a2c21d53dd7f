"""GPT4RoI by composition: CLIP vision tower + image projector + region encoder + LLaMA.

Input embeddings are built the way the official model builds them: embed the ids, replace the
``<im_patch>`` run of each sequence with its image's projected patch tokens, then replace the
``<bbox>`` positions, in order, with region tokens. Both replacements are one ``masked_scatter``
each, after a count check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .config import GPT4RoIConfig
from .region import RegionEncoder
from .vision import build_vision_tower


def llama_config(config: GPT4RoIConfig) -> LlamaConfig:
    l, t = config.llm, config.tokens
    return LlamaConfig(
        vocab_size=l.vocab_size,
        hidden_size=l.hidden_size,
        intermediate_size=l.intermediate_size,
        num_hidden_layers=l.num_layers,
        num_attention_heads=l.num_heads,
        num_key_value_heads=l.num_kv_heads,
        max_position_embeddings=l.max_position_embeddings,
        rms_norm_eps=l.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": l.rope_theta},
        bos_token_id=t.bos_id,
        eos_token_id=t.eos_id,
        pad_token_id=t.pad_id,
        tie_word_embeddings=False,
    )


@dataclass
class ImageFeatures:
    """What one pass of the vision side yields for a batch of images.

    ``image_tokens`` (B, P, H_llm): projected patch tokens for the ``<im_patch>`` run.
    ``pyramid``: fused maps, finest first, each (B, C, size_l, size_l), for the RoI head.
    """

    image_tokens: torch.Tensor
    pyramid: list[torch.Tensor]

    def select(self, index: torch.Tensor | Sequence[int]) -> "ImageFeatures":
        """The features of the images at ``index`` (repeats allowed)."""
        index = torch.as_tensor(index, device=self.image_tokens.device)
        return ImageFeatures(self.image_tokens[index], [p[index] for p in self.pyramid])


class GPT4RoI(nn.Module):
    def __init__(self, config: GPT4RoIConfig):
        super().__init__()
        self.config = config
        self.vision_tower = build_vision_tower(config.vision)  # frozen
        self.mm_projector = nn.Linear(config.vision.hidden_size, config.llm.hidden_size)
        self.spi_module = RegionEncoder(config)
        self.llm = LlamaForCausalLM(llama_config(config))
        self._layers = [config.vision.resolve_layer(i) for i in config.vision.pyramid_layers]
        self._image_layer = config.vision.resolve_layer(config.vision.image_token_layer)

    @property
    def device(self) -> torch.device:
        return self.mm_projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector.weight.dtype

    # Vision side -------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) preprocessed pixels -> image tokens and the fused pyramid."""
        # Frozen, as in the paper (no graph is kept) -- unless training has unfrozen it.
        tower_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(tower_trains):
            out = self.vision_tower(
                pixel_values.to(self.device, self.vision_tower.dtype), output_hidden_states=True
            )
        hidden = [h[:, 1:] for h in out.hidden_states]  # drop CLS: (B, P, C) each
        image_tokens = self.mm_projector(hidden[self._image_layer].to(self.dtype))
        pyramid = self.spi_module.build_pyramid([hidden[i].to(self.dtype) for i in self._layers])
        return ImageFeatures(image_tokens, pyramid)

    def region_tokens(self, features: ImageFeatures, boxes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised xyxy boxes per image (n_i, 4) -> region tokens per image (n_i, H_llm)."""
        if len(boxes) != features.image_tokens.shape[0]:
            raise ValueError(f"got boxes for {len(boxes)} images but features for {features.image_tokens.shape[0]}")
        return self.spi_module.encode_boxes(features.pyramid, boxes)

    # Language side -----------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        region_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) embeddings with image and region tokens filled in.

        ``image_tokens`` (B, P, H): row b fills the ``<im_patch>`` run of sequence b.
        ``region_tokens`` (R, H): fills the ``<bbox>`` positions in row-major order.
        """
        t = self.config.tokens
        embeds = self.llm.get_input_embeddings()(input_ids)
        embeds = self._fill(embeds, input_ids == t.im_patch_id, image_tokens, "<im_patch>", "image tokens")
        return self._fill(embeds, input_ids == t.bbox_id, region_tokens, "<bbox>", "region tokens (boxes)")

    @staticmethod
    def _fill(embeds, mask, values, token: str, what: str) -> torch.Tensor:
        n_slots = int(mask.sum())
        n_values = 0 if values is None else values.shape[0] * (values.shape[1] if values.dim() == 3 else 1)
        if n_slots != n_values:
            raise ValueError(
                f"the prompt has {n_slots} {token} tokens but {n_values} {what} were given; "
                f"each {token} must receive exactly one"
            )
        if n_slots == 0:
            return embeds
        values = values.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(mask[..., None], values)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        boxes: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Plain full forward: one image per sequence, ``boxes[b]`` fill sequence b's ``<bbox>`` tokens."""
        features = self.encode_images(pixel_values)
        regions = self.region_tokens(features, boxes)
        embeds = self.embed(input_ids, features.image_tokens, torch.cat(regions) if regions else None)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    def restore_buffers(self) -> "GPT4RoI":
        """Rebuild the computed, non-persistent buffers on the model's device, in float32.

        Needed after building on the meta device, and after a dtype cast (RoPE frequencies
        must stay float32).
        """
        device = self.device
        with torch.device(device):
            self.llm.model.rotary_emb = LlamaRotaryEmbedding(config=self.llm.config)
        emb = self.vision_tower.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
        return self

    # Parameter accounting ----------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        return {
            "vision_tower": count(self.vision_tower),
            "mm_projector": count(self.mm_projector),
            "spi_module": count(self.spi_module),
            "llm": count(self.llm),
        }

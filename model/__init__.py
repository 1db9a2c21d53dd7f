"""The GPT4RoI model core. Imports only torch, torchvision, transformers, safetensors, numpy."""

from .config import GPT4RoIConfig, LLMConfig, RegionConfig, TokenConfig, VisionConfig, get_preset, PRESETS
from .gpt4roi import GPT4RoI, ImageFeatures
from .prompt import build_prompt, cut_answer, expand_region_tags, region_ref

__all__ = [
    "GPT4RoI", "GPT4RoIConfig", "ImageFeatures", "LLMConfig", "PRESETS", "RegionConfig", "TokenConfig",
    "VisionConfig", "build_prompt", "cut_answer", "expand_region_tags", "get_preset", "region_ref",
]

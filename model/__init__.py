"""The GPT4RoI model core. Imports only torch, torchvision, transformers, safetensors, numpy.

Names are loaded on first use, so that ``model.device`` or ``model.configfile`` can be imported
without pulling in transformers.
"""

from importlib import import_module

_LAZY = {
    "GPT4RoIConfig": ".config", "LLMConfig": ".config", "RegionConfig": ".config", "TokenConfig": ".config",
    "VisionConfig": ".config", "get_preset": ".config", "PRESETS": ".config",
    "GPT4RoI": ".gpt4roi", "ImageFeatures": ".gpt4roi",
    "build_prompt": ".prompt", "cut_answer": ".prompt", "expand_region_tags": ".prompt", "region_ref": ".prompt",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")

"""Configuration of a GPT4RoI model: every size the architecture uses, and named presets.

The paper's model (``gpt4roi-7b``) is CLIP ViT-L/14 at 224 px, a 4-level feature pyramid fused
by 5 scale-shuffle rounds, a RoIAlign region head that yields one 4096-d token per box, and a
LLaMA-7B language model with 6 added tokens. ``tiny`` is the same architecture at toy sizes for
tests; ``demo`` is the shipped model trained by this project.

Conventions used everywhere in ``model/``:

* boxes are ``xyxy`` normalised to ``[0, 1]`` of the *original* image; the image is stretched
  (no crop, no pad) to ``image_size`` so normalised boxes stay valid;
* CLIP ``hidden_states`` are indexed as transformers returns them: index 0 is the embedding
  output, index ``i`` the output of encoder layer ``i`` (25 entries for a 24-layer tower).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The system line of the Vicuna v0 template the official model was trained with.
VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower and which of its hidden states the model reads."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # hidden_states index whose patch tokens become the image tokens (official: -2 -> 23).
    image_token_layer: int = -2
    # hidden_states indices feeding the pyramid, finest level first (official: 14, 17, 20, 23).
    pyramid_layers: tuple[int, ...] = (14, 17, 20, 23)

    @property
    def grid_size(self) -> int:
        """Patches per side (16 for 224 / 14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def resolve_layer(self, index: int) -> int:
        """A hidden_states index as a non-negative one (there are num_layers + 1 states)."""
        n = self.num_layers + 1
        if not -n <= index < n:
            raise ValueError(f"hidden-state index {index} is out of range for {self.num_layers} layers")
        return index % n


@dataclass(frozen=True)
class RegionConfig:
    """The region encoder (official ``spi_module``): pyramid fuse and RoI head."""

    embed_dim: int = 1024  # channels of every pyramid level (= vision hidden size)
    # Upsampling factor of the patch grid per level, finest first: 16x16 -> 128, 64, 32, 16.
    pyramid_upsample: tuple[int, ...] = (8, 4, 2, 1)
    num_fuse_rounds: int = 5
    gn_groups: int = 64
    roi_output_size: int = 14
    roi_sampling_ratio: int = 2
    pos_hidden_dim: int = 256  # first width of the box MLP
    hidden_dim: int = 1024  # flatten_linear output and box-MLP output
    out_dim: int = 4096  # one region token, = LLM hidden size

    @property
    def num_levels(self) -> int:
        return len(self.pyramid_upsample)


@dataclass(frozen=True)
class LLMConfig:
    """The LLaMA causal language model."""

    vocab_size: int = 32006
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TokenConfig:
    """Special token ids. The six added tokens follow the base vocabulary in this order."""

    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 32000  # "[PAD]"
    im_patch_id: int = 32001  # "<im_patch>"
    bbox_id: int = 32002  # "<bbox>"
    point_id: int = 32003  # "<point>"
    im_start_id: int = 32004  # "<im_start>"
    im_end_id: int = 32005  # "<im_end>"

    @property
    def base_vocab_size(self) -> int:
        """Size of the vocabulary before the added tokens (32000 for LLaMA)."""
        return self.pad_id

    def added_tokens(self) -> dict[str, int]:
        return {
            "[PAD]": self.pad_id,
            "<im_patch>": self.im_patch_id,
            "<bbox>": self.bbox_id,
            "<point>": self.point_id,
            "<im_start>": self.im_start_id,
            "<im_end>": self.im_end_id,
        }

    @classmethod
    def after(cls, base_vocab_size: int) -> "TokenConfig":
        """The six added tokens placed right after a base vocabulary of the given size."""
        b = base_vocab_size
        return cls(pad_id=b, im_patch_id=b + 1, bbox_id=b + 2, point_id=b + 3, im_start_id=b + 4, im_end_id=b + 5)


@dataclass(frozen=True)
class GPT4RoIConfig:
    name: str = "gpt4roi-7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    system: str = VICUNA_V0_SYSTEM
    # "sentencepiece": the LLaMA tokenizer.model that comes with a checkpoint;
    # "builtin": the small offline tokenizer of model/tokenizer.py (tiny and demo presets).
    tokenizer: str = "sentencepiece"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        v, r, l, t = self.vision, self.region, self.llm, self.tokens
        problems = []
        if v.image_size % v.patch_size:
            problems.append(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if len(v.pyramid_layers) != r.num_levels:
            problems.append(
                f"{len(v.pyramid_layers)} pyramid_layers but {r.num_levels} pyramid_upsample factors"
            )
        for idx in (*v.pyramid_layers, v.image_token_layer):
            if not -(v.num_layers + 1) <= idx <= v.num_layers:
                problems.append(f"hidden-state index {idx} is out of range for {v.num_layers} vision layers")
        if r.embed_dim != v.hidden_size:
            problems.append(f"region embed_dim {r.embed_dim} != vision hidden_size {v.hidden_size}")
        if r.embed_dim % 4 or r.embed_dim % r.gn_groups:
            problems.append(f"region embed_dim {r.embed_dim} must divide by 4 and by gn_groups {r.gn_groups}")
        if r.out_dim != l.hidden_size:
            problems.append(f"region out_dim {r.out_dim} != LLM hidden_size {l.hidden_size}")
        if l.vocab_size != t.im_end_id + 1:
            problems.append(f"vocab_size {l.vocab_size} != last added token id {t.im_end_id} + 1")
        if l.hidden_size % l.num_heads or l.num_heads % l.num_kv_heads:
            problems.append("LLM hidden_size / num_heads / num_kv_heads do not divide")
        if problems:
            raise ValueError(f"invalid GPT4RoI config {self.name!r}: " + "; ".join(problems))

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def pyramid_sizes(self) -> tuple[int, ...]:
        """Side of each pyramid level, finest first (128, 64, 32, 16)."""
        return tuple(self.vision.grid_size * u for u in self.region.pyramid_upsample)

    @property
    def pyramid_strides(self) -> tuple[float, ...]:
        """Stride of each level in image_size pixels (14/8, 14/4, 14/2, 14)."""
        return tuple(self.vision.patch_size / u for u in self.region.pyramid_upsample)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    # Serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT4RoIConfig":
        def sub(kind, values):
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        d = dict(d)
        parts = {
            "vision": sub(VisionConfig, d.pop("vision", {})),
            "region": sub(RegionConfig, d.pop("region", {})),
            "llm": sub(LLMConfig, d.pop("llm", {})),
            "tokens": sub(TokenConfig, d.pop("tokens", {})),
        }
        return sub(cls, {**d, **parts})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> "GPT4RoIConfig":
        return dataclasses.replace(self, **changes)


# Presets -----------------------------------------------------------------------------------------

def _gpt4roi_7b() -> GPT4RoIConfig:
    return GPT4RoIConfig(name="gpt4roi-7b")


def _gpt4roi_7b_shallow() -> GPT4RoIConfig:
    """The 7B model's widths at a fraction of its depth, for checking the engine at full width on a
    CPU: CLIP-L's width on 11 of its 24 layers (the official pyramid rule, every third layer down
    from -2, still finds four), the 1024-channel pyramid at 128/64/32/16 with one scale-shuffle
    round instead of five, and one 4096-wide LLaMA layer over the 32006-token vocabulary."""
    full = _gpt4roi_7b()
    return full.replace(
        name="gpt4roi-7b-shallow",
        vision=dataclasses.replace(full.vision, num_layers=11, pyramid_layers=(1, 4, 7, 10)),
        region=dataclasses.replace(full.region, num_fuse_rounds=1),
        llm=dataclasses.replace(full.llm, num_layers=1),
    )


def _tiny() -> GPT4RoIConfig:
    from .tokenizer import BUILTIN_BASE_VOCAB_SIZE

    tokens = TokenConfig.after(BUILTIN_BASE_VOCAB_SIZE)
    return GPT4RoIConfig(
        name="tiny",
        vision=VisionConfig(
            image_size=112, patch_size=14, hidden_size=64, intermediate_size=128, num_layers=5,
            num_heads=4, image_token_layer=-2, pyramid_layers=(1, 2, 3, 4),
        ),
        region=RegionConfig(
            embed_dim=64, pyramid_upsample=(8, 4, 2, 1), num_fuse_rounds=5, gn_groups=8,
            roi_output_size=7, roi_sampling_ratio=2, pos_hidden_dim=32, hidden_dim=64, out_dim=64,
        ),
        llm=LLMConfig(
            vocab_size=tokens.im_end_id + 1, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=4, max_position_embeddings=512,
        ),
        tokens=tokens,
        tokenizer="builtin",
    )


def _demo() -> GPT4RoIConfig:
    """The shipped demo model (trained on the synthetic world by ``roiscribe train``): 8-px
    patches so that small objects cover several patches, a small LLaMA."""
    from .tokenizer import BUILTIN_BASE_VOCAB_SIZE

    tokens = TokenConfig.after(BUILTIN_BASE_VOCAB_SIZE)
    return GPT4RoIConfig(
        name="demo",
        vision=VisionConfig(
            image_size=112, patch_size=8, hidden_size=64, intermediate_size=256, num_layers=4,
            num_heads=4, image_token_layer=-2, pyramid_layers=(1, 2, 3, 4),
        ),
        region=RegionConfig(
            embed_dim=64, pyramid_upsample=(4, 2, 1, 1), num_fuse_rounds=3, gn_groups=8,
            roi_output_size=7, roi_sampling_ratio=2, pos_hidden_dim=64, hidden_dim=128, out_dim=128,
        ),
        llm=LLMConfig(
            vocab_size=tokens.im_end_id + 1, hidden_size=128, intermediate_size=384, num_layers=4,
            num_heads=4, num_kv_heads=4, max_position_embeddings=2048,
        ),
        tokens=tokens,
        tokenizer="builtin",
    )


PRESETS: dict[str, Callable[[], GPT4RoIConfig]] = {
    "gpt4roi-7b": _gpt4roi_7b,
    "gpt4roi-7b-shallow": _gpt4roi_7b_shallow,
    "tiny": _tiny,
    "demo": _demo,
}


def get_preset(name: str) -> GPT4RoIConfig:
    """The config of a named preset; raises with the valid names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown GPT4RoI preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


# The engine ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineConfig:
    """How ``model.engine.RegionEngine`` answers a batch (lengths, memory bounds, sampling)."""

    max_new_tokens: int = 1024  # caps every answer (the official limit); prompts carry their own, lower limits
    min_new_tokens: int = 0  # stops are ignored before this many tokens (fixed-length benchmarks)
    max_images: int = 16  # images encoded per vision pass
    max_prompts: int = 256  # prompt rows decoded together
    kv_cache_gib: float = 8.0  # KV cache of one image chunk: images x prefix + slots x (suffix + answer) tokens
    sync_every: int = 8  # decode steps between looks at the batch (ended rows harvested, slots refilled)
    share_prefix: bool = True
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: sample from the whole distribution
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_images", "max_prompts", "sync_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_gib <= 0 or self.temperature <= 0:
            raise ValueError("EngineConfig.kv_cache_gib and temperature must be > 0")

"""Saving and loading GPT4RoI checkpoints: roiscribe's own format and the official layout.

roiscribe's format is one directory: ``config.json`` (the full :class:`GPT4RoIConfig`),
``model.safetensors`` (every weight, vision tower included) and the tokenizer files.

The official layout (``GPT4RoI-7B-delta-V0`` after applying the delta) is a transformers-4.29
LLaVA directory: ``config.json`` with LLaVA fields, ``pytorch_model-0000X-of-0000N.bin`` shards
and their index, keys ``model.mm_projector.*``, ``model.spi_module.*`` and the LLaMA keys, no
vision tower (CLIP comes from its own directory).

Loading never holds two copies of the weights: the model is built on the meta device and each
tensor is assigned into it as it is read (``torch.load(..., mmap=True, weights_only=True)`` or
safetensors), converted to the target dtype and device one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPVisionModel

from .config import GPT4RoIConfig, LLMConfig, TokenConfig, VisionConfig, get_preset
from .gpt4roi import GPT4RoI
from .tokenizer import BuiltinPieces, PromptTokenizer, check_vocab, load_pieces, write_added_tokens
from .vision import check_vision_tower

FORMAT = "roiscribe-gpt4roi"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
LLAMA_BASE_VOCAB = 32000


@dataclass
class Loaded:
    """A model with the tokenizer that goes with it."""

    model: GPT4RoI
    tokenizer: PromptTokenizer

    @property
    def config(self) -> GPT4RoIConfig:
        return self.model.config


def make_tokenizer(config: GPT4RoIConfig, directory: str | Path | None = None) -> PromptTokenizer:
    """The tokenizer of a config: the builtin one, or the piece model saved in ``directory``."""
    if directory is None:
        if config.tokenizer != "builtin":
            raise ValueError(f"the {config.tokenizer!r} tokenizer must be loaded from a checkpoint directory")
        pieces = BuiltinPieces()
    else:
        pieces = load_pieces(directory, config.tokenizer)
    check_vocab(pieces, config.tokens)
    return PromptTokenizer(pieces, config.tokens, config.num_image_tokens)


def random_init(config: GPT4RoIConfig | str, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Loaded:
    """A randomly initialised model (tests, benchmarks), deterministic per seed."""
    config = get_preset(config) if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT4RoI(config)
    model = model.to(device=device, dtype=dtype).restore_buffers().eval()
    return Loaded(model, _random_weights_tokenizer(config))


def random_init_on_device(config: GPT4RoIConfig | str, seed: int = 0, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.bfloat16, std: float = 0.02) -> Loaded:
    """Random weights made directly on ``device`` (no CPU copy): for benchmarking large presets.

    Built on the meta device, materialised empty on ``device``, then filled: weights N(0, std),
    biases 0, norm scales 1. Not the training init; a stand-in with realistic shapes and cost.
    """
    config = get_preset(config) if isinstance(config, str) else config
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # so that the weights are allocated once, in ``dtype``
    try:
        model = _empty_model(config).to_empty(device=device)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # RMSNorm / LayerNorm / GroupNorm scales
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    model = model.to(dtype=dtype).restore_buffers().eval()
    model.vision_tower.requires_grad_(False)
    return Loaded(model, _random_weights_tokenizer(config))


def _random_weights_tokenizer(config: GPT4RoIConfig) -> PromptTokenizer:
    """The preset's tokenizer; for a preset whose tokenizer comes with a checkpoint (LLaMA's), the
    builtin pieces stand in: random weights give no meaning to ids."""
    if config.tokenizer == "builtin":
        return make_tokenizer(config)
    return PromptTokenizer(BuiltinPieces(), config.tokens, config.num_image_tokens)


# roiscribe's own format --------------------------------------------------------------------------

def save_pretrained(loaded: Loaded, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": loaded.config.to_dict()}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    loaded.tokenizer.save(directory)
    write_added_tokens(directory, loaded.config.tokens)
    return directory


def is_roiscribe_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT


def native_cuda_dtype(spec: str | Path) -> torch.dtype:
    """The half precision a model spec runs in on CUDA when none is asked for: float16 for a
    checkpoint in the official layout (released as fp16 weights, run under fp16 autocast), bfloat16
    for roiscribe's own checkpoints, the demo and random presets (trained or initialised here)."""
    text = str(spec)
    if text == SHIPPED or text.startswith(RANDOM):
        return torch.bfloat16
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file() and not is_roiscribe_checkpoint(path):
        return torch.float16
    return torch.bfloat16


def init_or_load(spec: str | Path, seed: int = 0) -> Loaded:
    """The starting point of a training run: ``load_model(spec)`` on the CPU in float32."""
    return load_model(spec, seed=seed)


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Loaded:
    directory = Path(directory)
    if not is_roiscribe_checkpoint(directory):
        raise ValueError(f"{directory} is not a roiscribe checkpoint (no config.json with format {FORMAT!r})")
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} has format version {meta['format_version']}; this roiscribe reads "
                         f"up to {FORMAT_VERSION}: upgrade roiscribe")
    config = GPT4RoIConfig.from_dict(meta["config"])
    model = _empty_model(config)
    loaded_keys = _assign(model, _read_safetensors(directory / WEIGHTS_FILE), device, dtype)
    _check_complete(model, loaded_keys, directory, skip_prefixes=())
    _finish(model, device, dtype)
    return Loaded(model, make_tokenizer(config, directory))


# The official layout -----------------------------------------------------------------------------

def official_to_ours(key: str) -> str | None:
    """An official state-dict key -> ours; None for keys that are not weights (rotary inv_freq)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for prefix in ("model.mm_projector.", "model.spi_module."):
        if key.startswith(prefix):
            return key[len("model."):]
    if key.startswith("model."):
        return "llm." + key
    if key.startswith("lm_head."):
        return "llm." + key
    return "<unexpected>." + key


def official_pyramid_layers(select_layer: int, num_layers: int, num_levels: int = 4) -> tuple[int, ...]:
    """The hidden states the official region encoder fuses: from ``mm_vision_select_layer`` down
    in steps of 3 (``hidden_states[select::-3]``), the ``num_levels`` nearest the top, ascending.
    CLIP-L (24 layers) with -2 gives (14, 17, 20, 23)."""
    n = num_layers + 1  # hidden_states: the embeddings, then one per layer
    if not -n <= select_layer < n:
        raise ValueError(f"mm_vision_select_layer {select_layer} is out of range for a {num_layers}-layer CLIP")
    picked = list(range(n))[select_layer::-3][:num_levels]
    if len(picked) < num_levels:
        raise ValueError(f"mm_vision_select_layer {select_layer} leaves {len(picked)} hidden states for a "
                         f"{num_levels}-level pyramid (every third from it, downwards)")
    return tuple(sorted(picked))


def config_from_official(fields: dict, tower: CLIPVisionModel, base: GPT4RoIConfig) -> GPT4RoIConfig:
    """Our config from an official ``config.json``, the CLIP tower's config and a preset.

    The official code hard-codes the region-encoder sizes; they come from ``base``.
    """
    for name, want in (("mm_use_im_start_end", True), ("use_mm_proj", True)):
        if fields.get(name) != want:
            raise ValueError(f"official config field {name} is {fields.get(name)!r}; roiscribe supports {want}")
    c = tower.config
    select = fields.get("mm_vision_select_layer", base.vision.image_token_layer)
    vision = VisionConfig(
        image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps,
        image_mean=base.vision.image_mean, image_std=base.vision.image_std,
        image_token_layer=select,
        pyramid_layers=official_pyramid_layers(select, c.num_hidden_layers, base.region.num_levels),
    )
    if fields.get("mm_hidden_size", c.hidden_size) != c.hidden_size:
        raise ValueError(f"mm_hidden_size {fields['mm_hidden_size']} != CLIP hidden size {c.hidden_size}")
    llm = LLMConfig(
        vocab_size=fields["vocab_size"], hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"], num_layers=fields["num_hidden_layers"],
        num_heads=fields["num_attention_heads"],
        num_kv_heads=fields.get("num_key_value_heads") or fields["num_attention_heads"],
        max_position_embeddings=fields.get("max_position_embeddings", base.llm.max_position_embeddings),
        rms_norm_eps=fields.get("rms_norm_eps", base.llm.rms_norm_eps),
    )
    tokens = TokenConfig.after(fields["vocab_size"] - len(base.tokens.added_tokens()))
    region = base.region.__class__(**{**base.region.__dict__, "embed_dim": c.hidden_size, "out_dim": llm.hidden_size})
    return base.replace(name=f"{base.name}-official", vision=vision, region=region, llm=llm, tokens=tokens)


def official_shards(directory: Path) -> list[Path]:
    """The weight files of an official-layout (or merged) directory, in index order."""
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index = directory / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
            return [directory / f for f in files]
    for single in ("pytorch_model.bin", "model.safetensors"):
        if (directory / single).is_file():
            return [directory / single]
    raise FileNotFoundError(
        f"no weights in {directory}: expected pytorch_model.bin.index.json with its "
        "pytorch_model-0000X-of-0000N.bin shards (or model.safetensors[.index.json])"
    )


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file, read safely (safetensors or weights_only + mmap)."""
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path)
        return
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for key in list(state):
        yield key, state.pop(key)


def load_official(directory: str | Path, clip_directory: str | Path, base: GPT4RoIConfig | str = "gpt4roi-7b",
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Loaded:
    """A checkpoint in the official layout, strictly, with CLIP from its own local directory.

    The released shards are fp16; every weight is converted to ``dtype`` as it is read.
    """
    directory, clip_directory = Path(directory), Path(clip_directory)
    base = get_preset(base) if isinstance(base, str) else base
    fields = json.loads((directory / "config.json").read_text())
    if not (clip_directory / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model at {clip_directory}: expected a local transformers CLIP directory "
                                "(e.g. a copy of openai/clip-vit-large-patch14)")
    tower = CLIPVisionModel.from_pretrained(str(clip_directory), dtype=dtype)
    config = config_from_official(fields, tower, base)
    check_vision_tower(tower, config.vision)
    model = _empty_model(config)
    model.vision_tower = tower.requires_grad_(False)

    def renamed():
        for shard in official_shards(directory):
            for key, tensor in read_shard(shard):
                ours = official_to_ours(key)
                if ours is not None:
                    yield ours, tensor

    loaded_keys = _assign(model, renamed(), device, dtype)
    _check_complete(model, loaded_keys, directory, skip_prefixes=("vision_tower.",))
    _finish(model, device, dtype)
    return Loaded(model, make_tokenizer(config, directory))


# Applying the released delta ---------------------------------------------------------------------

def apply_delta(base_directory: str | Path, delta_directory: str | Path, out_directory: str | Path,
                base_vocab: int = LLAMA_BASE_VOCAB, progress=None) -> Path:
    """``target = base + delta`` for the LLaMA weights; projector, region module and the added
    embedding / lm_head rows are taken raw from the delta. Writes safetensors shards + index in
    the official key layout, with the delta's config and tokenizer files.

    Works one delta shard at a time; base tensors are read lazily from their own files.
    """
    base_directory, delta_directory, out_directory = map(Path, (base_directory, delta_directory, out_directory))
    out_directory.mkdir(parents=True, exist_ok=True)
    base_index = _tensor_index(official_shards(base_directory))
    delta_shards = official_shards(delta_directory)
    weight_map: dict[str, str] = {}
    used_base: set[str] = set()
    for n, shard in enumerate(delta_shards, 1):
        out: dict[str, torch.Tensor] = {}
        for key, delta in read_shard(shard):
            if key.endswith("rotary_emb.inv_freq"):
                continue
            out[key] = _merge(key, delta, base_index, base_vocab, used_base)
        name = f"model-{n:05d}-of-{len(delta_shards):05d}.safetensors"
        save_file(out, str(out_directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, name))
        if progress:
            progress(n, len(delta_shards))
        del out
    unused = sorted(k for k in base_index if k not in used_base and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"base weights with no delta ({len(unused)}), e.g. {unused[:3]}: is the base LLaMA-7B?")
    (out_directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for f in delta_directory.iterdir():
        if f.suffix in (".json", ".model") and "index" not in f.name:
            shutil.copy2(f, out_directory / f.name)
    return out_directory


def _merge(key: str, delta: torch.Tensor, base_index: dict, base_vocab: int, used: set[str]) -> torch.Tensor:
    if key.startswith(("model.mm_projector.", "model.spi_module.")) or key not in base_index:
        if not key.startswith(("model.mm_projector.", "model.spi_module.")):
            raise ValueError(f"delta key {key!r} has no base weight and is not a GPT4RoI module")
        return delta.contiguous()
    used.add(key)
    base = _read_tensor(base_index[key], key).to(delta.dtype)
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
        if base.shape[0] != base_vocab or delta.shape[1:] != base.shape[1:]:
            raise ValueError(f"{key}: base {tuple(base.shape)} vs delta {tuple(delta.shape)}, expected {base_vocab} base rows")
        merged = delta.clone()
        merged[:base_vocab] += base
        return merged
    if base.shape != delta.shape:
        raise ValueError(f"{key}: base shape {tuple(base.shape)} != delta shape {tuple(delta.shape)}")
    return (delta + base).contiguous()


def _tensor_index(shards: list[Path]) -> dict[str, Path]:
    index = {}
    for shard in shards:
        if shard.suffix == ".safetensors":
            with safe_open(str(shard), "pt") as f:
                index.update(dict.fromkeys(f.keys(), shard))
        else:
            index.update(dict.fromkeys(torch.load(shard, map_location="cpu", mmap=True, weights_only=True), shard))
    return index


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)[key]


# Shared loading machinery ------------------------------------------------------------------------

def _empty_model(config: GPT4RoIConfig) -> GPT4RoI:
    with torch.device("meta"):
        return GPT4RoI(config)


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def _assign(model: GPT4RoI, tensors: Iterator[tuple[str, torch.Tensor]], device, dtype) -> set[str]:
    """Assign tensors into the meta model one at a time; raise on unknown keys or shapes."""
    expected = model.state_dict()
    loaded: set[str] = set()
    for key, tensor in tensors:
        if key not in expected:
            raise ValueError(f"unexpected weight {key!r} (shape {tuple(tensor.shape)}) in the checkpoint")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise ValueError(f"weight {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[key].shape)}: does the config match the checkpoint?")
        target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        model.load_state_dict({key: tensor.to(device=device, dtype=target_dtype)}, strict=False, assign=True)
        loaded.add(key)
    return loaded


def _check_complete(model: GPT4RoI, loaded: set[str], source: Path, skip_prefixes: tuple[str, ...]) -> None:
    missing = [k for k in model.state_dict() if k not in loaded and not k.startswith(skip_prefixes)]
    if missing:
        raise ValueError(f"{len(missing)} weights missing from {source}, e.g. {missing[:5]}")


def _finish(model: GPT4RoI, device, dtype) -> None:
    """Rebuild the non-persistent buffers left on the meta device, then freeze."""
    model.restore_buffers()
    model.vision_tower.to(device=device, dtype=dtype or model.vision_tower.dtype)
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors left unloaded on the meta device: {still_meta[:5]}")
    model.vision_tower.requires_grad_(False)
    model.eval()


# One entry point ----------------------------------------------------------------------------------

RANDOM = "random:"  # model spec prefix: a preset with random weights, e.g. random:tiny
SHIPPED = "demo"  # model spec: the shipped demo model


def load_model(spec: str | Path, clip: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, seed: int = 0, official_base: str = "gpt4roi-7b") -> Loaded:
    """The model a spec names; the one resolver of model specs for every command and job.

    * ``demo``: the shipped demo model (``demo/gpt4roi``);
    * ``random:PRESET`` (``random:tiny``, ``random:demo``, ``random:gpt4roi-7b``): a preset with
      random weights, deterministic per ``seed``;
    * a roiscribe checkpoint directory;
    * an official-layout directory, which needs ``clip`` (a local CLIP directory);
      ``official_base`` is the preset that supplies the region-encoder sizes the official config
      does not record.
    """
    text = str(spec)
    if text == SHIPPED:
        import demo

        return load_pretrained(demo.model_dir(), device=device, dtype=dtype)
    if text.startswith(RANDOM):
        return random_init(get_preset(text[len(RANDOM):]), seed=seed, device=device, dtype=dtype or torch.float32)
    path = Path(spec)
    if not path.exists():
        from .config import PRESETS

        hint = (f"; for random weights of that preset write {RANDOM}{text}" if text in PRESETS else
                f"; expected {SHIPPED!r}, {RANDOM}PRESET ({', '.join(RANDOM + p for p in sorted(PRESETS))}) "
                "or a checkpoint directory")
        raise ValueError(f"model {text!r} is not a local checkpoint directory{hint}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint directory")
    if is_roiscribe_checkpoint(path):
        return load_pretrained(path, device=device, dtype=dtype)
    if clip is None:
        raise ValueError(f"{path} looks like an official GPT4RoI checkpoint; pass the local CLIP ViT-L/14 "
                         "directory too (--clip DIR): the official checkpoint does not contain the vision tower")
    return load_official(path, clip, base=official_base, device=device, dtype=dtype or torch.float32)

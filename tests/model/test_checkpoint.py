"""Checkpoints: roiscribe's format, the official layout (written here with the official key names
and config fields, as the released GPT4RoI-7B-delta-V0 has them), and delta application."""

import dataclasses
import json

import pytest
import torch

from model.checkpoint import (apply_delta, load_model, load_official, load_pretrained, native_cuda_dtype,
                              official_pyramid_layers, random_init, save_pretrained)
from model.prompt import build_prompt
from model.tokenizer import PromptTokenizer, SentencePiecePieces
from model.config import TokenConfig, get_preset
from model.vision import preprocess

LLAMA_BASE = 2048  # the tiny preset's base vocabulary (LLaMA's is 32000)


def _logits(loaded, image, boxes=((0.1, 0.2, 0.6, 0.9), (0.5, 0.0, 1.0, 0.5))):
    ids = torch.tensor([loaded.tokenizer.encode(build_prompt("Compare <region1> with <region2>."))])
    with torch.no_grad():
        return loaded.model(ids, preprocess([image], loaded.config.vision), [torch.tensor(boxes)]).logits


def test_save_and_load_pretrained_gives_the_same_logits(tmp_path, rng_image):
    src = random_init("tiny", seed=3)
    save_pretrained(src, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    got = load_pretrained(tmp_path)
    assert got.config == src.config
    image = rng_image()
    torch.testing.assert_close(_logits(got, image), _logits(src, image), rtol=1e-5, atol=1e-5)
    bf16 = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.model.llm.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE stays fp32


def _peak_allocated(fn, trace) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, from the profiler's memory events
    (``trace``: where the profiler writes them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def test_loading_builds_on_meta_and_never_holds_the_weights_twice(tmp_path):
    """Loaded in bfloat16, every weight is converted (so materialised) as it is read: the peak is
    one bfloat16 copy. A model built or materialised on the CPU first would add a float32 copy."""
    src = random_init("tiny", seed=3)
    save_pretrained(src, tmp_path / "ckpt")
    state = src.model.state_dict()
    size = lambda t: t.numel() * (2 if t.is_floating_point() else t.element_size())  # noqa: E731
    one_copy, largest = sum(map(size, state.values())), max(map(size, state.values()))
    got = []
    peak = _peak_allocated(lambda: got.append(load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)),
                           tmp_path / "trace.json")
    assert one_copy / 2 < peak <= one_copy + largest, (peak, one_copy)
    weights = got[0].model.state_dict()
    assert all(torch.equal(v.to(weights[k].dtype), weights[k]) for k, v in state.items())


# The official layout, written by hand ----------------------------------------------------------

def _official_key(ours: str) -> str:
    if ours.startswith(("mm_projector.", "spi_module.")):
        return "model." + ours
    if ours.startswith("llm.model."):
        return ours[len("llm."):]
    if ours.startswith("llm.lm_head."):
        return ours[len("llm."):]
    raise AssertionError(ours)


def _official_config(cfg) -> dict:
    l = cfg.llm
    return {  # the fields of GPT4RoI-7B-delta-V0's config.json (sizes from the tiny preset)
        "_name_or_path": "../xgpt/heavy_roi_checkpoints/debug/",
        "architectures": ["SPILlavaMPTForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": l.hidden_size,
        "initializer_range": 0.02, "intermediate_size": l.intermediate_size,
        "max_position_embeddings": l.max_position_embeddings, "mm_hidden_size": cfg.vision.hidden_size,
        "mm_use_im_start_end": True, "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14", "model_type": "llava",
        "num_attention_heads": l.num_heads, "num_hidden_layers": l.num_layers, "pad_token_id": 0,
        "rms_norm_eps": l.rms_norm_eps, "sep_image_conv_front": False, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.29.2", "tune_mm_mlp_adapter": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": l.vocab_size,
    }


def _write_shards(directory, state: dict, n_shards=2, prefix="pytorch_model"):
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"{prefix}-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / f"{prefix}.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _official_state(src, dtype=torch.float16) -> dict:
    state = {_official_key(k): v.to(dtype) for k, v in src.model.state_dict().items() if not k.startswith("vision_tower.")}
    head_dim = src.config.llm.hidden_size // src.config.llm.num_heads
    for n in range(src.config.llm.num_layers):  # old transformers saved these buffers; they must be ignored
        state[f"model.layers.{n}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    return state


# the tiny preset with a CLIP deep enough for the official pyramid rule: from layer -2 (10 of 11)
# down in steps of 3
OFFICIAL_TINY = get_preset("tiny").replace(
    vision=dataclasses.replace(get_preset("tiny").vision, num_layers=11, pyramid_layers=(1, 4, 7, 10)))


def test_the_pyramid_layers_follow_the_official_select_layer():
    """``hidden_states[select::-3]``, the four nearest the top: CLIP-L's -2 gives the paper's layers."""
    assert official_pyramid_layers(-2, 24) == (14, 17, 20, 23) == get_preset("gpt4roi-7b").vision.pyramid_layers
    assert official_pyramid_layers(-1, 24) == (15, 18, 21, 24)
    assert official_pyramid_layers(23, 24) == (14, 17, 20, 23)
    assert official_pyramid_layers(-2, 11) == (1, 4, 7, 10)
    with pytest.raises(ValueError, match="leaves 2 hidden states for a 4-level pyramid"):
        official_pyramid_layers(-2, 5)
    with pytest.raises(ValueError, match="out of range"):
        official_pyramid_layers(30, 24)


@pytest.fixture
def official(tmp_path):
    """A tiny checkpoint in the official layout, and the fp16-rounded model it was written from."""
    src = random_init(OFFICIAL_TINY, seed=5)
    with torch.no_grad():  # the official shards are fp16: compare against the same rounded weights
        for p in src.model.parameters():
            p.copy_(p.half().float())
    ckpt, clip = tmp_path / "gpt4roi", tmp_path / "clip"
    _write_shards(ckpt, _official_state(src))
    (ckpt / "config.json").write_text(json.dumps(_official_config(src.config)))
    (ckpt / "added_tokens.json").write_text(json.dumps(src.config.tokens.added_tokens()))
    src.tokenizer.save(ckpt)
    src.model.vision_tower.save_pretrained(clip)
    return src, ckpt, clip


def test_official_layout_loads_strictly_with_the_same_logits(official, rng_image):
    src, ckpt, clip = official
    got = load_official(ckpt, clip, base="tiny")
    assert got.model.parameter_counts() == src.model.parameter_counts()
    # the pyramid comes from mm_vision_select_layer and the CLIP's depth, not from the base preset
    assert got.config.vision.pyramid_layers == (1, 4, 7, 10) != get_preset("tiny").vision.pyramid_layers
    # on CUDA, "auto" runs a released checkpoint as released (fp16), roiscribe's own in bf16
    assert native_cuda_dtype(ckpt) == torch.float16
    assert native_cuda_dtype("demo") == native_cuda_dtype("random:tiny") == torch.bfloat16
    image = rng_image(80, 50)
    torch.testing.assert_close(_logits(got, image), _logits(src, image), rtol=1e-5, atol=1e-5)
    assert got.config.tokens == src.config.tokens
    via_cli_entry = load_model(str(ckpt), clip=clip, official_base="tiny")
    torch.testing.assert_close(_logits(via_cli_entry, image), _logits(src, image), rtol=1e-5, atol=1e-5)


def test_official_layout_missing_or_unexpected_keys_fail(official):
    src, ckpt, clip = official
    state = _official_state(src)
    state.pop("model.spi_module.roi_align.updims.weight")
    _write_shards(ckpt, state)
    with pytest.raises(ValueError, match=r"missing .*roi_align\.updims\.weight"):
        load_official(ckpt, clip, base="tiny")
    state = _official_state(src)
    state["model.spi_module.extra.weight"] = torch.zeros(3)
    _write_shards(ckpt, state)
    with pytest.raises(ValueError, match=r"unexpected weight 'spi_module\.extra\.weight'"):
        load_official(ckpt, clip, base="tiny")


def test_official_checkpoint_needs_clip_and_says_so(official):
    _, ckpt, _ = official
    with pytest.raises(ValueError, match="--clip"):
        load_model(str(ckpt))
    with pytest.raises(ValueError, match="not a local checkpoint directory.*random:tiny"):
        load_model("no-such-model")


def test_model_specs_name_what_they_load(tmp_path, monkeypatch):
    import demo

    (tmp_path / "demo").mkdir()  # like demo/ at the repository root: a folder, not a checkpoint
    monkeypatch.chdir(tmp_path)
    shipped = load_model("demo")
    assert shipped.config.name == "demo"
    on_disk = load_pretrained(demo.model_dir()).model.state_dict()
    assert all(torch.equal(v, on_disk[k]) for k, v in shipped.model.state_dict().items())
    assert load_model("random:tiny").config.name == "tiny"
    random_demo = load_model("random:demo").model.state_dict()
    assert not all(torch.equal(v, on_disk[k]) for k, v in random_demo.items() if v.is_floating_point())
    with pytest.raises(ValueError, match="write random:tiny"):
        load_model("tiny")  # a bare preset name no longer means random weights silently


def test_apply_delta_round_trips(official, tmp_path, rng_image):
    src, ckpt, clip = official
    target = _official_state(src)
    gen = torch.Generator().manual_seed(0)
    base = {}  # an HF LLaMA directory: the LLaMA keys, base-vocabulary rows only
    for key, t in target.items():
        if key.startswith(("model.mm_projector.", "model.spi_module.")) or key.endswith("inv_freq"):
            continue
        rows = LLAMA_BASE if key in ("model.embed_tokens.weight", "lm_head.weight") else t.shape[0]
        base[key] = (torch.randn((rows, *t.shape[1:]), generator=gen) * 0.02).half()
    delta = {}
    for key, t in target.items():
        if key in base:
            d = t.float().clone()
            d[: base[key].shape[0]] -= base[key].float()
            delta[key] = d.half()
        else:
            delta[key] = t  # projector, region module (and inv_freq) are stored raw
    base_dir, delta_dir, out = tmp_path / "llama", tmp_path / "delta", tmp_path / "merged"
    _write_shards(base_dir, base, n_shards=2)
    _write_shards(delta_dir, delta, n_shards=3)
    for f in ("config.json", "tokenizer.json", "added_tokens.json"):
        (delta_dir / f).write_bytes((ckpt / f).read_bytes())

    apply_delta(base_dir, delta_dir, out, base_vocab=LLAMA_BASE)

    merged = load_official(out, clip, base="tiny")
    want = {_official_key(k): v for k, v in src.model.state_dict().items() if not k.startswith("vision_tower.")}
    for key, value in merged.model.state_dict().items():
        if key.startswith("vision_tower."):
            continue
        official_key = _official_key(key)
        if official_key.startswith(("model.mm_projector.", "model.spi_module.")):
            assert torch.equal(value, want[official_key].float()), key  # raw: bit-exact
        else:
            torch.testing.assert_close(value, want[official_key].float(), atol=2e-3, rtol=0)  # fp16 sums
    added = merged.model.llm.get_input_embeddings().weight[LLAMA_BASE:]
    assert torch.equal(added, want["model.embed_tokens.weight"][LLAMA_BASE:].float())  # the 6 new rows raw


def test_apply_delta_refuses_a_base_that_does_not_fit(official, tmp_path):
    src, ckpt, _ = official
    target = _official_state(src)
    base_dir, delta_dir = tmp_path / "llama", tmp_path / "delta"
    _write_shards(base_dir, {"model.embed_tokens.weight": torch.zeros(100, src.config.llm.hidden_size).half()}, 1)
    _write_shards(delta_dir, {"model.embed_tokens.weight": target["model.embed_tokens.weight"]}, 1)
    with pytest.raises(ValueError, match="expected 2048 base rows"):
        apply_delta(base_dir, delta_dir, tmp_path / "out", base_vocab=LLAMA_BASE)


def test_sentencepiece_tokenizer_is_used_piecewise(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["A chat between a curious human and an assistant.", "What is region1 doing?",
                                 "The picture provides an overview.", "a red circle left of a blue square"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60,
                                   model_type="bpe", add_dummy_prefix=True, remove_extra_whitespaces=False)
    pieces = SentencePiecePieces(tmp_path / "tokenizer.model")
    tok = PromptTokenizer(pieces, TokenConfig.after(pieces.vocab_size), num_image_tokens=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ids = tok.encode("What is region1 <bbox> doing?")
    assert ids == [1] + sp.encode("What is region1") + [tok.tokens.bbox_id] + sp.encode("doing?")
    assert sp.id_to_piece(sp.encode("doing?")[0]).startswith("▁")  # each piece has its dummy prefix
    assert tok.decode(ids[1:4]) == sp.decode(ids[1:4])

import dataclasses

import pytest
import torch

from model import GPT4RoI, PRESETS, get_preset
from model.config import GPT4RoIConfig, RegionConfig, VisionConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = get_preset(name)
    assert cfg.name == name
    assert GPT4RoIConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(KeyError, match="gpt4roi-7b.*tiny"):
        get_preset("gpt5")


def test_7b_preset_is_the_papers_model():
    cfg = get_preset("gpt4roi-7b")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.hidden_size, cfg.vision.num_layers) == (224, 14, 1024, 24)
    assert cfg.num_image_tokens == 256
    assert [cfg.vision.resolve_layer(i) for i in cfg.vision.pyramid_layers] == [14, 17, 20, 23]
    assert cfg.vision.resolve_layer(cfg.vision.image_token_layer) == 23
    assert cfg.pyramid_sizes == (128, 64, 32, 16)
    assert cfg.pyramid_strides == (14 / 8, 14 / 4, 14 / 2, 14)
    assert (cfg.region.num_fuse_rounds, cfg.region.gn_groups, cfg.region.roi_output_size, cfg.region.roi_sampling_ratio) == (5, 64, 14, 2)
    assert (cfg.llm.vocab_size, cfg.llm.hidden_size, cfg.llm.num_layers) == (32006, 4096, 32)
    t = cfg.tokens
    assert (t.pad_id, t.im_patch_id, t.bbox_id, t.point_id, t.im_start_id, t.im_end_id) == tuple(range(32000, 32006))


def test_7b_parameter_counts_on_meta():
    with torch.device("meta"):
        model = GPT4RoI(get_preset("gpt4roi-7b"))
    counts = model.parameter_counts()
    assert counts["spi_module"] == 299_142_912  # the official MLVLROIQueryModule, from its shapes
    assert counts["mm_projector"] == 1024 * 4096 + 4096
    assert 6.73e9 < counts["llm"] < 6.75e9  # LLaMA-7B with 6 added rows in embed_tokens and lm_head
    assert counts["llm"] == 6_738_415_616 + 2 * 6 * 4096
    region = model.spi_module
    assert sum(p.numel() for p in region.roi_align.flatten_linear.parameters()) == 200704 * 1024 + 1024
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(vision=VisionConfig(image_size=225)), "not a multiple of patch_size"),
        (dict(region=RegionConfig(pyramid_upsample=(4, 2, 1))), "pyramid_layers"),
        (dict(region=RegionConfig(out_dim=2048)), "out_dim 2048 != LLM hidden_size"),
        (dict(region=RegionConfig(gn_groups=48)), "gn_groups"),
        (dict(vision=VisionConfig(pyramid_layers=(14, 17, 20, 30))), "out of range"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_preset("gpt4roi-7b"), **change)


def test_from_dict_rejects_unknown_fields():
    d = get_preset("tiny").to_dict()
    d["region"]["num_fuse"] = 3
    with pytest.raises(ValueError, match="num_fuse"):
        GPT4RoIConfig.from_dict(d)

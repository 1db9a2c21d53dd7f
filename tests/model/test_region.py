import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import get_preset
from model.region import PyramidFuse, RegionEncoder, coordinate_channels
from model.vision import normalize_boxes, preprocess


def test_shapes_through_every_stage(tiny, rng_image):
    model, cfg = tiny.model, tiny.config
    pixels = preprocess([rng_image(60, 90), rng_image(100, 40, seed=1)], cfg.vision)
    assert pixels.shape == (2, 3, 112, 112)
    with torch.no_grad():
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        assert len(hidden) == cfg.vision.num_layers + 1
        assert hidden[0].shape == (2, 1 + 64, 64)  # CLS + 8x8 patches
        feats = model.encode_images(pixels)
        assert feats.image_tokens.shape == (2, 64, cfg.llm.hidden_size)
        assert [tuple(p.shape) for p in feats.pyramid] == [(2, 64, s, s) for s in (64, 32, 16, 8)]
        boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.4, 0.9]]), torch.zeros(0, 4)]
        pooled = model.spi_module.roi_align.pool(feats.pyramid, torch.cat(boxes), torch.zeros(3, dtype=torch.long))
        assert [tuple(p.shape) for p in pooled] == [(3, 64, 7, 7)] * 4
        tokens = model.region_tokens(feats, boxes)
        assert [tuple(t.shape) for t in tokens] == [(3, cfg.llm.hidden_size), (0, cfg.llm.hidden_size)]


def test_region_tokens_of_an_image_do_not_depend_on_the_other_boxes(tiny, rng_image):
    model = tiny.model
    feats = model.encode_images(preprocess([rng_image()], tiny.config.vision))
    a = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    b = torch.tensor([[0.6, 0.2, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]])
    with torch.no_grad():
        alone = model.region_tokens(feats, [a])[0]
        together = model.region_tokens(feats, [torch.cat([b[:1], a, b[1:]])])[0]
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6)


def test_coordinate_channels_are_x_then_y():
    c = coordinate_channels(2, 3, 5, torch.zeros(1))
    assert c.shape == (2, 2, 3, 5)
    torch.testing.assert_close(c[0, 0, 0], torch.linspace(-1, 1, 5))  # x varies along the width
    torch.testing.assert_close(c[0, 1, :, 0], torch.linspace(-1, 1, 3))  # y varies along the height
    assert torch.all(c[0, 0, :, 2] == 0) and torch.all(c[0, 1, 1] == 0)


def test_scale_shuffle_takes_the_documented_channel_quarters():
    fuse = PyramidFuse(channels=8, num_levels=3, num_rounds=1, gn_groups=2)
    # Level l holds the value 100*l + channel everywhere; sizes 4, 2, 1 (finest first).
    x = [(100 * l + torch.arange(8.0)).view(1, 8, 1, 1).expand(1, 8, s, s) for l, s in zip(range(3), (4, 2, 1))]
    middle = fuse._shuffle(x, 1)[0, :, 0, 0].tolist()
    assert middle == [100, 101, 102, 103, 206, 207, 4, 5]  # own 0:4, coarser 6:8, finer 4:6
    finest = fuse._shuffle(x, 0)[0, :, 0, 0].tolist()
    assert finest == [0, 1, 2, 3, 106, 107, 4, 5]  # the finest level is its own finer neighbour
    coarsest = fuse._shuffle(x, 2)[0, :, 0, 0].tolist()
    assert coarsest == [200, 201, 202, 203, 206, 207, 104, 105]


def test_fuse_keys_match_the_official_module_names():
    keys = set(RegionEncoder(get_preset("tiny")).state_dict())
    for k in ("mlvl_fuse.input_conv.3.weight", "mlvl_fuse.fuse_convs.4.conv.weight", "mlvl_fuse.fuse_convs.4.gn.bias",
              "roi_align.pconvs.3.bias", "roi_align.pos_embedd.0.weight", "roi_align.pos_embedd.2.weight",
              "roi_align.pos_embedd.3.weight", "roi_align.pos_embedd.5.bias", "roi_align.flatten_linear.weight",
              "roi_align.updims.weight"):
        assert k in keys
    assert "mlvl_fuse.fuse_convs.0.conv.bias" not in keys  # mmcv's ConvModule drops the bias before GN


@pytest.mark.parametrize("size", [(150, 300), (300, 120)])  # (height, width), non-square both ways
def test_pixel_boxes_of_a_non_square_image_land_where_they_should(size):
    """A bright patch in the bottom-right corner: the box around it, given in pixels of the
    original image, must pool the patch on every pyramid level; the opposite corner must not."""
    cfg = get_preset("tiny")
    h, w = size
    image = np.full((h, w, 3), 20, np.uint8)
    y0, x0 = int(h * 0.6), int(w * 0.6)
    image[y0:, x0:] = 250
    pixels = preprocess([image], cfg.vision)  # (1, 3, S, S), stretched
    # Stand-in feature maps: the preprocessed image itself, resized to each level's size.
    pyramid = [F.interpolate(pixels, size=(s, s), mode="bilinear", align_corners=False) for s in cfg.pyramid_sizes]
    head = RegionEncoder(cfg).roi_align
    corner = normalize_boxes([[x0 + 0.12 * w, y0 + 0.12 * h, w - 2, h - 2]], w, h)
    opposite = normalize_boxes([[2, 2, w - x0 - 0.12 * w, h - y0 - 0.12 * h]], w, h)
    bright = (250 / 255 - cfg.vision.image_mean[0]) / cfg.vision.image_std[0]
    dark = (20 / 255 - cfg.vision.image_mean[0]) / cfg.vision.image_std[0]
    for level, pooled in enumerate(head.pool(pyramid, torch.cat([corner, opposite]), torch.zeros(2, dtype=torch.long))):
        red = pooled[:, 0].mean(dim=(1, 2))
        assert red[0] == pytest.approx(bright, abs=0.15), f"level {level}: corner box missed the patch"
        assert red[1] == pytest.approx(dark, abs=0.15), f"level {level}: opposite box saw the patch"


def test_normalize_boxes_divides_by_width_and_height():
    b = normalize_boxes([[30, 20, 60, 40]], width=120, height=80)
    torch.testing.assert_close(b, torch.tensor([[0.25, 0.25, 0.5, 0.5]]))


def test_half_precision_keeps_the_norms_in_float32_and_fp16_is_the_closer_half(rng_image):
    """As the released model ran (fp16 weights under autocast): GroupNorm, LayerNorm, resizes and
    RoIAlign compute in float32, so the fused pyramid is float32; and fp16's longer mantissa gives
    region tokens closer to float32's than bf16's."""
    import copy

    from model.checkpoint import random_init

    loaded = random_init("tiny", seed=3)
    model = loaded.model
    pixels = preprocess([rng_image(120, 90)], loaded.config.vision)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.3, 0.2, 0.4, 0.9]])]
    with torch.no_grad():
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        levels = [hidden[i][:, 1:] for i in model._layers]

        def tokens(dtype):
            encoder = copy.deepcopy(model.spi_module).to(dtype)
            pyramid = encoder.build_pyramid([h.to(dtype) for h in levels])
            assert all(p.dtype == torch.float32 for p in pyramid)
            assert encoder.roi_align.box_embedding(boxes[0]).dtype == torch.float32
            out = encoder.encode_boxes(pyramid, boxes)[0]
            assert out.dtype == dtype  # updims in the weights' dtype, as autocast would
            return out.float()

        exact = tokens(torch.float32)
        fp16 = float((tokens(torch.float16) - exact).norm() / exact.norm())
        bf16 = float((tokens(torch.bfloat16) - exact).norm() / exact.norm())
    assert fp16 < bf16 / 4, (fp16, bf16)
    assert fp16 < 2e-3, fp16

import pytest
import torch

from model.generate import lm_forward
from model.prompt import build_prompt
from model.vision import preprocess


def _ids(tiny, question):
    return torch.tensor([tiny.tokenizer.encode(build_prompt(question))])


def test_embed_fills_image_run_and_bboxes_in_order(tiny):
    model, t = tiny.model, tiny.config.tokens
    ids = _ids(tiny, "How does <region1> relate to <region2>?")
    n_img = tiny.config.num_image_tokens
    image_tokens = torch.randn(1, n_img, tiny.config.llm.hidden_size)
    regions = torch.randn(2, tiny.config.llm.hidden_size)
    with torch.no_grad():
        plain = model.llm.get_input_embeddings()(ids)
        embeds = model.embed(ids, image_tokens, regions)
    patch = (ids[0] == t.im_patch_id).nonzero().flatten()
    bbox = (ids[0] == t.bbox_id).nonzero().flatten()
    assert len(patch) == n_img and patch.diff().eq(1).all()  # one contiguous run
    torch.testing.assert_close(embeds[0, patch], image_tokens[0])
    torch.testing.assert_close(embeds[0, bbox[0]], regions[0])
    torch.testing.assert_close(embeds[0, bbox[1]], regions[1])
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[patch] = False
    others[bbox] = False
    torch.testing.assert_close(embeds[0, others], plain[0, others])  # <im_start>, <im_end>, text unchanged


def test_bbox_count_mismatch_fails_loudly_naming_both_counts(tiny):
    ids = _ids(tiny, "How does <region1> relate to <region2>?")
    image_tokens = torch.zeros(1, tiny.config.num_image_tokens, tiny.config.llm.hidden_size)
    with pytest.raises(ValueError, match=r"2 <bbox> tokens but 3 region tokens"):
        tiny.model.embed(ids, image_tokens, torch.zeros(3, tiny.config.llm.hidden_size))
    with pytest.raises(ValueError, match=r"2 <bbox> tokens but 0 region tokens"):
        tiny.model.embed(ids, image_tokens, None)
    with pytest.raises(ValueError, match=r"64 <im_patch> tokens but 128 image tokens"):
        tiny.model.embed(ids, torch.zeros(2, 64, tiny.config.llm.hidden_size), torch.zeros(2, tiny.config.llm.hidden_size))


def test_forward_logits_and_loss(tiny, rng_image):
    model = tiny.model
    ids = _ids(tiny, "What is <region1>?")
    pixels = preprocess([rng_image()], tiny.config.vision)
    with torch.no_grad():
        out = model(ids, pixels, [torch.tensor([[0.2, 0.2, 0.6, 0.7]])], labels=ids)
    assert out.logits.shape == (1, ids.shape[1], tiny.config.llm.vocab_size)
    assert torch.isfinite(out.loss)


def test_the_box_changes_the_answer_distribution(tiny, rng_image):
    """The region token must reach the LLM: two different boxes give different next-token logits."""
    model = tiny.model
    ids = _ids(tiny, "What is <region1>?")
    pixels = preprocess([rng_image()], tiny.config.vision)
    with torch.no_grad():
        a = model(ids, pixels, [torch.tensor([[0.0, 0.0, 0.3, 0.3]])]).logits[0, -1]
        b = model(ids, pixels, [torch.tensor([[0.5, 0.5, 1.0, 1.0]])]).logits[0, -1]
    assert not torch.allclose(a, b)


def test_cached_decoding_equals_a_full_forward(tiny, rng_image):
    model = tiny.model
    ids = _ids(tiny, "What is <region1>?")
    feats = model.encode_images(preprocess([rng_image()], tiny.config.vision))
    regions = model.region_tokens(feats, [torch.tensor([[0.1, 0.2, 0.5, 0.9]])])[0]
    extra = torch.tensor([[5, 77, 300]])
    with torch.no_grad():
        full = model.llm(inputs_embeds=model.embed(torch.cat([ids, extra], 1), feats.image_tokens, regions)).logits
        logits, cache = lm_forward(model.llm, inputs_embeds=model.embed(ids, feats.image_tokens, regions))
        steps = [logits[:, -1]]
        for tok in extra[0]:
            logits, cache = lm_forward(model.llm, cache, input_ids=tok.view(1, 1))
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, ids.shape[1] - 1:-1], rtol=1e-4, atol=1e-5)

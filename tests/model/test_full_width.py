"""The engine at the 7B model's widths, on a CPU: ``gpt4roi-7b-shallow`` has CLIP-L's width, the
1024-channel pyramid at 128/64/32/16, a 4096-wide LLaMA layer and the 32006-token vocabulary, at a
fraction of the depth (random weights, made directly in float32; ~4.5 GB of memory, ~40 s)."""

import numpy as np
import torch

from model.checkpoint import random_init_on_device
from model.config import get_preset
from model.engine import EngineConfig, ImageJob, RegionEngine, RegionPrompt
from model.generate import generate_reference
from model.prompt import build_prompt


def test_the_engine_equals_the_reference_at_full_width():
    config = get_preset("gpt4roi-7b-shallow")
    full = get_preset("gpt4roi-7b")
    assert (config.vision.hidden_size, config.region.embed_dim, config.pyramid_sizes, config.llm.hidden_size,
            config.llm.num_heads, config.llm.vocab_size) == \
           (full.vision.hidden_size, full.region.embed_dim, full.pyramid_sizes, full.llm.hidden_size,
            full.llm.num_heads, full.llm.vocab_size) == (1024, 1024, (128, 64, 32, 16), 4096, 32, 32006)
    loaded = random_init_on_device(config, device="cpu", dtype=torch.float32)
    rs = np.random.RandomState(0)
    image = rs.randint(0, 256, (300, 420, 3)).astype(np.uint8)
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.1, 0.9, 0.5], [0.3, 0.5, 0.7, 0.95]])
    prompts = [RegionPrompt("What is <region1>?", (0,)),
               RegionPrompt("Could you describe the region shown as <region1> in the picture in great detail?", (2,)),
               RegionPrompt("What is the relationship between <region1> and <region2>?", (1, 0))]
    tokens = 4
    engine = RegionEngine(loaded, EngineConfig(max_new_tokens=tokens, min_new_tokens=tokens))
    (got,) = engine.run([ImageJob(image, boxes, prompts)])
    for gen, p in zip(got, prompts):
        ref = generate_reference(loaded.model, loaded.tokenizer, image, boxes[list(p.regions)], build_prompt(p.question),
                                 max_new_tokens=tokens, min_new_tokens=tokens)
        assert gen.token_ids == ref.token_ids and len(gen.token_ids) == tokens
        np.testing.assert_allclose(gen.logprobs, ref.logprobs, rtol=1e-3, atol=1e-3)
    # one 4096-wide layer, 32 heads of 128, fp32: 2 x 32 x 128 x 4 bytes of K and V per token; the
    # image's prefix held once, each row only its own question and answer
    assert engine.kv_bytes_per_token == 2 * 32 * 128 * 4
    ids = [loaded.tokenizer.encode(build_prompt(p.question)) for p in prompts]
    prefix = len(engine._shared_prefix(ids))
    assert prefix > config.num_image_tokens
    width = max(len(i) for i in ids) - prefix + tokens
    assert engine.peak_kv_bytes == (prefix + len(prompts) * width) * engine.kv_bytes_per_token

import torch

from model.generate import generate_reference
from model.prompt import build_prompt

BOXES = [[0.1, 0.1, 0.6, 0.5], [0.5, 0.4, 0.9, 1.0]]


def _script_logits(model, token_ids):
    """Make the LM emit ``token_ids`` in order, whatever its weights: a forward hook on lm_head
    replaces the last position's logits (a test device, not a code path of the model)."""
    calls = iter(token_ids)

    def hook(module, args, out):
        out = out.clone()
        out[:, -1] = 0
        out[:, -1, next(calls)] = 30.0
        return out

    return model.llm.lm_head.register_forward_hook(hook)


def test_reference_logprobs_equal_a_plain_forward_over_the_generated_sequence(tiny, rng_image):
    model, tok = tiny.model, tiny.tokenizer
    image = rng_image()
    prompt = build_prompt("How is <region2> placed relative to <region1>?")
    gen = generate_reference(model, tok, image, BOXES, prompt, max_new_tokens=6, min_new_tokens=6)
    assert len(gen.token_ids) == 6 and len(gen.logprobs) == 6
    from model.vision import preprocess

    ids = torch.tensor([tok.encode(prompt) + gen.token_ids])
    with torch.no_grad():
        # region2 is named first, so its box fills the first <bbox>
        logits = model(ids, preprocess([image], tiny.config.vision), [torch.tensor([BOXES[1], BOXES[0]])]).logits
    logp = torch.log_softmax(logits[0, -7:-1].float(), -1)
    want = logp[torch.arange(6), torch.tensor(gen.token_ids)]
    assert gen.token_ids == logp.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(gen.logprobs), want, rtol=1e-4, atol=1e-4)
    assert gen.min_logprob == min(gen.logprobs)


def test_generation_stops_at_the_stop_string_and_cuts_the_answer(tiny, rng_image):
    tok = tiny.tokenizer
    script = tok.pieces.encode("Assistant: a red circle\n###") + tok.pieces.encode("Human: more") * 3
    handle = _script_logits(tiny.model, script)
    try:
        gen = generate_reference(tiny.model, tok, rng_image(), BOXES, build_prompt("What is <region1>?"), 40)
    finally:
        handle.remove()
    n = len(tok.pieces.encode("Assistant: a red circle\n###"))
    assert gen.token_ids == script[:n]
    assert gen.text == "a red circle"
    assert gen.raw.endswith("###")


def test_generation_stops_at_eos_and_at_the_token_budget(tiny, rng_image):
    tok = tiny.tokenizer
    script = tok.pieces.encode("Assistant: blue") + [tiny.config.tokens.eos_id] + [7] * 10
    handle = _script_logits(tiny.model, script)
    try:
        gen = generate_reference(tiny.model, tok, rng_image(), BOXES, build_prompt("What is <region1>?"), 40)
    finally:
        handle.remove()
    assert gen.token_ids[-1] == tiny.config.tokens.eos_id and gen.text == "blue"
    gen = generate_reference(tiny.model, tok, rng_image(), BOXES, build_prompt("What is <region1>?"), 3)
    assert len(gen.token_ids) <= 3

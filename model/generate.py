"""The plain reference generation path: one prompt at a time, greedy, image re-encoded per call.

This is what the official code does for every question, and it is the baseline the batched engine
is tested and benchmarked against. It is deliberately simple: no batching, no shared prefix.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import LlamaForCausalLM

from .gpt4roi import GPT4RoI
from .prompt import STOP, cut_answer, region_order
from .tokenizer import PromptTokenizer
from .vision import ImageLike, preprocess

# transformers 5 names the KV-cache argument and output ``cache``; 4.x named it ``past_key_values``.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def lm_forward(llm: LlamaForCausalLM, cache=None, **kwargs):
    """One LLaMA forward with a KV cache -> (logits, cache)."""
    out = llm(use_cache=True, **{CACHE_KW: cache}, **kwargs)
    return out.logits, out[CACHE_KW]


@dataclass
class Generation:
    """One answer: the cut text, the generated ids (through the stop) and their log-probs."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw: str = ""

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("nan")

    @property
    def min_logprob(self) -> float:
        return min(self.logprobs) if self.logprobs else float("nan")


def regions_for_prompt(prompt: str, boxes: torch.Tensor) -> torch.Tensor:
    """The boxes in the order the prompt's ``<bbox>`` tokens name them (``region{i}`` is box i-1)."""
    order = region_order(prompt)
    if any(not 1 <= i <= len(boxes) for i in order):
        raise ValueError(f"the prompt names regions {order} but only {len(boxes)} boxes were given")
    return boxes[[i - 1 for i in order]] if order else boxes[:0]


@torch.inference_mode()
def generate_reference(
    model: GPT4RoI,
    tokenizer: PromptTokenizer,
    image: ImageLike,
    boxes: torch.Tensor | Sequence[Sequence[float]],
    prompt: str,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
) -> Generation:
    """Greedy answer to one prompt about one image.

    ``boxes`` (n, 4) normalised xyxy; ``region{i} <bbox>`` in the prompt refers to ``boxes[i-1]``.
    ``min_new_tokens`` suppresses the stop (for benchmarks that force a fixed answer length).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    features = model.encode_images(preprocess([image], model.config.vision))
    regions = model.region_tokens(features, [regions_for_prompt(prompt, boxes)])[0]
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    logits, cache = lm_forward(model.llm, inputs_embeds=model.embed(ids, features.image_tokens, regions))

    eos = model.config.tokens.eos_id
    out = Generation(text="")
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        next_id = int(logp.argmax())
        out.token_ids.append(next_id)
        out.logprobs.append(float(logp[next_id]))
        out.raw = tokenizer.decode(out.token_ids)
        if step + 1 >= min_new_tokens and (next_id == eos or STOP in out.raw):
            break
        logits, cache = lm_forward(model.llm, cache, input_ids=torch.tensor([[next_id]], device=model.device))
    out.text = cut_answer(out.raw)
    return out
